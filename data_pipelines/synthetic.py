"""A synthetic source that honours the loader's batch contract, for benchmarks and equivalence tests.

Sample ``i`` of the global stream (``i = (batch * world_size + rank) * batch_size + j``) is the
noise image ``k = i % BANK_SIZE`` of a bank, drawn from a generator seeded by ``(seed, k)``: the
content of a global batch therefore does not depend on how it is split over ranks or
micro-batches, which lets tests compare an N-rank run with a one-process run on the same global
batch. Labels are ``i % num_classes``. With ``context_length > 0`` batches also carry ``text``:
CLIP-style token rows (start token, a few random BPE ids, end token, zero padding), banked the
same way.

The bank is what makes this the "data for free" baseline of ``benchmarks/train_throughput.py``:
each image is generated once, the first time a rank needs it (at most ``BANK_SIZE`` per view and
rank), and a batch is then one gather, so the stream costs the training process almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from data_pipelines.augment import ViewSpec


def _seed(seed: int, index: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


BANK_SIZE = 256  # distinct samples per view: ~150 MB for 224 px views


def _tokens(seed: int, index: int, context_length: int) -> torch.Tensor:
    row = torch.zeros(context_length, dtype=torch.int64)
    g = torch.Generator().manual_seed(_seed(seed + 7919, index))
    n = int(torch.randint(1, max(2, context_length - 1), (), generator=g))
    row[0] = 49406  # <start_of_text>
    row[1 : n + 1] = torch.randint(256, 49406, (n,), generator=g)
    row[n + 1] = 49407  # <end_of_text>
    return row


class _Bank:
    """Rows generated on first use by ``make(k)``, then gathered by index (``k = i % BANK_SIZE``)."""

    def __init__(self, make: Callable[[int], torch.Tensor]) -> None:
        self.make = make
        self.rows: torch.Tensor | None = None
        self.ready: set[int] = set()

    def gather(self, indices: range) -> torch.Tensor:
        keys = [i % BANK_SIZE for i in indices]
        for k in dict.fromkeys(keys):
            if k not in self.ready:
                row = self.make(k)
                if self.rows is None:
                    self.rows = torch.empty(BANK_SIZE, *row.shape, dtype=row.dtype)
                self.rows[k] = row
                self.ready.add(k)
        assert self.rows is not None
        return self.rows[torch.tensor(keys)]


def synthetic_batches(
    views: Sequence[ViewSpec],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
    num_classes: int = 10,
    context_length: int = 0,
) -> Iterator[dict[str, Any]]:
    """Infinite stream of batches ``{"images": [one [B, 3, S, S] tensor per view], "label", "num_corrupt"}``.

    Args:
        views: the views (only their sizes matter).
        batch_size: samples per batch on this rank.
        rank: this rank.
        world_size: number of ranks.
        seed: run seed.
        start_batch: number of the first batch.
        num_classes: labels are ``i % num_classes``.
        context_length: when > 0, add ``text`` int64 [B, context_length].

    Returns:
        An infinite iterator of batches.
    """

    def noise(v_idx: int, size: int) -> Callable[[int], torch.Tensor]:
        def make(k: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(_seed(seed + 1000 * v_idx, k))
            return torch.randn(3, size, size, generator=g)

        return make

    banks = [_Bank(noise(v_idx, view.size)) for v_idx, view in enumerate(views)]
    text = _Bank(lambda k: _tokens(seed, k, context_length))
    b = start_batch
    while True:
        first = (b * world_size + rank) * batch_size
        indices = range(first, first + batch_size)
        labels = torch.arange(first, first + batch_size) % num_classes
        batch: dict[str, Any] = {
            "images": [bank.gather(indices) for bank in banks],
            "label": labels,
            "num_corrupt": 0,
        }
        if context_length > 0:
            batch["text"] = text.gather(indices)
        yield batch
        b += 1

"""A synthetic source that honours the loader's batch contract, for benchmarks and equivalence tests.

Sample ``i`` of the global stream (``i = (batch * world_size + rank) * batch_size + j``) is random
noise drawn from a generator seeded by ``(seed, i)``: the content of a global batch therefore does
not depend on how it is split over ranks or micro-batches, which lets tests compare an N-rank run
with a one-process run on the same global batch. Labels are ``i % num_classes``. With
``context_length > 0`` batches also carry ``text``: CLIP-style token rows (start token, a few
random BPE ids, end token, zero padding) drawn from the same per-sample generator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from data_pipelines.augment import ViewSpec


def _seed(seed: int, index: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def _tokens(seed: int, first: int, batch_size: int, context_length: int) -> torch.Tensor:
    rows = torch.zeros(batch_size, context_length, dtype=torch.int64)
    for j in range(batch_size):
        g = torch.Generator().manual_seed(_seed(seed + 7919, first + j))
        n = int(torch.randint(1, max(2, context_length - 1), (), generator=g))
        rows[j, 0] = 49406  # <start_of_text>
        rows[j, 1 : n + 1] = torch.randint(256, 49406, (n,), generator=g)
        rows[j, n + 1] = 49407  # <end_of_text>
    return rows


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
    b = start_batch
    while True:
        first = (b * world_size + rank) * batch_size
        images = []
        for v_idx, view in enumerate(views):
            samples = []
            for j in range(batch_size):
                g = torch.Generator().manual_seed(_seed(seed + 1000 * v_idx, first + j))
                samples.append(torch.randn(3, view.size, view.size, generator=g))
            images.append(torch.stack(samples))
        labels = torch.arange(first, first + batch_size) % num_classes
        batch: dict[str, Any] = {"images": images, "label": labels, "num_corrupt": 0}
        if context_length > 0:
            batch["text"] = _tokens(seed, first, batch_size, context_length)
        yield batch
        b += 1

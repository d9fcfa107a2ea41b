"""A synthetic source that honours the loader's batch contract, for benchmarks and equivalence tests.

Sample ``i`` of the global stream (``i = (batch * world_size + rank) * batch_size + j``) is random
noise drawn from a generator seeded by ``(seed, i)``: the content of a global batch therefore does
not depend on how it is split over ranks or micro-batches, which lets tests compare an N-rank run
with a one-process run on the same global batch. Labels are ``i % num_classes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from data_pipelines.augment import ViewSpec


def _seed(seed: int, index: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def synthetic_batches(
    views: Sequence[ViewSpec],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
    num_classes: int = 10,
) -> Iterator[dict[str, Any]]:
    """Infinite stream of batches ``{"images": [one [B, 3, S, S] tensor per view], "label", "num_corrupt"}``."""
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
        yield {"images": images, "label": labels, "num_corrupt": 0}
        b += 1

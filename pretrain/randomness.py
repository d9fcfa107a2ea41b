"""Randomness as a pure function of (seed, step, sample): no generator state to save or restore.

Every step draws its random numbers from a generator seeded by ``derive_seed(seed, step, ...)``,
so a resumed run reproduces the uninterrupted one bit for bit, and per-sample draws (such as
MAE's masking noise) are generated for the whole global batch and sliced by the rank's offset,
so they do not depend on the world size either.
"""

from __future__ import annotations

import torch

from data_pipelines.seeds import derive_seed

__all__ = ["BatchRandom", "derive_seed"]


class BatchRandom:
    """Random draws for one micro-batch that are identical whatever the number of ranks.

    Args:
        seed: run seed.
        step: optimizer step.
        offset: index of this micro-batch's first sample within the step's global batch, which is
            ordered (micro-batch, rank, sample): ``(micro * world_size + rank) * micro_batch``.
        global_batch: samples per optimizer step over all ranks and micro-batches.
        device: where tensors are generated.
    """

    def __init__(self, seed: int, step: int, offset: int, global_batch: int, device: torch.device) -> None:
        self.seed, self.step = seed, step
        self.offset, self.global_batch, self.device = offset, global_batch, device
        self._calls = 0

    def _generator(self) -> torch.Generator:
        self._calls += 1
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, self.step, self._calls))
        return g

    def rand(self, local_batch: int, *per_sample: int) -> torch.Tensor:
        """Uniform [0, 1) of shape ``[local_batch, *per_sample]``: this rank's rows of the global draw."""
        full = torch.rand((self.global_batch, *per_sample), generator=self._generator(), device=self.device)
        return full[self.offset : self.offset + local_batch]

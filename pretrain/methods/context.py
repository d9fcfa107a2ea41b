"""What a method knows about the run and the current step, without touching engine internals.

* :class:`RunInfo` -- fixed for the run: total steps, steps per epoch (for recipes written in
  epochs), batch sizes, ranks. Given to :meth:`Method.configure` once, before training.
* :class:`StepContext` -- one micro-batch: the step, the micro-batch index and count under gradient
  accumulation, its random numbers, the collectives and the engine's parameter operations.
* :class:`Collectives` -- all-reduce / all-gather over the ranks that are no-ops in one process.
* :class:`ParamOps` -- parameter-level operations the engine provides (an EMA update that works on
  sharded parameters locally), so a method never needs to know how its parameters are placed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from pretrain.randomness import BatchRandom


class EpochsUnknownError(ValueError):
    """A recipe value is written in epochs but the run's epoch length is unknown."""


@dataclass(frozen=True)
class RunInfo:
    """The run as a method sees it.

    Attributes:
        total_steps: optimizer steps of the whole run (``train.steps``): every schedule's horizon.
        steps_per_epoch: optimizer steps per pass over the data (``train.steps_per_epoch``, else the
            shard manifest's sample count // global batch); None when neither is known.
        global_batch_size: samples per optimizer step over all ranks and micro-batches.
        accum_steps: micro-batches per optimizer step.
        world_size: ranks.
        rank: this rank.
        seed: run seed.
    """

    total_steps: int
    steps_per_epoch: int | None
    global_batch_size: int
    accum_steps: int
    world_size: int
    rank: int
    seed: int

    def epochs_to_steps(self, epochs: float, what: str) -> int:
        """``epochs`` of the data as optimizer steps (rounded); ``what`` names the recipe key in errors."""
        if epochs == 0:
            return 0
        if not self.steps_per_epoch:
            raise EpochsUnknownError(
                f"{what}={epochs} is in epochs, but this run's epoch length is unknown (no shard manifest "
                "with a sample count, e.g. data.backend=synthetic): set train.steps_per_epoch"
            )
        return round(epochs * self.steps_per_epoch)


class Collectives:
    """Reductions over all ranks for methods (batch statistics, centers, gathered negatives).

    Every call is a no-op in a single process, so a method's code is the same at any world size.
    Called on every rank at the same point of the step.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor; no gradient flows through it)."""
        t = t.detach().clone()
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (no gradient)."""
        return self.all_reduce_sum(t) / self.world_size

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` of every rank concatenated along dim 0, in rank order (no gradient)."""
        if not self.active:
            return t.detach()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def all_gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """As :meth:`all_gather`, with gradients flowing back to each rank's own rows."""
        if not self.active:
            return t
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()))


class ParamOps(Protocol):
    """Parameter operations an engine provides to methods (see :class:`pretrain.engines.base.Engine`)."""

    def ema_(self, targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
        """``target <- momentum * target + (1 - momentum) * source`` for each pair, in place, locally."""


@torch.no_grad()
def ema_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` on plain tensors, in place.

    The exponential moving average of a teacher (MoCo's momentum encoder; DINO §3.1, "teacher network").
    """
    if [x.shape for x in targets] != [x.shape for x in sources]:
        raise ValueError("ema: targets and sources must have the same shapes (sharded identically)")
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, sources, alpha=1.0 - momentum)


class LocalParamOps:
    """:class:`ParamOps` for unsharded parameters (unit tests and tools outside an engine)."""

    def ema_(self, targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
        ema_update_(targets, sources, momentum)


@dataclass(frozen=True)
class StepContext:
    """One micro-batch of one optimizer step, as a method sees it.

    Attributes:
        step: the optimizer step being taken (0-based: the first step is 0).
        micro: micro-batch index within the step (0 .. num_micro - 1).
        num_micro: micro-batches per step (``train.accum_steps``).
        rng: this micro-batch's random numbers (the same whatever the world size).
        run: the run's fixed facts.
        dist: collectives (no-ops in one process).
        ops: the engine's parameter operations.
    """

    step: int
    micro: int
    num_micro: int
    rng: BatchRandom
    run: RunInfo
    dist: Collectives
    ops: ParamOps

    @property
    def is_last_micro(self) -> bool:
        """True for the micro-batch after whose backward the optimizer steps."""
        return self.micro == self.num_micro - 1

    @property
    def epoch(self) -> float:
        """Fractional epoch at this step (0.0 when the epoch length is unknown)."""
        return self.step / self.run.steps_per_epoch if self.run.steps_per_epoch else 0.0

    @staticmethod
    def local(
        rng: BatchRandom,
        step: int = 0,
        total_steps: int = 1,
        steps_per_epoch: int | None = None,
        micro: int = 0,
        num_micro: int = 1,
    ) -> StepContext:
        """A one-process context (unit tests, tools): no collectives, unsharded parameter operations."""
        run = RunInfo(total_steps, steps_per_epoch, rng.global_batch, num_micro, 1, 0, rng.seed)
        return StepContext(step, micro, num_micro, rng, run, Collectives(1), LocalParamOps())

"""The small interface every engine implements, and what they share (precision, optimizer, clipping,
parameter operations for methods)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from pretrain.distributed import DistEnv
from pretrain.engines.dcp_state import DCPStateIO
from pretrain.methods.base import Method
from pretrain.methods.context import ema_update_
from pretrain.precision import PrecisionPolicy, resolve_precision

__all__ = ["CLIP_MODES", "Engine", "resolve_precision"]

CLIP_MODES = ("global", "per_param")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds (a DTensor's local shard; a plain tensor itself)."""
    return t._local_tensor if isinstance(t, DTensor) else t


class Engine:
    """Owns the wrapped model and its optimizer; the trainer only calls the methods below.

    Subclasses register themselves with :func:`pretrain.engines.register_engine` under a name and,
    optionally, a dataclass of options (the config section ``engine.<name>``).

    Order of application (style.md): compile each block, then activation checkpointing (set by the
    model), then sharding, then the optimizer over the (possibly sharded) parameters.
    """

    def __init__(self, cfg: Any, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.precision = PrecisionPolicy.from_config(cfg.train.precision, env.device)
        self.dtype = self.precision.compute_dtype
        self.model: nn.Module
        self.method: Method
        self.optimizer: torch.optim.Optimizer
        self.static_scales: list[tuple[float, float]] = []
        self._state_io = DCPStateIO(env, int(cfg.engine.timeout_s))

    # ---- what the config validator asks every engine ----------------------------------------
    @classmethod
    def validate_config(cls, cfg: Any, world_size: int, errors: list[str]) -> None:
        """Append a message per problem this engine finds in ``cfg`` for ``world_size`` ranks."""

    @classmethod
    def needs_process_group(cls, world_size: int) -> bool:
        """Whether this engine needs torch.distributed initialised even on ``world_size`` == 1."""
        return world_size > 1

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self, method: Method) -> None:
        self.method = method
        if self.cfg.train.compile:
            for unit in method.shard_units():
                unit.compile()
        self.model = self.wrap(method)
        groups = method.param_groups(self.cfg.optim.weight_decay)
        # The method's multipliers, kept here: a checkpoint load rebuilds the optimizer's group dicts.
        self.static_scales = [(float(g.get("lr_scale", 1.0)), float(g.get("wd_scale", 1.0))) for g in groups]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=0.0,  # set every step by the trainer's schedule
            betas=tuple(self.cfg.optim.betas),
            eps=self.cfg.optim.eps,
            fused=fused,
            foreach=None if fused else True,
        )

    def wrap(self, method: Method) -> nn.Module:
        raise NotImplementedError

    # ---- step ------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's compute region under the run's precision policy (same for every engine)."""
        return self.precision.autocast()

    def visualize(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        """The method's TensorBoard images of ``batch`` (called under no_grad and :meth:`autocast`)."""
        return self.model.visualize(batch, ctx)  # type: ignore[operator]

    def set_grad_sync(self, enabled: bool) -> None:
        """Whether the next backward reduces gradients across ranks (off for non-final micro-batches)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def params_with_grad(self) -> Iterator[torch.Tensor]:
        return (p for p in self.model.parameters() if p.grad is not None)

    def step(
        self,
        max_norm: float | None,
        clip_mode: str = "global",
        before_update: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Clip, run ``before_update``, step the optimizer, zero grads; return the pre-clip global norm.

        Args:
            max_norm: clipping threshold (None: no clipping).
            clip_mode: ``global`` (one norm over all gradients, scaled together) or ``per_param``
                (each parameter's gradient scaled to at most ``max_norm`` on its own: DINO's
                ``clip_gradients``, ``g *= min(1, max_norm / (||g|| + 1e-6))``).
            before_update: the method's hook between backward/clipping and the update.

        Stays on the device: no host synchronisation.
        """
        params = list(self.params_with_grad())
        grads = [p.grad for p in params]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(total, DTensor):  # FSDP2: partial norms of the shards -> the global norm
            total = total.full_tensor()
        if max_norm is not None:
            if clip_mode == "global":
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
            elif clip_mode == "per_param":
                self._clip_per_param(grads, max_norm)
            else:
                raise ValueError(f"clip_mode={clip_mode!r}: valid modes are {', '.join(CLIP_MODES)}")
        if before_update is not None:
            before_update()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _clip_per_param(self, grads: list[torch.Tensor], max_norm: float) -> None:
        """Scale each gradient to norm <= ``max_norm`` (its full norm, summed over shards in one all-reduce)."""
        if not grads:
            return
        local = [_local(g) for g in grads]
        squares = torch.stack([n.float() ** 2 for n in torch._foreach_norm(local)])
        sharded = next((g for g in grads if isinstance(g, DTensor)), None)
        if sharded is not None and self.env.distributed:
            torch.distributed.all_reduce(squares, group=sharded.device_mesh.get_group())
        coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # exactly 1.0 where DINO skips the scaling
        for g, c in zip(local, coef.unbind()):
            g.mul_(c.to(g.dtype))

    # ---- parameter operations methods ask for (pretrain.methods.context.ParamOps) ----------------
    def ema_(self, targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
        """``target <- momentum * target + (1 - momentum) * source`` on each rank's own shards.

        Teacher and student are sharded identically (the same units, the same mesh), so every rank
        updates exactly the slices it holds: no communication.
        """
        ema_update_([_local(x) for x in targets], [_local(x) for x in sources], momentum)

    # ---- state I/O (the checkpoint bookkeeping around it: pretrain.checkpoint) ---------------------
    saves_in_background = True  # DCP: stage to host memory, write in a thread
    state_format = "dcp"  # recorded in trainer_state.json: a resume checks it before reading any file

    def save_state(self, path: Path) -> None:
        """Write model and optimizer state into the (existing, empty) step directory ``path``; collective."""
        self._state_io.save(self.state_dict(), path)

    def save_state_async(self, path: Path) -> Future:
        """Stage the state and write it in the background; the future completes when the files are written."""
        return self._state_io.save_async(self.state_dict(), path)

    def load_state(self, path: Path, saved_world_size: int) -> None:
        """Load what :meth:`save_state` wrote into ``path`` (DCP reshards any ``saved_world_size``)."""
        self._state_io.load(self.state_dict(), path, self.load_state_dict)

    def close_state_io(self) -> None:
        """Free what background saves keep between saves (staging buffers)."""
        self._state_io.close()

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state for torch.distributed.checkpoint (sharded under FSDP2)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned, filled by a checkpoint.

        The model strictly. The optimizer without its state for parameters that had none when the
        checkpoint was taken (never updated yet: a method cancelled their gradients, e.g. DINO's last
        layer during the first epoch); :meth:`CheckpointManager.load` removed exactly those from the
        template, so they start fresh, as in the uninterrupted run. Every other entry was loaded.
        """
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(
            self.model, self.optimizer, state["optim"], options=StateDictOptions(strict=False)
        )

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 model state on CPU on rank 0 (empty elsewhere); a collective under FSDP2."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=opts)

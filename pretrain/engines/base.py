"""The small interface every engine implements, and what they share (precision, optimizer, clipping)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from pretrain.distributed import DistEnv
from pretrain.methods.base import Method


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 elsewhere (CPU bf16 is slow and not what tests compare)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


class Engine:
    """Owns the wrapped model and its optimizer; the trainer only calls the methods below.

    Order of application (style.md): compile each block, then activation checkpointing (set by the
    model), then sharding, then the optimizer over the (possibly sharded) parameters.
    """

    def __init__(self, cfg: Any, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.dtype = resolve_precision(cfg.train.precision, env.device)
        self.model: nn.Module
        self.method: Method
        self.optimizer: torch.optim.Optimizer

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self, method: Method) -> None:
        self.method = method
        if self.cfg.train.compile:
            for unit in method.shard_units():
                unit.compile()
        self.model = self.wrap(method)
        groups = method.param_groups(self.cfg.optim.weight_decay)
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
        return contextlib.nullcontext()

    def set_grad_sync(self, enabled: bool) -> None:
        """Whether the next backward reduces gradients across ranks (off for non-final micro-batches)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def params_with_grad(self) -> Iterator[torch.Tensor]:
        return (p for p in self.model.parameters() if p.grad is not None)

    def step(self, max_norm: float | None) -> torch.Tensor:
        """Clip (if ``max_norm``), step the optimizer, zero grads; return the pre-clip global grad norm.

        Stays on the device: no host synchronisation.
        """
        params = list(self.params_with_grad())
        grads = [p.grad for p in params]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(total, DTensor):  # FSDP2: partial norms of the shards -> the global norm
            total = total.full_tensor()
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state for torch.distributed.checkpoint (sharded under FSDP2)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 model state on CPU on rank 0 (empty elsewhere); a collective under FSDP2."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=opts)

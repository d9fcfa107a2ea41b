"""FSDP2 engine: ``fully_shard`` each transformer block, then the root (torch.distributed.fsdp).

Parameters are sharded over all ranks as DTensors; with bf16 the parameters are gathered in bf16
while master weights, optimizer state and gradient reduction stay fp32
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). Inputs are not cast
(``cast_forward_inputs=False``) and the forward runs under the same autocast as the single engine
(``pretrain.precision``), so a method sees the same dtypes under both engines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from pretrain.engines import register_engine
from pretrain.engines.base import Engine
from pretrain.methods.base import Method


@dataclass
class FSDP2Options:
    """``engine.fsdp2``: options of the FSDP2 engine."""

    reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3-like); false ~ ZeRO-2


@register_engine("fsdp2", FSDP2Options)
class FSDP2Engine(Engine):
    @classmethod
    def needs_process_group(cls, world_size: int) -> bool:
        return True  # fully_shard needs a device mesh, even of one rank

    def wrap(self, method: Method) -> nn.Module:
        method.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.env.world_size,))
        mp = MixedPrecisionPolicy(
            param_dtype=self.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        reshard = bool(self.cfg.engine.fsdp2.reshard_after_forward)
        for unit in method.shard_units():
            fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        # The root's parameters are gathered for the whole step anyway: keep them after forward.
        fully_shard(method, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        register_fsdp_forward_method(method, "visualize")  # gathers the root's parameters like forward
        return method

    def set_grad_sync(self, enabled: bool) -> None:
        self.model.set_requires_gradient_sync(enabled)  # type: ignore[operator]

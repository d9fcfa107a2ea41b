"""Single-process engine: the model on one device; mixed precision as the shared policy says."""

from __future__ import annotations

from typing import Any

from torch import nn

from pretrain.engines import register_engine
from pretrain.engines.base import Engine
from pretrain.methods.base import Method


@register_engine("single")
class SingleEngine(Engine):
    @classmethod
    def validate_config(cls, cfg: Any, world_size: int, errors: list[str]) -> None:
        if world_size > 1:
            errors.append(
                f"engine.name=single cannot run on {world_size} ranks; use fsdp2, deepspeed or auto"
            )

    @classmethod
    def needs_process_group(cls, world_size: int) -> bool:
        return False

    def wrap(self, method: Method) -> nn.Module:
        return method.to(self.device)

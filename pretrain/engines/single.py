"""Single-process engine: the model on one device; mixed precision as the shared policy says."""

from __future__ import annotations

from torch import nn

from pretrain.engines.base import Engine
from pretrain.methods.base import Method


class SingleEngine(Engine):
    def wrap(self, method: Method) -> nn.Module:
        return method.to(self.device)

"""Single-process engine: the model on one device, bf16 autocast on CUDA."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pretrain.engines.base import Engine
from pretrain.methods.base import Method


class SingleEngine(Engine):
    def wrap(self, method: Method) -> nn.Module:
        return method.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

"""Run pretrain.train with a method whose loss is NaN on one rank only at one step.

usage: torchrun --nproc_per_node 2 tests/helpers/train_with_nan.py BAD_RANK BAD_STEP --config ... [key=value ...]
The method is the real MAE with one change, registered under a test-only name, so the trainer,
engine and checkpoint code under test are exactly the production ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import train
from pretrain.methods import register_method
from pretrain.methods.mae import MAE, MAEConfig

BAD_RANK, BAD_STEP = int(sys.argv[1]), int(sys.argv[2])


class NaNConfig(MAEConfig):
    pass


@register_method("mae_nan_test", config=NaNConfig)
class MAEWithNaN(MAE):
    def forward(self, batch, ctx):
        out = super().forward(batch, ctx)
        if ctx.step == BAD_STEP and int(os.environ.get("RANK", "0")) == BAD_RANK:
            out["loss"] = out["loss"] * torch.tensor(float("nan"))
        return out


if __name__ == "__main__":
    sys.exit(train.main(sys.argv[3:]))

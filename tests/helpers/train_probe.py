"""Run pretrain.train with a probe method: the real MAE plus what the method contract offers.

usage: [torchrun --nproc_per_node N] tests/helpers/train_probe.py --config ... [key=value ...]

The probe (method.name=mae_probe) uses every hook of the contract and records, in
<run dir>/probe.<rank>.jsonl, what it saw: the dtypes of its inputs, of a matmul in the compute region
and of its loss region; the step context; the learning rate of each optimizer group at every update
(read in before_optimizer_step). The trainer, engines and checkpoints under test are the production ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import train
from pretrain.methods import register_method
from pretrain.methods.context import RunInfo, StepContext
from pretrain.methods.mae import MAE, MAEConfig
from pretrain.precision import full_precision


class ProbeConfig(MAEConfig):
    pass


@register_method("mae_probe", config=ProbeConfig)
class MAEProbe(MAE):
    """MAE whose groups' lr multipliers change at step 2, and which logs a float metric."""

    def configure(self, run: RunInfo) -> None:
        self.run_info = run
        self.records: list[dict] = []
        self.frozen = torch.nn.Dropout(0.5)  # a sub-module that must stay in eval mode

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.frozen] if hasattr(self, "frozen") else []

    def group_scales(self, step: int) -> list[tuple[float, float]]:
        return [(1.0 if step < 2 else 0.5, 1.0), (0.1, 0.0)]

    def forward(self, batch, ctx: StepContext):
        imgs = batch["images"][0]
        weight = self.decoder_pred.weight
        y = imgs.flatten(1)[:, : weight.shape[1]] @ weight.t()  # a matmul in the compute region
        out = super().forward(batch, ctx)
        with full_precision(imgs):
            region = (imgs.float() * 2).sum()
        self._record(
            kind="forward",
            step=ctx.step,
            micro=ctx.micro,
            num_micro=ctx.num_micro,
            input_dtype=str(imgs.dtype),
            matmul_dtype=str(y.dtype),
            full_precision_dtype=str(region.dtype),
            loss_dtype=str(out["loss"].dtype),
            frozen_training=self.frozen.training,
            steps_per_epoch=ctx.run.steps_per_epoch,
            total_steps=ctx.run.total_steps,
        )
        return {**out, "probe_float": 0.25}

    def before_optimizer_step(self, ctx: StepContext) -> None:
        # After the last micro-batch's backward (gradients present), before the update.
        self._record(
            kind="before_update",
            step=ctx.step,
            micro=ctx.micro,
            has_grad=self.decoder_pred.weight.grad is not None,
        )

    def after_optimizer_step(self, ctx: StepContext) -> None:
        self._record(kind="after_update", step=ctx.step, has_grad=self.decoder_pred.weight.grad is not None)

    def _record(self, **fields) -> None:
        path = Path(os.environ["PROBE_OUT"]) / f"probe.{os.environ.get('RANK', '0')}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


_original_step = torch.optim.AdamW.step


def _recording_step(self, *args, **kwargs):
    path = Path(os.environ["PROBE_OUT"]) / f"probe.{os.environ.get('RANK', '0')}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "update", "lrs": [g["lr"] for g in self.param_groups]}) + "\n")
    return _original_step(self, *args, **kwargs)


torch.optim.AdamW.step = _recording_step

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))

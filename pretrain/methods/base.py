"""The contract between a method and the trainer.

The trainer calls only what is defined here:

* once: ``configure(run)`` (the run's facts: total steps, steps per epoch, ...; recipes written in
  epochs are converted here), ``views()``, ``param_groups()``, ``shard_units()``,
  ``flops_per_sample()``;
* every micro-batch: ``forward(batch, ctx) -> {"loss": tensor, other metrics (tensors or floats)}``;
* every step: ``before_optimizer_step(ctx)`` (after backward and clipping, before the update: e.g.
  cancel some gradients), ``group_scales(step)`` (per-group lr / weight-decay multipliers),
  ``after_optimizer_step(ctx)`` (EMA teachers, centers);
* now and then: ``visualize(batch, ctx)``, ``export_backbone(state)``; ``backbone()`` /
  ``load_backbone()`` start a run from pretrained weights (``init.from``).

Heads, losses, EMA teachers and a method's own schedules live inside the method; what it needs from
the run comes through :mod:`pretrain.methods.context` (never from engine internals). Modules listed by
``frozen_modules()`` stay in eval mode while the rest trains (an EMA teacher: no drop path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from data_pipelines.augment import ViewSpec
from pretrain.methods.context import RunInfo, StepContext

# Parameters never decayed, whatever method owns them (Loshchilov & Hutter, 2019; MAE/DINO recipes):
# position embeddings and learned tokens. Norm weights and biases are excluded by ndim <= 1.
NO_WEIGHT_DECAY_LEAVES = frozenset({"pos_embed", "cls_token", "mask_token", "decoder_pos_embed", "reg_token"})


@dataclass
class MethodConfigBase:
    """Fields every method config has. A method's config dataclass subclasses this."""

    name: str = ""

    @staticmethod
    def validate(cfg: Any) -> list[str]:
        """Cross-field checks involving the method; return error strings (empty when valid)."""
        return []


class Method(nn.Module):
    """Base class of pretraining methods (one subclass per file in ``pretrain/methods``)."""

    method_name: ClassVar[str] = ""

    def configure(self, run: RunInfo) -> None:
        """Called once before training with the run's facts (convert epoch-based recipe values here).

        Raise ``ValueError`` (e.g. :class:`~pretrain.methods.context.EpochsUnknownError`) for a recipe
        this run cannot follow; the run then stops with exit code 2 before anything is written.
        """

    def views(self) -> list[ViewSpec]:
        """The augmented views the data pipeline must produce, in the order ``batch["images"]`` holds them."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        """One micro-batch: ``{"loss": scalar tensor, other scalar metrics (tensors or floats)...}``.

        The trainer averages every entry over micro-batches, log interval and ranks, and logs it as
        ``train/<name>``. Inputs arrive in float32 whatever the precision; see
        :mod:`pretrain.engines.precision` for what runs in bf16.
        """
        raise NotImplementedError

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """After the last micro-batch's backward and the clipping, before the optimizer's update."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """After each optimizer step (EMA teacher updates, centers, schedules owned by the method)."""

    def group_scales(self, step: int) -> list[tuple[float, float]] | None:
        """Per optimizer group (in :meth:`param_groups` order): (lr multiplier, weight-decay multiplier)
        at ``step``; None: the static ``lr_scale`` / ``wd_scale`` of :meth:`param_groups`.

        A pure function of the step, so it holds after any resume (nothing is read back from the
        optimizer's saved groups).
        """
        return None

    def frozen_modules(self) -> list[nn.Module]:
        """Sub-modules that never train (an EMA teacher): kept in eval mode by :meth:`train`."""
        return []

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def shard_units(self) -> list[nn.Module]:
        """Sub-modules to shard/wrap individually (transformer blocks), before the root."""
        raise NotImplementedError

    def flops_per_sample(self) -> float:
        """Model FLOPs of one training sample (forward + backward, 2 FLOPs per multiply-add)."""
        raise NotImplementedError

    def export_backbone(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """Map the method's full state dict to the eval backbone (timm names) and a JSON description."""
        raise NotImplementedError

    def visualize(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Images for TensorBoard from a fixed batch: ``{tag: float [N, 3, H, W] in [0, 1]}``.

        Called every ``train.visualize_every`` steps on every rank (under FSDP2 it runs like
        ``forward``, gathering parameters), in eval mode without gradients; rank 0 writes the images
        off the training thread. The default shows nothing.
        """
        return {}

    def backbone(self) -> nn.Module:
        """The image encoder whose state dict has timm's names (what :meth:`export_backbone` exports)."""
        raise NotImplementedError

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Start from pretrained encoder weights (timm names, shapes checked by the caller).

        Methods holding a second copy of the encoder (an EMA teacher) override this to set both.
        """
        self.backbone().load_state_dict(state, strict=True)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no decay on norms, biases, position embeddings and tokens.

        Each group may carry ``lr_scale`` / ``wd_scale`` (default 1.0) multiplying the scheduled values;
        :meth:`group_scales` can make them depend on the step.
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY_LEAVES:
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
        ]

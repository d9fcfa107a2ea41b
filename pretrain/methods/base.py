"""The contract between a method and the trainer.

The trainer calls only what is defined here: ``forward(batch, step, rng) -> {"loss": ..., metrics}``,
``after_optimizer_step(step)``, ``param_groups()``, ``shard_units()``, ``export_backbone()``,
``flops_per_sample()``, ``views()`` and ``visualize()``; ``backbone()`` / ``load_backbone()`` start a
run from pretrained weights (``init.from``). Heads, losses, EMA teachers and a method's own
schedules live inside the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from data_pipelines.augment import ViewSpec
from pretrain.randomness import BatchRandom

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

    def views(self) -> list[ViewSpec]:
        """The augmented views the data pipeline must produce, in the order ``batch["images"]`` holds them."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], step: int, rng: BatchRandom) -> dict[str, torch.Tensor]:
        """One micro-batch: return ``{"loss": scalar tensor, other scalar metrics...}`` (device tensors)."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Hook after each optimizer step (EMA teacher updates, schedules owned by the method)."""

    def shard_units(self) -> list[nn.Module]:
        """Sub-modules to shard/wrap individually (transformer blocks), before the root."""
        raise NotImplementedError

    def flops_per_sample(self) -> float:
        """Model FLOPs of one training sample (forward + backward, 2 FLOPs per multiply-add)."""
        raise NotImplementedError

    def export_backbone(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """Map the method's full state dict to the eval backbone (timm names) and a JSON description."""
        raise NotImplementedError

    def visualize(self, batch: dict[str, Any], rng: BatchRandom) -> dict[str, torch.Tensor]:
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
        """AdamW groups: no decay on norms, biases, position embeddings and tokens."""
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

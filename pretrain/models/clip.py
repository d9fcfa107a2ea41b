"""The CLIP model: an image tower in timm's CLIP ViT layout, the causal text tower, two projections and a
learnable logit scale (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Fig. 3 and §2.4-2.5). Training (:mod:`pretrain.methods.clip`) and evaluation
(:mod:`evals.clip`) build exactly this module.

Image tower: :class:`ClipVisionTransformer`, the ViT with LayerNorm eps 1e-5 in timm's ``vit_*_clip_*``
layout (timm's ``pre_norm=True``: a LayerNorm ``norm_pre`` after the position embedding -- OpenAI's
``ln_pre`` --, a patch embedding without bias, the final ``norm``), so ``visual.state_dict()`` loads with ``strict=True`` into
``timm.create_model("vit_base_patch32_clip_224", num_classes=0)`` (and the other sizes), and with
``head.weight = visual_proj.weight``, ``head.bias = 0`` into the same model with ``num_classes=E``.

Embeddings (CLIP's pseudo-code, Fig. 3)::

    image_embedding = l2_normalize(visual_proj(norm(vit(x))[:, 0]))        # [B, E]
    text_embedding  = l2_normalize(text_proj(ln_final(text(tokens))[eot])) # [B, E]
    logits          = exp(clamp(logit_scale, 0, ln 100)) * image_embedding @ text_embedding.T

``logit_scale`` starts at ``ln(1 / 0.07)`` and is stored with shape ``[1]`` (FSDP2 cannot shard a 0-dim
parameter); the projections have no bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.text import TextSpec, TextTransformer, default_logit_scale
from pretrain.models.vit import VisionTransformer, create_vit, vit_architecture

__all__ = [
    "CLIP_MAX_LOGIT_SCALE",
    "ClipModel",
    "ClipVisionTransformer",
    "clip_tensor_names",
    "create_image_tower",
]

CLIP_MAX_LOGIT_SCALE = math.log(100.0)  # "clipped to prevent scaling the logits by more than 100" (§2.5)


class ClipVisionTransformer(VisionTransformer):
    """The ViT in timm's CLIP layout: ``norm_pre`` on the token sequence (class token included) before
    the blocks, and no bias in the patch embedding (timm ``VisionTransformer(pre_norm=True)``).

    Takes :class:`~pretrain.models.vit.VisionTransformer`'s arguments; every entry point (``forward_features``,
    ``forward_tokens`` on a subset of patches, ``get_intermediate_layers``) applies ``norm_pre``, because
    all of them put the class token in front through ``_prepend_cls``.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        proj = self.patch_embed.proj
        self.patch_embed.proj = nn.Conv2d(
            proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride, bias=False
        )  # timm: PatchEmbed(bias=not pre_norm); PyTorch's default init, as timm leaves it
        self.norm_pre = nn.LayerNorm(self.embed_dim, eps=self.norm.eps)

    def _prepend_cls(self, tokens: Tensor) -> Tensor:
        return self.norm_pre(super()._prepend_cls(tokens))  # [B, 1+T, D]


def create_image_tower(name: str, pre_norm: bool = False, **overrides: object) -> VisionTransformer:
    """A registered ViT (``create_vit``), in timm's CLIP layout when ``pre_norm`` (:class:`ClipVisionTransformer`).

    Args:
        name: one of ``pretrain.models.list_vits()``.
        pre_norm: timm's CLIP layout.
        **overrides: ``VisionTransformer`` arguments (validated by ``create_vit``).
    """
    if not pre_norm:
        return create_vit(name, **overrides)  # type: ignore[arg-type]
    return ClipVisionTransformer(**{**vit_architecture(name), **overrides})  # the name checked there


class ClipModel(nn.Module):
    """Image tower + text tower + projections + logit scale (see the module docstring).

    Args:
        visual: the image ViT (``pre_norm=True`` for timm's CLIP layout).
        text_spec: text tower hyper-parameters.
        embed_dim: joint embedding width ``E``.
        init_logit_scale: initial ``logit_scale`` (CLIP: ``ln(1 / 0.07)``).
    """

    def __init__(
        self,
        visual: VisionTransformer,
        text_spec: TextSpec,
        embed_dim: int,
        init_logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim={embed_dim} must be >= 1")
        self.visual = visual
        self.visual_proj = nn.Linear(visual.embed_dim, embed_dim, bias=False)
        self.text = TextTransformer(text_spec)
        self.text_proj = nn.Linear(text_spec.width, embed_dim, bias=False)
        init = default_logit_scale() if init_logit_scale is None else float(init_logit_scale)
        self.logit_scale = nn.Parameter(torch.full((1,), init))  # [1]: shardable by FSDP2
        self.init_projections()

    @property
    def embed_dim(self) -> int:
        """Joint embedding width ``E``."""
        return self.visual_proj.out_features

    @torch.no_grad()
    def init_projections(self) -> None:
        """N(0, width^-1/2) for both projections, as OpenCLIP (``visual.proj``, ``text_projection``)."""
        nn.init.normal_(self.visual_proj.weight, std=self.visual.embed_dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text.spec.width**-0.5)

    def image_features(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Projected, unnormalised image features ``[B, E]``.

        Args:
            images: ``[B, 3, S, S]``.
            keep: patch indices ``[B, K]`` to encode (FLIP's patch dropout); None: every patch.
        """
        tokens = self.visual.embed_patches(images)  # [B, L, D] with position embedding
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # [B, K, D]
        pooled = self.visual.forward_tokens(tokens)[:, 0]  # [B, D]: class token after the final norm
        return self.visual_proj(pooled)  # [B, E]

    def text_features(self, tokens: Tensor) -> Tensor:
        """Projected, unnormalised text features ``[B, E]`` of token ids ``[B, T]``."""
        return self.text_proj(self.text(tokens))

    def encode_image(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]`` -> L2-normalised float32 embeddings ``[B, E]``."""
        return F.normalize(self.image_features(images).float(), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Token ids ``[B, T]`` -> L2-normalised float32 embeddings ``[B, E]``."""
        return F.normalize(self.text_features(tokens).float(), dim=-1)

    def scale(self, max_logit_scale: float = CLIP_MAX_LOGIT_SCALE) -> Tensor:
        """``exp(clamp(logit_scale, 0, max))`` in float32, shape ``[]``."""
        return self.logit_scale.float().clamp(0.0, max_logit_scale).exp().squeeze(0)

    def head_state_dict(self) -> dict[str, Tensor]:
        """The tensors of ``clip.safetensors``: everything but the image ViT."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("visual.")}


def clip_tensor_names(text_depth: int) -> list[str]:
    """The names ``clip.safetensors`` holds for a text tower of ``text_depth`` blocks (documentation, tests)."""
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    names = ["visual_proj.weight", "text_proj.weight", "logit_scale"]
    names += [
        "text.token_embedding.weight",
        "text.positional_embedding",
        "text.ln_final.weight",
        "text.ln_final.bias",
    ]
    names += [
        f"text.blocks.{i}.{m}.{p}" for i in range(text_depth) for m in block for p in ("weight", "bias")
    ]
    return names

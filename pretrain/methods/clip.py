"""CLIP: contrastive language-image pretraining (Radford et al., ICML 2021, "Learning Transferable Visual
Models From Natural Language Supervision", arXiv:2103.00020), as trained at scale by OpenCLIP (Ilharco et
al., 2021; Cherti et al., CVPR 2023, "Reproducible scaling laws for contrastive language-image learning"),
with FLIP's patch dropout (Li et al., CVPR 2023, "Scaling Language-Image Pre-training via Masking").

An image tower (timm's CLIP ViT layout) and a causal text tower (:mod:`pretrain.models.text`) are projected
to a shared ``E``-dimensional space and L2-normalised; a learnable logit scale (initialised at
``ln(1 / 0.07)``, clamped to ``[0, ln 100]``) multiplies the cosine similarities, and the loss is the
symmetric cross-entropy over the batch (Fig. 3)::

    logits = exp(t) * I_e @ T_e.T              # [n, n]
    loss   = (CE(logits, arange(n), axis=0) + CE(logits, arange(n), axis=1)) / 2

**Gathered local loss** (OpenCLIP ``ClipLoss(local_loss=True, gather_with_grad=True)``): every rank gathers
the normalised features of all ranks *with gradients* and computes only its own rows, image-to-text
``I_local @ T_all.T`` and text-to-image ``T_local @ I_all.T`` with labels ``arange(b) + rank * b``: memory
linear in the global batch, and the mean of the ranks' losses is exactly the single-process loss on the
global batch. The gather's backward sums every rank's contribution into the rows a rank owns, and the
engine averages gradients over ranks, so the gradients equal the single-process ones too.

Every contrastive computation (normalisation, logits, softmax cross-entropy, the scale) runs in float32
under :func:`~pretrain.precision.full_precision`; the towers run in the compute dtype.

Values follow the CLIP paper (Table 20: batch 32,768, AdamW (0.9, 0.98), eps 1e-6, weight decay 0.2,
2,000 warmup steps, cosine; maximum temperature 100) and OpenCLIP's training code (``open_clip_train``:
``RandomResizedCrop(scale=(0.9, 1.0))``, the weight-decay exclusions, the clamp after every step); see
``configs/clip/``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipelines.augment import ViewSpec, clip_views
from pretrain.export import vit_backbone_meta
from pretrain.methods import register_method
from pretrain.methods.base import NO_WEIGHT_DECAY_LEAVES, Method, MethodConfigBase
from pretrain.methods.context import RunInfo, StepContext
from pretrain.models import vit_kwargs
from pretrain.models.clip import CLIP_MAX_LOGIT_SCALE, ClipModel, create_image_tower
from pretrain.models.flops import linear_flops, transformer_flops, vit_encoder_flops
from pretrain.models.text import TextSpec
from pretrain.precision import full_precision

# The image tower's LayerNorm epsilon in CLIP (OpenAI's and OpenCLIP's nn.LayerNorm default; timm's
# vit_*_clip_* models use nn.LayerNorm too).
CLIP_NORM_EPS = 1e-5


@dataclass
class CLIPConfig(MethodConfigBase):
    name: str = "clip"
    embed_dim: int = 512  # joint embedding width E (CLIP Table 19/20: 512 for ViT-B, 768 for ViT-L/14)
    text_width: int = 512  # text tower width (ViT-B: 512, ViT-L/14: 768)
    text_depth: int = 12
    text_heads: int = 8  # width / 64
    text_mlp_ratio: float = 4.0
    vocab_size: int = 49408  # CLIP's byte-level BPE
    init_logit_scale: float = math.log(1 / 0.07)  # temperature 0.07 at init (§2.5)
    max_logit_scale: float = CLIP_MAX_LOGIT_SCALE  # logits scaled by at most 100 (§2.5)
    patch_dropout: float = 0.0  # FLIP: share of patches dropped in training (0.5: half the image cost)
    crop_scale: list[float] | None = None  # RandomResizedCrop area; None: [0.9, 1.0] (OpenCLIP)

    @staticmethod
    def validate(cfg: Any) -> list[str]:
        m = cfg.method
        errors = []
        if not cfg.data.text_key:
            errors.append(
                "method.name=clip needs captions: set data.text_key to the caption member of the shards "
                "(e.g. data.text_key=txt, as build_shards and img2dataset write them)"
            )
        for problem in _text_spec(cfg).validate():  # "width=..." -> "method.text_width=..."
            field, rest = problem.split("=", 1)
            errors.append(f"{_TEXT_KEYS.get(field, 'method.' + field)}={rest}")
        if m.embed_dim < 1:
            errors.append(f"method.embed_dim={m.embed_dim} must be >= 1")
        if not 0.0 <= m.patch_dropout < 1.0:
            errors.append(f"method.patch_dropout={m.patch_dropout} must be in [0, 1) (FLIP uses 0.5)")
        if not 0.0 <= m.init_logit_scale <= m.max_logit_scale:
            errors.append(
                f"method.init_logit_scale={m.init_logit_scale} must be in [0, method.max_logit_scale="
                f"{m.max_logit_scale}] (CLIP: ln(1/0.07) = 2.659 and ln(100) = 4.605)"
            )
        if m.crop_scale is not None and not (
            len(m.crop_scale) == 2 and 0 < m.crop_scale[0] <= m.crop_scale[1] <= 1
        ):
            errors.append(
                f"method.crop_scale={list(m.crop_scale)} must be [low, high] with 0 < low <= high <= 1"
            )
        if cfg.train.accum_steps != 1:
            errors.append(
                f"train.accum_steps={cfg.train.accum_steps}: CLIP's contrastive loss takes its negatives from the "
                "batch, so accumulating micro-batches would shrink them to one micro-batch per rank (not the "
                "global batch the recipe names); use train.accum_steps=1 and more ranks, or "
                "model.grad_checkpointing=true to fit a larger per-rank batch"
            )
        return errors


# Field of TextSpec -> the config key that sets it (for error messages).
_TEXT_KEYS = {
    "width": "method.text_width",
    "depth": "method.text_depth",
    "num_heads": "method.text_heads",
    "mlp_ratio": "method.text_mlp_ratio",
    "vocab_size": "method.vocab_size",
    "context_length": "data.context_length",
}


def _text_spec(cfg: Any) -> TextSpec:
    m = cfg.method
    return TextSpec(
        vocab_size=int(m.vocab_size),
        context_length=int(cfg.data.context_length),
        width=int(m.text_width),
        depth=int(m.text_depth),
        num_heads=int(m.text_heads),
        mlp_ratio=float(m.text_mlp_ratio),
    )


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    rank: int = 0,
    max_logit_scale: float = CLIP_MAX_LOGIT_SCALE,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CLIP's symmetric InfoNCE in the local-loss form (float32; see the module docstring).

    Args:
        image_features: this rank's L2-normalised image embeddings ``[b, E]``.
        text_features: this rank's L2-normalised text embeddings ``[b, E]`` (row i pairs with image i).
        logit_scale: the learnable log scale (``[1]`` or ``[]``), clamped to ``[0, max_logit_scale]`` here.
        all_image_features: every rank's image embeddings ``[W b, E]`` in rank order (None: the local ones).
        all_text_features: every rank's text embeddings ``[W b, E]`` (None: the local ones).
        rank: this rank (its rows are ``rank * b .. rank * b + b - 1`` of the gathered features).
        max_logit_scale: the clamp (CLIP: ln 100).

    Returns:
        The loss (mean over this rank's rows of both directions, halved), and metrics: the scale and the
        image-to-text / text-to-image top-1 accuracy of this rank's rows.
    """
    all_i = image_features if all_image_features is None else all_image_features
    all_t = text_features if all_text_features is None else all_text_features
    b = image_features.shape[0]
    scale = logit_scale.float().clamp(0.0, max_logit_scale).exp().reshape(())
    logits_per_image = scale * image_features.float() @ all_t.float().T  # [b, W b]
    logits_per_text = scale * text_features.float() @ all_i.float().T  # [b, W b]
    labels = torch.arange(b, device=image_features.device) + rank * b
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():
        metrics = {
            "logit_scale": scale.detach(),
            "acc_i2t": (logits_per_image.argmax(dim=1) == labels).float().mean(),
            "acc_t2i": (logits_per_text.argmax(dim=1) == labels).float().mean(),
        }
    return loss, metrics


def num_kept_patches(num_patches: int, patch_dropout: float) -> int:
    """Patches each image keeps under patch dropout: ``max(1, int(L * (1 - p)))`` (OpenCLIP's PatchDropout)."""
    if patch_dropout <= 0.0:
        return num_patches
    return max(1, int(num_patches * (1.0 - patch_dropout)))


@register_method("clip", config=CLIPConfig)
class CLIP(Method):
    """Contrastive image-text pretraining of a ViT and a text Transformer (Radford et al., 2021)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        mcfg, model_cfg = cfg.method, cfg.model
        visual = create_image_tower(
            model_cfg.name,
            pre_norm=True,  # timm's CLIP ViT layout (OpenAI's ln_pre)
            norm_eps=CLIP_NORM_EPS,
            **vit_kwargs(model_cfg),
        )
        self.clip = ClipModel(visual, _text_spec(cfg), int(mcfg.embed_dim), float(mcfg.init_logit_scale))
        if model_cfg.grad_checkpointing:
            self.clip.visual.set_grad_checkpointing(True)
            self.clip.text.set_grad_checkpointing(True)
        self.model_name = model_cfg.name
        self.max_logit_scale = float(mcfg.max_logit_scale)
        self.patch_dropout = float(mcfg.patch_dropout)
        self.crop_scale = tuple(mcfg.crop_scale) if mcfg.crop_scale is not None else (0.9, 1.0)
        self._global_batch = 0  # known after configure(): the width of the gathered logits

    # ---- contract with the trainer -------------------------------------------------------------
    def configure(self, run: RunInfo) -> None:
        self._global_batch = run.global_batch_size

    def views(self) -> list[ViewSpec]:
        """OpenCLIP's training view: RandomResizedCrop(scale 0.9-1, bicubic), no flip, CLIP normalisation."""
        return clip_views(self.clip.visual.img_size[0], self.crop_scale)

    def shard_units(self) -> list[nn.Module]:
        return [*self.clip.visual.blocks, *self.clip.text.blocks]

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor | float]:
        if "text" not in batch:
            raise ValueError("CLIP needs captions in the batch ('text'): set data.text_key (e.g. txt)")
        images, tokens = batch["images"][0], batch["text"]  # [b, 3, S, S], [b, T]
        keep = self._kept_patches(images.shape[0], ctx) if self.training else None
        image = self.clip.image_features(images, keep)  # [b, E], compute dtype
        text = self.clip.text_features(tokens)  # [b, E]
        with full_precision(image):
            image = F.normalize(image.float(), dim=-1)
            text = F.normalize(text.float(), dim=-1)
            all_image = ctx.dist.all_gather_with_grad(image)  # [W b, E], gradients to each rank's rows
            all_text = ctx.dist.all_gather_with_grad(text)
            loss, metrics = clip_loss(
                image, text, self.clip.logit_scale, all_image, all_text, ctx.run.rank, self.max_logit_scale
            )
        return {"loss": loss, **metrics}

    def _kept_patches(self, batch: int, ctx: StepContext) -> Tensor | None:
        """FLIP's random patch subset per image (``[b, K]``), drawn from the step's world-size-free noise."""
        if self.patch_dropout <= 0.0:
            return None
        num_patches = self.clip.visual.num_patches
        noise = ctx.rng.rand(batch, num_patches)  # [b, L]
        return torch.argsort(noise, dim=1)[:, : num_kept_patches(num_patches, self.patch_dropout)]

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Clamp the logit scale in place after each update, as OpenCLIP (``logit_scale.clamp_(0, ln 100)``).

        Elementwise on the local values (an FSDP2 shard of the ``[1]`` parameter): no communication.
        """
        self.clip.logit_scale.clamp_(0.0, self.max_logit_scale)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay on weight matrices; none on gains, biases, the logit scale and embeddings.

        Gains and biases (CLIP §2.5: weight decay on "all weights that are not gains or biases") and the
        logit scale are the ``ndim <= 1`` tensors, as OpenCLIP's exclusion; the image tower's ``cls_token`` /
        ``pos_embed`` and the text tower's token and position embeddings are excluded as every method's
        position embeddings and tokens are (:data:`~pretrain.methods.base.NO_WEIGHT_DECAY_LEAVES`).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            embedding = "token_embedding" in name or leaf in NO_WEIGHT_DECAY_LEAVES | {"positional_embedding"}
            (no_decay if p.ndim <= 1 or embedding else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
        ]

    def backbone(self) -> nn.Module:
        return self.clip.visual

    def flops_per_sample(self) -> float:
        """Both towers, forward + backward (3x forward), with the kept patches under patch dropout.

        Image: patch embedding of every patch, the blocks on ``1 + K`` tokens, the projection. Text: the
        blocks on the full context (counted as full attention, like every count here), the projection of
        the pooled token. Logits: ``b x (W b)`` products in each direction, i.e. ``2 * 2 * E * B`` per sample
        for a global batch ``B`` (0 before :meth:`configure` tells the batch).
        """
        visual, spec = self.clip.visual, self.clip.text.spec
        kept = num_kept_patches(visual.num_patches, self.patch_dropout)
        fwd = vit_encoder_flops(
            1 + kept,
            visual.embed_dim,
            visual.depth,
            visual.mlp_ratio,
            patch_size=visual.patch_size,
            num_embedded_patches=visual.num_patches,
        )
        fwd += linear_flops(1, visual.embed_dim, self.clip.embed_dim)
        fwd += transformer_flops(spec.context_length, spec.width, spec.depth, spec.mlp_ratio)
        fwd += linear_flops(1, spec.width, self.clip.embed_dim)
        fwd += 2 * 2 * self.clip.embed_dim * self._global_batch
        return 3.0 * fwd

    def export_backbone(
        self, state_dict: dict[str, Tensor]
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """The image tower (timm names) as ``backbone``, the rest of the model as ``clip`` (see
        :mod:`pretrain.models.clip`); the JSON adds the CLIP layout and the text tower's spec."""
        visual_prefix, prefix = "clip.visual.", "clip."
        backbone = {k[len(visual_prefix) :]: v for k, v in state_dict.items() if k.startswith(visual_prefix)}
        heads = {
            k[len(prefix) :]: v
            for k, v in state_dict.items()
            if k.startswith(prefix) and not k.startswith(visual_prefix)
        }
        visual, view = self.clip.visual, self.views()[0]
        meta = vit_backbone_meta("clip", self.model_name, visual, view)
        meta.update(
            pre_norm=True,
            norm_eps=CLIP_NORM_EPS,
            clip={"embed_dim": self.clip.embed_dim, "text": asdict(self.clip.text.spec)},
        )
        return {"backbone": backbone, "clip": heads}, meta

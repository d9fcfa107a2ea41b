"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022, arXiv:2111.06377).

Per-sample random masking of a fixed fraction of patches (75 %), a ViT encoder that sees only the
visible patches, a light decoder (8 blocks x 512 wide for ViT-L in the paper) that receives the
encoded visible tokens plus a shared learned mask token at every masked position, fixed 2-D sin-cos
position embeddings in encoder and decoder, and a mean-squared error on the masked patches only,
against per-patch normalized pixels (``norm_pix_loss``). Values follow the paper and the authors'
repository (facebookresearch/mae: models_mae.py, PRETRAIN.md); see configs/mae/vit_l16_in1k.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from data_pipelines.augment import ViewSpec, mae_views
from pretrain.export import vit_backbone_meta
from pretrain.methods import register_method
from pretrain.methods.base import Method, MethodConfigBase
from pretrain.methods.context import StepContext
from pretrain.models import Block, create_vit, vit_kwargs
from pretrain.models.flops import transformer_block_flops
from pretrain.models.pos_embed import get_2d_sincos_pos_embed
from pretrain.randomness import BatchRandom


@dataclass
class MAEConfig(MethodConfigBase):
    name: str = "mae"
    mask_ratio: float = 0.75  # fraction of patches masked per sample (paper §4, Fig. 5)
    decoder_embed_dim: int = 512  # paper Table 1a/1b: 8 blocks x 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True  # per-patch normalized pixel targets (paper Table 1c)
    crop_scale: list[float] | None = (
        None  # RandomResizedCrop area range; None: [0.2, 1.0] (repo main_pretrain.py)
    )
    hflip_p: float = 0.5

    @staticmethod
    def validate(cfg: Any) -> list[str]:
        m = cfg.method
        errors = []
        if not 0.0 < m.mask_ratio < 1.0:
            errors.append(f"method.mask_ratio={m.mask_ratio} must be in (0, 1)")
        if m.decoder_embed_dim % m.decoder_num_heads:
            errors.append(
                f"method.decoder_embed_dim={m.decoder_embed_dim} must be divisible by "
                f"method.decoder_num_heads={m.decoder_num_heads}"
            )
        if m.crop_scale is not None and not (
            len(m.crop_scale) == 2 and 0 < m.crop_scale[0] <= m.crop_scale[1] <= 1
        ):
            errors.append(
                f"method.crop_scale={list(m.crop_scale)} must be [low, high] with 0 < low <= high <= 1"
            )
        return errors


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches masked per sample: ``round(mask_ratio * L)`` (the same count for every sample)."""
    return round(mask_ratio * num_patches)


def random_masking(noise: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE §3: "random sampling").

    Args:
        noise: ``[B, L]`` uniform noise; the ``L - num_masked`` smallest entries are kept.
        num_masked: patches to mask per sample.

    Returns:
        ids_keep ``[B, L_keep]`` (indices of visible patches), mask ``[B, L]`` (1 = masked, 0 = visible),
        ids_restore ``[B, L]`` (undoes the shuffle).
    """
    batch, length = noise.shape
    len_keep = length - num_masked
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, length, device=noise.device, dtype=noise.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return ids_keep, mask, ids_restore


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, L, p*p*C]`` in row-major patch order, pixels (p, p, C) within a patch."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch, w // patch
    x = imgs.reshape(b, c, gh, patch, gw, patch)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, L, p*p*C] -> [B, C, H, W]``."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, chans)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, chans, gh * patch, gw * patch)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error on masked patches (MAE §3 "Reconstruction target").

    Args:
        pred: ``[B, L, p*p*C]`` decoder output.
        target: ``[B, L, p*p*C]`` patchified input pixels.
        mask: ``[B, L]`` with 1 on masked patches.
        norm_pix: normalize each target patch by its own mean and variance (as the authors' code,
            unbiased variance, eps 1e-6).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, L]
    return (per_patch * mask).sum() / mask.sum()


@register_method("mae", config=MAEConfig)
class MAE(Method):
    """Masked autoencoder around a timm-layout ViT encoder (He et al., 2022)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        mcfg, model_cfg = cfg.method, cfg.model
        self.encoder = create_vit(model_cfg.name, **vit_kwargs(model_cfg))
        if model_cfg.grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.model_name = model_cfg.name
        self.mask_ratio = float(mcfg.mask_ratio)
        self.norm_pix_loss = bool(mcfg.norm_pix_loss)
        self.crop_scale = tuple(mcfg.crop_scale) if mcfg.crop_scale is not None else (0.2, 1.0)
        self.hflip_p = float(mcfg.hflip_p)
        enc = self.encoder
        self.patch_size = enc.patch_size
        self.num_patches = enc.num_patches
        self.in_chans = 3
        dim, ddim = enc.embed_dim, int(mcfg.decoder_embed_dim)

        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, ddim), requires_grad=False
        )  # fixed sin-cos
        self.decoder_blocks = nn.ModuleList(
            Block(ddim, int(mcfg.decoder_num_heads), float(mcfg.decoder_mlp_ratio), qkv_bias=True)
            for _ in range(int(mcfg.decoder_depth))
        )
        self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.decoder_pred = nn.Linear(ddim, self.patch_size**2 * self.in_chans)
        self._decoder_depth, self._decoder_dim = int(mcfg.decoder_depth), ddim
        self._decoder_mlp_ratio = float(mcfg.decoder_mlp_ratio)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the authors' models_mae.py: fixed sin-cos decoder positions, xavier-uniform Linear and
        # patch-embedding weights (the conv treated as a Linear), normal(.02) tokens, zero biases.
        grid = self.encoder.grid_size
        with torch.no_grad():
            pos = get_2d_sincos_pos_embed(self._decoder_dim, grid, cls_token=True)
            self.decoder_pos_embed.copy_(torch.as_tensor(pos, dtype=torch.float32).unsqueeze(0))
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- contract with the trainer -------------------------------------------------------------
    def views(self) -> list[ViewSpec]:
        """The paper's one view (RandomResizedCrop, bicubic, + flip) at the encoder's resolution."""
        return mae_views(self.encoder.img_size[0], self.crop_scale, hflip_p=self.hflip_p)

    def shard_units(self) -> list[nn.Module]:
        return [*self.encoder.blocks, *self.decoder_blocks]

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        imgs = batch["images"][0]  # [B, C, H, W], normalized
        pred, mask, target = self._reconstruct(imgs, ctx.rng)
        loss = mae_loss(pred, target, mask, self.norm_pix_loss)
        return {"loss": loss}

    def _reconstruct(
        self, imgs: torch.Tensor, rng: BatchRandom
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode the visible patches, decode all: (pred ``[B, L, p*p*C]``, mask ``[B, L]``, target)."""
        b = imgs.shape[0]
        num_masked = num_masked_patches(self.num_patches, self.mask_ratio)
        noise = rng.rand(b, self.num_patches)  # [B, L], same draw whatever the world size
        ids_keep, mask, ids_restore = random_masking(noise, num_masked)

        # encoder on visible patches only
        x = self.encoder.embed_patches(imgs)  # [B, L, D] with position embedding
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, L_keep, D]
        latent = self.encoder.forward_tokens(x)  # [B, 1 + L_keep, D]

        # decoder on the full sequence: visible tokens + mask tokens, unshuffled
        y = self.decoder_embed(latent)  # [B, 1 + L_keep, Dd]
        mask_tokens = self.mask_token.to(y.dtype).expand(b, self.num_patches - y.shape[1] + 1, -1)
        y_ = torch.cat([y[:, 1:], mask_tokens], dim=1)  # [B, L, Dd] shuffled order
        y_ = torch.gather(y_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :1], y_], dim=1) + self.decoder_pos_embed.to(y.dtype)
        for blk in self.decoder_blocks:
            y = blk(y)
        y = self.decoder_norm(y)
        pred = self.decoder_pred(y)[:, 1:]  # [B, L, p*p*C]

        target = patchify(imgs, self.patch_size)
        return pred, mask, target

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The paper's Figure 2 for a fixed batch: original, masked input, reconstruction, and the
        reconstruction with the visible patches pasted back (as the authors' demo notebook shows it)."""
        imgs = batch["images"][0]
        pred, mask, target = self._reconstruct(imgs, ctx.rng)
        pred = pred.float()
        if self.norm_pix_loss:  # the decoder predicts normalized patches: undo with the input's statistics
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        grid = self.encoder.grid_size
        recon = unpatchify(pred, self.patch_size, grid, self.in_chans)
        masked = unpatchify(
            mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).to(pred.dtype),
            self.patch_size,
            grid,
            self.in_chans,
        )
        imgs = imgs.float()
        view = self.views()[0]
        mean = torch.tensor(view.mean, device=imgs.device).view(1, -1, 1, 1)
        std = torch.tensor(view.std, device=imgs.device).view(1, -1, 1, 1)

        def to_unit(x: torch.Tensor) -> torch.Tensor:
            return (x * std + mean).clamp(0.0, 1.0)

        return {
            "mae/original": to_unit(imgs),
            "mae/masked": to_unit(imgs * (1 - masked)),
            "mae/reconstruction": to_unit(recon),
            "mae/reconstruction_plus_visible": to_unit(imgs * (1 - masked) + recon * masked),
        }

    def backbone(self) -> nn.Module:
        return self.encoder

    def flops_per_sample(self) -> float:
        enc = self.encoder
        length = self.num_patches
        keep = length - num_masked_patches(length, self.mask_ratio)
        patch_dim = self.patch_size**2 * self.in_chans
        dim, ddim = enc.embed_dim, self._decoder_dim
        fwd = 2.0 * length * patch_dim * dim  # patch embedding runs on every patch, then masking
        fwd += enc.depth * transformer_block_flops(keep + 1, dim, enc.mlp_ratio)
        fwd += 2.0 * (keep + 1) * dim * ddim  # decoder_embed
        fwd += self._decoder_depth * transformer_block_flops(length + 1, ddim, self._decoder_mlp_ratio)
        fwd += 2.0 * (length + 1) * ddim * patch_dim  # decoder_pred
        return 3.0 * fwd  # backward ~ 2x forward

    def export_backbone(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        prefix = "encoder."
        backbone = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        meta = vit_backbone_meta("mae", self.model_name, self.encoder, self.views()[0])
        return backbone, meta

"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale") with timm's parameter names, for MAE, DINO and CLIP pretraining.

Parameter names and layout match ``timm.models.vision_transformer.VisionTransformer`` with its defaults
(class token, learned-style ``pos_embed`` of ``1 + L`` positions including the class position, pre-norm
blocks, final ``norm``, token pooling), so that ``state_dict()`` loads into timm with ``strict=True`` and
exported backbones work in the ecosystem.

Beyond timm's API, two entry points serve MAE (He et al., 2022), whose encoder only sees visible patches:
``embed_patches`` (patch embedding + patch position embedding) and ``forward_tokens`` (class token, blocks,
final norm on any token subset); ``forward_features(x) == forward_tokens(embed_patches(x))``.

Images whose patch grid differs from the configured one (e.g. DINO's 96 px local crops on a 224 px model)
get a bicubically interpolated patch position embedding, as in DINO (Caron et al., 2021).

Weight initialisation follows timm's default (``weight_init=""``), see ``VisionTransformer.init_weights``;
it can be re-run after building on the meta device and ``to_empty`` (also on FSDP2 DTensor parameters).

FSDP2 note: ``fully_shard`` hooks only ``forward``. Shard each block, then make the *method* module the root
so that ``embed_patches`` / ``forward_tokens`` / ``get_intermediate_layers`` run inside its forward; if the
ViT itself is the root and such a method is called directly, register it with
``torch.distributed.fsdp.register_fsdp_forward_method``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.pos_embed import get_2d_sincos_pos_embed

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "create_vit",
    "list_vits",
]

PosEmbedType = Literal["learned", "sincos"]


def init_vit_weights_(module: nn.Module) -> None:
    """Initialise one module like timm's default ViT init (meant for ``nn.Module.apply``).

    Linear: weight ``trunc_normal_(std=0.02)`` with timm's (and PyTorch's) default absolute bounds of
    ``[-2, 2]``, i.e. effectively an untruncated N(0, 0.02^2); bias zeros. LayerNorm: ones / zeros.
    Conv2d (the patch embedding): PyTorch's default ``reset_parameters`` (timm leaves it at that default;
    MAE instead uses Xavier on the flattened kernel).

    Args:
        module: The module to initialise (children are not visited; use ``model.apply``).
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        module.reset_parameters()


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016): drops the whole residual branch of a sample.

    In training, each sample's branch output is zeroed with probability ``p`` and otherwise scaled by
    ``1 / (1 - p)`` so the expectation is unchanged; identity in eval mode or when ``p == 0``.

    Args:
        p: Drop probability in ``[0, 1)``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # [B, 1, ..., 1]
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / efficient kernels).

    Args:
        dim: Token width ``D``; must be divisible by ``num_heads``.
        num_heads: Number of heads ``H``.
        qkv_bias: Whether the fused ``qkv`` projection has a bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # Output channels are [q | k | v], each split into heads of head_dim: timm's layout.
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Attend over the tokens of ``x``.

        Args:
            x: Tokens ``[B, N, D]``.
            attn_mask: Optional mask broadcastable to ``[B, H, N, N]`` (bool: True = attend; float: added).
            is_causal: Causal masking (e.g. a text encoder); exclusive with ``attn_mask``.

        Returns:
            ``[B, N, D]``.
        """
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, H, N, Dh]
        x = x.transpose(1, 2).reshape(B, N, D)  # [B, N, D]
        return self.proj(x)

    def attention_probs(self, x: Tensor) -> Tensor:
        """The attention probabilities ``softmax(q k^T / sqrt(Dh))`` of every head, in float32.

        What ``forward`` computes inside SDPA without materialising it; for visualisations such as
        DINO's self-attention maps (Caron et al., 2021, Fig. 1). No mask.

        Args:
            x: Tokens ``[B, N, D]`` (the input of ``forward``, i.e. after ``norm1``).

        Returns:
            ``[B, H, N, N]``: row ``i`` is how token ``i`` distributes its attention.
        """
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).float()  # [B, N, 3, H, Dh]
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
        return logits.softmax(dim=-1)


class Mlp(nn.Module):
    """Two-layer GELU MLP of the Transformer block.

    Args:
        dim: Input and output width.
        hidden_dim: Hidden width (``mlp_ratio * dim``).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, N, D]


class Block(nn.Module):
    """Pre-norm Transformer block (Dosovitskiy et al., 2021, eq. 2-3) with stochastic depth.

    ``x = x + drop_path(attn(norm1(x))); x = x + drop_path(mlp(norm2(x)))``. Reused by the MAE decoder.

    Args:
        dim: Token width ``D``.
        num_heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: Bias on the fused ``qkv`` projection.
        drop_path: Stochastic depth probability of both residual branches.
        norm_eps: LayerNorm epsilon (timm's ViT uses 1e-6).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Args: x ``[B, N, D]``; ``attn_mask`` / ``is_causal`` as in ``Attention``. Returns ``[B, N, D]``."""
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a ``Conv2d`` with kernel = stride = patch size.

    Args:
        patch_size: Patch side ``p``.
        in_chans: Image channels ``C``.
        embed_dim: Token width ``D``.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, C, H, W]`` with H, W multiples of the patch size. Returns ``[B, L, D]`` (row-major)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, L, D]


class VisionTransformer(nn.Module):
    """Vision Transformer encoder (Dosovitskiy et al., 2021) with timm-compatible names and API.

    Args:
        img_size: Training image side (int) or ``(H, W)``; fixes ``grid_size`` and ``pos_embed``'s length.
        patch_size: Patch side ``p``.
        in_chans: Image channels.
        embed_dim: Token width ``D``.
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        qkv_bias: Bias on the ``qkv`` projections.
        drop_path_rate: Stochastic depth rate of the last block; block ``i`` uses
            ``drop_path_rate * i / (depth - 1)`` (linear over depth, 0 for the first block).
        pos_embed: ``"learned"`` (trainable, trunc-normal std 0.02) or ``"sincos"`` (fixed 2-D sin-cos as in
            MAE; still a ``Parameter`` named ``pos_embed`` so timm loads it, but ``requires_grad=False``).
        num_classes: If > 0, a linear ``head`` on the class token; otherwise ``head`` is the identity.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pos_embed: PosEmbedType = "learned",
        num_classes: int = 0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if pos_embed == "sincos" and embed_dim % 4 != 0:
            raise ValueError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {embed_dim}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._img_size: tuple[int, int] = (img_hw[0], img_hw[1])
        self._patch_size = patch_size
        self._grid_size: tuple[int, int] = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self._embed_dim = embed_dim
        self.in_chans = in_chans
        self.mlp_ratio = mlp_ratio
        self.pos_embed_type: PosEmbedType = pos_embed
        self.num_classes = num_classes
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # [1, 1, D]
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.num_patches, embed_dim), requires_grad=pos_embed == "learned"
        )  # [1, 1+L, D]; position 0 belongs to the class token
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=rate, norm_eps=norm_eps)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ----------------------------------------------------------------------------------------- properties
    @property
    def img_size(self) -> tuple[int, int]:
        """Configured image size ``(H, W)``."""
        return self._img_size

    @property
    def patch_size(self) -> int:
        """Patch side ``p``."""
        return self._patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(H / p, W / p)`` at the configured image size."""
        return self._grid_size

    @property
    def num_patches(self) -> int:
        """Number of patches ``L`` at the configured image size."""
        return self._grid_size[0] * self._grid_size[1]

    @property
    def embed_dim(self) -> int:
        """Token width ``D``."""
        return self._embed_dim

    @property
    def num_features(self) -> int:
        """Width of pooled features (timm name); equals ``embed_dim``."""
        return self._embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (timm name): the class token."""
        return 1

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    # ------------------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise all parameters like timm's default ViT init.

        ``pos_embed``: trunc-normal std 0.02 (learned) or the fixed sin-cos table (zeros at the class
        position); ``cls_token``: normal std 1e-6; Linear / LayerNorm / patch Conv2d: see
        ``init_vit_weights_``. Safe to call after materialising a meta-device model (``to_empty``), also on
        FSDP2-sharded (DTensor) parameters.
        """
        if self.pos_embed_type == "sincos":
            table = get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=True)[None]
            table = table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)  # [1, 1+L, D]
            if hasattr(self.pos_embed, "device_mesh"):  # DTensor after fully_shard: shard the table alike
                from torch.distributed.tensor import distribute_tensor

                table = distribute_tensor(table, self.pos_embed.device_mesh, self.pos_embed.placements)
            self.pos_embed.copy_(table)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_vit_weights_)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (timm API)."""
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (activation checkpointing, non-reentrant).

        Trades ~33 % more compute for activation memory; checkpointing preserves the RNG state, so drop
        path masks are identical in the recomputation.
        """
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------------------------------ forward
    def _patch_pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embedding of the patches for a ``grid_h x grid_w`` grid: ``[1, grid_h * grid_w, D]``."""
        pos = self.pos_embed[:, 1:]  # [1, L, D]
        if (grid_h, grid_w) == self.grid_size:
            return pos
        # Other resolutions (e.g. DINO's local crops): resample the table as an image, in float32.
        gh, gw = self.grid_size
        pos = pos.reshape(1, gh, gw, self.embed_dim).permute(0, 3, 1, 2)  # [1, D, gh, gw]
        pos = F.interpolate(pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, self.embed_dim).to(self.pos_embed.dtype)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Patch embedding plus the patches' position embedding, without the class token (for MAE).

        Args:
            x: Images ``[B, C, H, W]``; H and W multiples of ``patch_size``.

        Returns:
            Patch tokens ``[B, L, D]`` in row-major patch order.
        """
        tokens = self.patch_embed(x)  # [B, L, D]
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens + self._patch_pos_embed(grid_h, grid_w)  # [B, L, D]

    def _prepend_cls(self, tokens: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)  # [B, 1, D]
        return torch.cat([cls.to(tokens.dtype), tokens], dim=1)  # [B, 1+T, D]

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """Run the encoder on already embedded patch tokens (any subset, e.g. MAE's visible patches).

        Args:
            tokens: Patch tokens with position embedding added, ``[B, T, D]`` (from ``embed_patches``).

        Returns:
            Normalised tokens ``[B, 1+T, D]``, the class token first.
        """
        x = self._prepend_cls(tokens)  # [B, 1+T, D]
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> normalised tokens ``[B, 1+L, D]`` (class token first; timm API)."""
        return self.forward_tokens(self.embed_patches(x))

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the class token of ``feats`` ``[B, 1+L, D]``; logits ``[B, num_classes]`` if a head exists.

        Args:
            feats: Output of ``forward_features``.
            pre_logits: Return the pooled ``[B, D]`` features even when a head exists.
        """
        pooled = feats[:, 0]  # [B, D]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> class-token features ``[B, D]``, or logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """The last block's attention probabilities on images ``x``, as DINO's ``get_last_selfattention``.

        Runs the ordinary forward (so that FSDP2's hooks on the blocks gather their parameters) and
        reads the last block's attention from the input of its ``attn`` module.

        Args:
            x: Images ``[B, C, H, W]``; H and W multiples of ``patch_size``.

        Returns:
            ``[B, H, 1+L, 1+L]`` in float32; ``[:, :, 0, 1:]`` is the class token's attention to the patches.
        """
        seen: dict[str, Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            seen["probs"] = module.attention_probs(args[0])  # type: ignore[operator]

        handle = self.blocks[-1].attn.register_forward_hook(hook)
        try:
            self.forward_features(x)
        finally:
            handle.remove()
        return seen["probs"]

    def get_intermediate_layers(self, x: Tensor, n: int | list[int] = 1, norm: bool = True) -> list[Tensor]:
        """Outputs of several blocks, as used by DINO's linear evaluation (last ``n`` blocks, normalised).

        Args:
            x: Images ``[B, C, H, W]``.
            n: Number of last blocks, or explicit block indices (0-based; negative counts from the end).
            norm: Apply the final ``norm`` to each output (DINO does).

        Returns:
            One ``[B, 1+L, D]`` tensor per selected block, in depth order.
        """
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n must be in [1, {depth}], got {n}")
            wanted = set(range(depth - n, depth))
        else:
            wanted = {i % depth if -depth <= i < depth else i for i in n}
            if not wanted or not all(0 <= i < depth for i in wanted):
                raise ValueError(f"block indices must be in [-{depth}, {depth}), got {n}")
        x = self._prepend_cls(self.embed_patches(x))  # [B, 1+L, D]
        outputs = []
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x)
            if i in wanted:
                outputs.append(self.norm(x) if norm else x)
            if i == max(wanted):
                break
        return outputs


# ------------------------------------------------------------------------------------------------ registry
# Sizes from Dosovitskiy et al. (2021), Table 1, plus DeiT's Tiny / Small (Touvron et al., 2021).
_VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
_DEFAULTS: dict[str, Any] = dict(img_size=224)


def list_vits() -> list[str]:
    """Names accepted by ``create_vit``, sorted."""
    return sorted(_VIT_CONFIGS)


def vit_kwargs(model_cfg: Any) -> dict[str, Any]:
    """``create_vit`` keyword arguments from a ``model`` config section (its ``name`` excluded).

    The image size, position embedding and drop path always; the size fields (``patch_size``,
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``) only where set, else the registry's values.
    """
    sizes = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
    return {
        "img_size": model_cfg.img_size,
        "pos_embed": model_cfg.pos_embed,
        "drop_path_rate": model_cfg.drop_path_rate,
        **{k: model_cfg[k] for k in sizes if model_cfg[k] is not None},
    }


def vit_architecture(name: str) -> dict[str, Any]:
    """The registered size of ``name`` (patch_size, embed_dim, depth, num_heads, img_size, ...).

    Raises:
        ValueError: unknown name; the message names the nearest valid one.
    """
    if name not in _VIT_CONFIGS:
        names = list_vits()
        raise ValueError(
            f"unknown ViT {name!r}; did you mean {_nearest(name, names)!r}? Valid names: {', '.join(names)}"
        )
    return {**_DEFAULTS, **_VIT_CONFIGS[name]}


def _nearest(name: str, choices: list[str]) -> str:
    return (difflib.get_close_matches(name, choices, n=1, cutoff=0.0) or choices[:1])[0]


def create_vit(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered ViT, optionally overriding any constructor argument.

    Args:
        name: One of ``list_vits()``, e.g. ``"vit_large_patch16"`` (all default to ``img_size=224``).
        **overrides: ``VisionTransformer`` arguments, e.g. ``img_size=32, patch_size=4, depth=4``.

    Returns:
        The model, initialised.

    Raises:
        ValueError: Unknown name or argument; the message names the nearest valid one.
    """
    if name not in _VIT_CONFIGS:
        names = list_vits()
        raise ValueError(
            f"unknown ViT {name!r}; did you mean {_nearest(name, names)!r}? Valid names: {', '.join(names)}"
        )
    valid_args = [p for p in inspect.signature(VisionTransformer.__init__).parameters if p != "self"]
    for key in overrides:
        if key not in valid_args:
            raise ValueError(
                f"unknown VisionTransformer argument {key!r} for {name!r}; did you mean "
                f"{_nearest(key, valid_args)!r}? Valid arguments: {', '.join(valid_args)}"
            )
    return VisionTransformer(**{**_DEFAULTS, **_VIT_CONFIGS[name], **overrides})

"""Analytic FLOP counts for Transformer stacks and the ViT (Dosovitskiy et al., 2021), used for MFU.

Convention: 2 FLOPs per multiply-add (timm's and fvcore's tables are in MACs, half these numbers); only
matrix products are counted (projections, MLP, the two attention products QK^T and AV, the patch
embedding, the head). Biases, LayerNorm, GELU, softmax and residual adds are left out: they are a
fraction of a percent for ViTs and are not run on the tensor cores that MFU is measured against.
Training is counted as 3x forward (backward = 2x forward); recomputation from activation checkpointing is
not model FLOPs and is not counted. Attention is counted as full (non-causal) attention.

Reference: ViT-L/16 at 224 px (197 tokens) ->
``vit_encoder_flops(197, 1024, 24, patch_size=16)`` = 123.1 GFLOP per image forward.

Cross-checking with ``torch.utils.flop_counter.FlopCounterMode``: it counts ``mm/addmm/bmm/convolution``
and the CUDA SDPA kernels (flash / efficient / cuDNN) exactly like this module, but, in torch 2.11-2.14,
it has no formula for the CPU kernel ``_scaled_dot_product_flash_attention_for_cpu``, so on CPU the
attention products are silently missing from its total unless the math SDPA backend is forced (which
decomposes into counted ``bmm``), or the model runs on the ``meta`` device.
"""

from __future__ import annotations

__all__ = [
    "attention_matmul_flops",
    "linear_flops",
    "patch_embed_flops",
    "training_flops",
    "transformer_block_flops",
    "transformer_flops",
    "vit_encoder_flops",
]


def linear_flops(num_tokens: int, in_features: int, out_features: int) -> int:
    """FLOPs of a linear layer applied to ``num_tokens`` vectors: ``2 * N * in * out``."""
    return 2 * num_tokens * in_features * out_features


def attention_matmul_flops(num_tokens: int, dim: int) -> int:
    """FLOPs of the two attention products, ``QK^T`` and ``AV``, summed over heads: ``2 * (2 * N^2 * D)``.

    Independent of the number of heads (``H * N^2 * D/H`` multiply-adds per product).
    """
    return 2 * (2 * num_tokens * num_tokens * dim)


def transformer_block_flops(num_tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of one pre-norm Transformer block on one sequence of ``num_tokens`` tokens.

    ``qkv`` (D -> 3D) + ``QK^T`` + ``AV`` + ``proj`` (D -> D) + ``fc1`` (D -> rD) + ``fc2`` (rD -> D).

    Args:
        num_tokens: Sequence length ``N`` (including class / prefix tokens).
        dim: Token width ``D``.
        mlp_ratio: MLP hidden width ``r`` as a multiple of ``D`` (hidden = ``int(D * r)``, as in the model).
    """
    hidden = int(dim * mlp_ratio)
    return (
        linear_flops(num_tokens, dim, 3 * dim)  # qkv
        + attention_matmul_flops(num_tokens, dim)  # QK^T, AV
        + linear_flops(num_tokens, dim, dim)  # proj
        + linear_flops(num_tokens, dim, hidden)  # fc1
        + linear_flops(num_tokens, hidden, dim)  # fc2
    )


def transformer_flops(num_tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of ``depth`` identical blocks on one sequence (e.g. a CLIP text tower or MAE decoder)."""
    return depth * transformer_block_flops(num_tokens, dim, mlp_ratio)


def patch_embed_flops(num_patches: int, dim: int, patch_size: int, in_chans: int = 3) -> int:
    """FLOPs of the patch embedding (a ``p x p`` stride-``p`` convolution) on ``num_patches`` patches."""
    return linear_flops(num_patches, in_chans * patch_size * patch_size, dim)


def vit_encoder_flops(
    num_tokens: int,
    dim: int,
    depth: int,
    mlp_ratio: float = 4.0,
    patch_size: int = 16,
    in_chans: int = 3,
    num_embedded_patches: int | None = None,
    num_prefix_tokens: int = 1,
    num_classes: int = 0,
) -> int:
    """Forward FLOPs of a ViT encoder for one image.

    Args:
        num_tokens: Sequence length through the blocks, prefix tokens included (197 for 224/16).
        dim: Token width ``D``.
        depth: Number of blocks.
        mlp_ratio: MLP ratio.
        patch_size: Patch side (for the patch-embedding cost).
        in_chans: Image channels.
        num_embedded_patches: Patches run through the patch embedding; defaults to
            ``num_tokens - num_prefix_tokens``. MAE embeds all ``L`` patches but encodes only the visible
            ones, so it passes ``num_tokens = 1 + visible`` and ``num_embedded_patches = L``.
        num_prefix_tokens: Class (and register) tokens in ``num_tokens``.
        num_classes: Width of a linear head on the class token (0: none).
    """
    if num_embedded_patches is None:
        num_embedded_patches = num_tokens - num_prefix_tokens
    return (
        patch_embed_flops(num_embedded_patches, dim, patch_size, in_chans)
        + transformer_flops(num_tokens, dim, depth, mlp_ratio)
        + linear_flops(1, dim, num_classes)
    )


def training_flops(forward_flops: int) -> int:
    """Model FLOPs of a training step from its forward FLOPs: forward + backward (2x) = 3x forward."""
    return 3 * forward_flops

"""Fixed 2-D sine-cosine position embeddings.

The 1-D embedding of a position ``p`` with ``d`` channels is the Transformer one (Vaswani et al., 2017):
``[sin(p * w_0), ..., sin(p * w_{d/2-1}), cos(p * w_0), ..., cos(p * w_{d/2-1})]`` with
``w_k = 1 / 10000 ** (k / (d / 2))``. The 2-D embedding used by MAE (He et al., 2022, "Masked Autoencoders
Are Scalable Vision Learners") and MoCo v3 concatenates two such 1-D embeddings of ``embed_dim / 2``
channels each.

Channel order follows MAE's ``get_2d_sincos_pos_embed`` exactly, so that MAE checkpoints and ours agree:
the first half of the channels encodes the **column** (x, width) index of a patch and the second half its
**row** (y, height) index. (MAE builds its grid with ``np.meshgrid(grid_w, grid_h)``, whose first output
varies along the width, and names that half ``emb_h``; the naming is misleading, the values are what we
reproduce.) Patches are enumerated in row-major order, the order of ``Conv2d(...).flatten(2)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["get_1d_sincos_pos_embed", "get_2d_sincos_pos_embed"]


def get_1d_sincos_pos_embed(embed_dim: int, positions: Tensor) -> Tensor:
    """1-D sine-cosine embedding of arbitrary (possibly fractional) positions.

    Args:
        embed_dim: Number of output channels; must be even.
        positions: Positions of any shape; flattened.

    Returns:
        Float64 tensor of shape ``[positions.numel(), embed_dim]``: sines in the first half, cosines in the
        second half.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for a 1-D sin-cos embedding, got {embed_dim}")
    # Computed in float64 (as MAE does with numpy) so the float32 result does not depend on the device.
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)  # [d/2]
    omega = 1.0 / 10000.0**omega  # [d/2]
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # [P, d/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [P, d]


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False
) -> Tensor:
    """Fixed 2-D sine-cosine position embedding of a patch grid (MAE, He et al., 2022).

    Args:
        embed_dim: Number of channels; must be divisible by 4 (two 1-D halves of sines and cosines).
        grid_size: Grid side ``S`` (square) or ``(rows, cols)``.
        cls_token: If True, prepend an all-zero row for the class token (as MAE does).

    Returns:
        Float32 tensor ``[rows * cols, embed_dim]``, or ``[1 + rows * cols, embed_dim]`` with ``cls_token``.
        Row ``r * cols + c`` (after the optional class row) is
        ``concat(emb_1d(c), emb_1d(r))``: column index in the first half, row index in the second.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    row_idx, col_idx = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )  # each [rows, cols]
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, col_idx)  # [rows*cols, D/2]
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, row_idx)  # [rows*cols, D/2]
    emb = torch.cat([emb_col, emb_row], dim=1)  # [rows*cols, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)  # [1+rows*cols, D]
    return emb.float()

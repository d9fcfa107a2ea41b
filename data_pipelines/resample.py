"""Batched crop-and-resize of same-size small images as two matrix products per batch.

RandomResizedCrop on a batch of small images (28-64 px) is dominated by per-call overhead when
each sample is resized on its own (~30 us per ``interpolate`` call for a 28 px image, most of it
computing filter weights). Resizing is separable and linear, so the whole batch can be done at
once: for every sample, a row-weight matrix ``Wy`` (``S x H``) and a column-weight matrix ``Wx``
(``S x W``) hold the filter taps of its crop box, and the view is ``Wy @ image @ Wx^T``. Pixels
outside a sample's crop box get zero weight; a horizontal flip reverses the rows of ``Wx``.

The weights are those of PyTorch's antialiased resampling (``interpolate(..., antialias=True)``,
the kernel torchvision's ``resized_crop(..., antialias=True)`` uses on tensors, which follows
Pillow): output pixel ``i`` is centred at ``c = scale * (i + 0.5)`` in the crop with
``scale = crop / S``; the filter is stretched by ``max(scale, 1)`` (antialiasing when shrinking);
taps are normalized to sum to 1 (so borders renormalize instead of padding). Bicubic uses Keys'
cubic with ``a = -0.5``, bilinear the triangle filter. As in the uint8 kernel, the horizontal pass
runs first and its result is rounded and clamped to [0, 255] before the vertical pass, so the
output equals the per-sample uint8 path up to that kernel's fixed-point weight rounding (at most
one grey level, see ``tests/test_data_loader.py``).

The cost is ``O(B * C * S * H * W)`` multiply-adds: far cheaper than per-sample calls for small
images, far dearer for large ones, so :func:`fits_batched` bounds the input size. A crop's weights
depend only on its (start, length, flip) along an axis, of which a ``N``-pixel axis has at most
``N * (N + 1)``: they are computed once per process and gathered per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Filter half-widths (in input pixels at scale 1) of the antialiased kernels.
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
# Largest input side resized as matrix products; larger images are cheaper one by one.
MAX_BATCHED_SIDE = 64


def fits_batched(height: int, width: int, interpolation: str) -> bool:
    """Whether images of this size and filter are resized by :func:`resized_crops` (else one by one)."""
    return interpolation in _SUPPORT and max(height, width) <= MAX_BATCHED_SIDE


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5  # Keys (1981) with a = -0.5, as Pillow and PyTorch's antialiased bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def axis_weights(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, interpolation: str
) -> torch.Tensor:
    """Resampling weights of one axis for a batch of crops.

    Args:
        start: int64 [B], first input pixel of each crop along this axis.
        length: int64 [B], crop length (>= 1) along this axis.
        in_size: input length along this axis (every crop lies inside ``[0, in_size)``).
        out_size: output length ``S``.
        interpolation: ``bilinear`` or ``bicubic``.

    Returns:
        float64 [B, S, in_size]: row ``i`` holds the taps of output pixel ``i`` (rows sum to 1).
    """
    length_f = length.to(torch.float64)
    scale = length_f / out_size  # [B]
    stretch = scale.clamp(min=1.0)  # the filter widens when shrinking (antialiasing)
    centre = scale[:, None] * (torch.arange(out_size, dtype=torch.float64) + 0.5)  # [B, S]
    rel = torch.arange(in_size, dtype=torch.float64)[None, :] - start[:, None].to(torch.float64)  # [B, N]
    inside = (rel >= 0) & (rel < length_f[:, None])
    x = (rel[:, None, :] + 0.5 - centre[:, :, None]) / stretch[:, None, None]  # [B, S, N]
    w = _filter(x, interpolation) * inside[:, None, :]
    return w / w.sum(dim=-1, keepdim=True)


class _WeightTable:
    """Every axis-weight matrix seen so far for one (input length, output length, filter)."""

    def __init__(self, in_size: int, out_size: int, interpolation: str) -> None:
        self.in_size, self.out_size, self.interpolation = in_size, out_size, interpolation
        self.rows = torch.empty(0, out_size, in_size, dtype=torch.float32)
        self.index: dict[tuple[int, int, bool], int] = {}

    def gather(self, starts: Sequence[int], lengths: Sequence[int], flips: Sequence[bool]) -> torch.Tensor:
        """float32 [B, S, N] weights of the given crops (output flipped where ``flips``)."""
        keys = list(zip(starts, lengths, flips, strict=True))
        missing = list(dict.fromkeys(k for k in keys if k not in self.index))
        if missing:
            start, length, flip = (torch.tensor(col) for col in zip(*missing, strict=True))
            new = axis_weights(start, length, self.in_size, self.out_size, self.interpolation)
            new = torch.where(flip[:, None, None], new.flip(1), new).to(torch.float32)
            self.index.update({k: len(self.index) + i for i, k in enumerate(missing)})
            self.rows = torch.cat([self.rows, new])
        return self.rows.index_select(0, torch.tensor([self.index[k] for k in keys]))


_TABLES: dict[tuple[int, int, str], _WeightTable] = {}


def _table(in_size: int, out_size: int, interpolation: str) -> _WeightTable:
    key = (in_size, out_size, interpolation)
    if key not in _TABLES:
        _TABLES[key] = _WeightTable(in_size, out_size, interpolation)
    return _TABLES[key]


def resized_crops(
    images: torch.Tensor,
    boxes: Sequence[tuple[int, int, int, int]],
    flips: Sequence[bool],
    size: int,
    interpolation: str,
) -> torch.Tensor:
    """Crop every image to its box, resize it to ``size`` x ``size`` and flip it where asked.

    Args:
        images: uint8 [B, C, H, W].
        boxes: per image (top, left, height, width), inside the image.
        flips: per image, whether to flip the result horizontally.
        size: output side ``S``.
        interpolation: ``bilinear`` or ``bicubic`` (antialiased).

    Returns:
        uint8 [B, C, S, S].
    """
    n, c, h, w = images.shape
    if not fits_batched(h, w, interpolation):
        raise ValueError(f"{h}x{w} images with {interpolation!r} are resized one by one (see fits_batched)")
    tops, lefts, heights, widths = zip(*boxes, strict=True)
    wy = _table(h, size, interpolation).gather(tops, heights, [False] * n)  # [B, S, H]
    wx = _table(w, size, interpolation).gather(lefts, widths, [bool(f) for f in flips])  # [B, S, W]
    x = images.to(torch.float32).reshape(n, c * h, w)
    rows = torch.bmm(x, wx.transpose(1, 2)).round_().clamp_(0, 255).reshape(n, c, h, size)  # horizontal
    out = torch.matmul(wy[:, None], rows)  # vertical: [B, C, S, S]
    return out.round_().clamp_(0, 255).to(torch.uint8)

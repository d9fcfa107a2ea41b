"""View recipes (:class:`ViewSpec`) and their CPU implementation.

A method declares the views it needs as a list of :class:`ViewSpec`; the loader produces one
normalized float tensor per view and sample. Every random decision of a view is drawn from an
explicit :class:`torch.Generator` (seeded per sample by the loader), never from global RNG state,
so augmentations are a pure function of (seed, sample position).

The CPU path is MAE's augmentation (He et al., 2022): RandomResizedCrop (area fraction ``scale``,
aspect ratio ``ratio``, torchvision's sampling: 10 attempts, then a central crop clamped to the
ratio range), resize with ``interpolation``, horizontal flip with probability ``hflip_p``,
normalize with ``mean``/``std``. Grey images are cropped/resized on one channel and then
repeated to three.

To add DINO-style photometric augmentations later, add fields with neutral defaults (e.g.
``color_jitter_p: float = 0.0``, ``grayscale_p``, ``blur_p``, ``solarize_p``) and apply them in
:func:`apply_view` after the flip, drawing from the same generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
_CROP_ATTEMPTS = 10


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"ViewSpec.{name} must be (low, high) with low <= high, got {tuple(value)}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view of a sample.

    Attributes:
        size: output side length S (views are S x S).
        scale: range of the crop's area as a fraction of the image area.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        hflip_p: probability of a horizontal flip.
        interpolation: resize filter: ``bicubic`` | ``bilinear`` | ``nearest`` | ``nearest-exact``.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Lists (from YAML configs) become tuples so the spec stays hashable and comparable.
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ViewSpec.size must be a positive int, got {self.size!r}")
        scale, ratio = _pair(self.scale, "scale"), _pair(self.ratio, "ratio")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"ViewSpec.scale must satisfy 0 < low <= high <= 1, got {scale}")
        if ratio[0] <= 0:
            raise ValueError(f"ViewSpec.ratio must be positive, got {ratio}")
        if not 0 <= self.hflip_p <= 1:
            raise ValueError(f"ViewSpec.hflip_p must be in [0, 1], got {self.hflip_p}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"ViewSpec.interpolation {self.interpolation!r} is not valid; choose one of {', '.join(_INTERPOLATIONS)}"
            )
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"ViewSpec.mean/std need 3 values (std > 0), got {mean} / {std}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop box, the way torchvision does, from ``generator``.

    Up to 10 attempts draw an area fraction uniformly from ``scale`` and a log-uniform aspect
    ratio from ``ratio``; the first box that fits is placed uniformly at random. Otherwise the
    whole image, clamped to the ratio range, is taken from the centre.

    Args:
        height: image height.
        width: image width.
        scale: area fraction range.
        ratio: aspect ratio (w / h) range.
        generator: source of randomness.

    Returns:
        (top, left, crop height, crop width).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, height - h + 1)
            left = _randint(generator, width - w + 1)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_uint8_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert an image to a uint8 tensor [C, H, W] with C = 1 (grey) or 3 (colour).

    Args:
        image: PIL image (any mode), H x W (x C) uint8 array, or [C, H, W] uint8 tensor.

    Returns:
        The uint8 tensor; alpha and palette modes are converted to RGB.
    """
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return F.pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    else:
        t = image if image.ndim == 3 else image.unsqueeze(0)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got shape {tuple(t.shape)}")
    return t


def apply_view(
    image: Image.Image | np.ndarray | torch.Tensor, spec: ViewSpec, generator: torch.Generator
) -> torch.Tensor:
    """Augment one image into one view.

    Args:
        image: the decoded sample (PIL image, uint8 array or uint8 [C, H, W] tensor).
        spec: the view recipe.
        generator: source of all random decisions (crop box, flip).

    Returns:
        float32 tensor [3, S, S], normalized with ``spec.mean``/``spec.std``.
    """
    pixels = to_uint8_tensor(image)
    _, height, width = pixels.shape
    top, left, h, w = sample_crop_box(height, width, spec.scale, spec.ratio, generator)
    out = F.resized_crop(
        pixels,
        top,
        left,
        h,
        w,
        [spec.size, spec.size],
        interpolation=_INTERPOLATIONS[spec.interpolation],
        antialias=True,
    )
    if float(torch.rand((), generator=generator)) < spec.hflip_p:
        out = F.horizontal_flip(out)
    if out.shape[0] == 1:
        out = out.expand(3, -1, -1)
    out = F.to_dtype(out, torch.float32, scale=True)
    return F.normalize(out, list(spec.mean), list(spec.std))


def apply_views(
    image: Image.Image | np.ndarray | torch.Tensor, specs: Sequence[ViewSpec], generator: torch.Generator
) -> list[torch.Tensor]:
    """All views of one image, drawn in order from one generator.

    Args:
        image: the decoded sample.
        specs: the view recipes.
        generator: per-sample generator.

    Returns:
        One [3, S, S] float32 tensor per spec.
    """
    pixels = to_uint8_tensor(image)
    return [apply_view(pixels, spec, generator) for spec in specs]

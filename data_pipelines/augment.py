"""View recipes (:class:`ViewSpec`), their random parameters, and their CPU implementation.

A method declares the views it needs as a list of :class:`ViewSpec`; the loader produces one
normalized float tensor per view and sample. Augmentation is split in two steps so that both data
backends mean exactly the same thing:

1. :func:`sample_view_params` draws *every* random decision of a view (crop box, flip, whether
   colour jitter applies, its random op order and factors, grayscale, blur sigma, solarize) from an
   explicit :class:`torch.Generator` seeded per sample by the loader, never from global RNG state.
   The result, :class:`ViewParams`, is plain data.
2. A renderer turns (decoded image, params) into pixels: :func:`render_batch` here (on the CPU,
   used by the ``wds`` backend) or the DALI graph of :mod:`data_pipelines.dali`, which
   receives the same :class:`ViewParams` per sample.

Augmentations are therefore a pure function of (seed, sample position), whichever backend runs.

Pixel pipeline of one view, in the order of DINO's ``DataAugmentationDINO`` (Caron et al., 2021):
RandomResizedCrop (area fraction ``scale``, aspect ratio ``ratio``, torchvision's sampling: 10
attempts, then a central crop clamped to the ratio range) resized with ``interpolation`` to a uint8
``size`` x ``size`` image -> horizontal flip -> colour jitter (probability ``color_jitter_p``;
brightness, contrast, saturation, hue in a random order, torchvision's ``ColorJitter`` semantics:
factors uniform in ``[max(0, 1 - x), 1 + x]``, hue shift uniform in ``[-hue, hue]``) -> grayscale
(``grayscale_p``) -> Gaussian blur (``blur_p``, sigma uniform in ``blur_sigma``, kernel
``2 * ceil(3 * sigma) + 1`` taps) -> solarize (``solarize_p``, pixels >= ``solarize_threshold`` of
255 are inverted) -> normalize with ``mean``/``std``. Photometric steps work on float pixels in
[0, 1] (clamped after each op). Grey images are cropped/resized on one channel, then repeated.

Recipes with the papers' defaults: :func:`mae_views` (He et al., 2022), :func:`dino_views` (Caron
et al., 2021), :func:`clip_views` (Radford et al., 2021; OpenCLIP's training transform).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from data_pipelines.resample import fits_batched, resized_crops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's normalization (open_clip.constants.OPENAI_DATASET_MEAN / _STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale (used by contrast, saturation and grayscale).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
_CROP_ATTEMPTS = 10
_GRAIN = 32767  # elements: below at::internal::GRAIN_SIZE, PyTorch runs an elementwise op on one thread
# Colour-jitter ops, numbered as torchvision's ColorJitter numbers them in its random order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_ORDERS = list(itertools.permutations(range(4)))  # 24 orders, one drawn uniformly
# Uniform draws per view, always the same number so views never shift each other's randomness:
# 2 per crop attempt, 2 for the crop position, flip, jitter (apply, order, 4 factors), grayscale,
# blur (apply, sigma), solarize.
DRAWS_PER_VIEW = 2 * _CROP_ATTEMPTS + 2 + 1 + 6 + 1 + 2 + 1


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"ViewSpec.{name} must be (low, high) with low <= high, got {tuple(value)}")
    return values  # type: ignore[return-value]


def _probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ViewSpec.{name} must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view of a sample (all photometric steps are off by default).

    Attributes:
        size: output side length S (views are S x S).
        scale: range of the crop's area as a fraction of the image area.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        hflip_p: probability of a horizontal flip.
        interpolation: resize filter: ``bicubic`` | ``bilinear`` | ``nearest`` | ``nearest-exact``.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by.
        color_jitter_p: probability of colour jitter (torchvision ``RandomApply(ColorJitter)``).
        brightness: brightness factor drawn from ``[max(0, 1 - b), 1 + b]`` (0: op off).
        contrast: contrast factor from ``[max(0, 1 - c), 1 + c]``; blends with the mean grey level.
        saturation: saturation factor from ``[max(0, 1 - s), 1 + s]``; blends with the grey image.
        hue: hue shift from ``[-hue, hue]`` in turns (at most 0.5).
        grayscale_p: probability of converting to grey (3 equal channels).
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's sigma in output pixels (uniform).
        solarize_p: probability of solarization.
        solarize_threshold: pixels >= this value (0-255 scale) are inverted.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 128.0

    def __post_init__(self) -> None:
        # Lists (from YAML configs) become tuples so the spec stays hashable and comparable.
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ViewSpec.size must be a positive int, got {self.size!r}")
        scale, ratio = _pair(self.scale, "scale"), _pair(self.ratio, "ratio")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"ViewSpec.scale must satisfy 0 < low <= high <= 1, got {scale}")
        if ratio[0] <= 0:
            raise ValueError(f"ViewSpec.ratio must be positive, got {ratio}")
        for name in ("hflip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _probability(getattr(self, name), name)
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"ViewSpec.interpolation {self.interpolation!r} is not valid; choose one of {', '.join(_INTERPOLATIONS)}"
            )
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"ViewSpec.mean/std need 3 values (std > 0), got {mean} / {std}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ViewSpec.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ViewSpec.hue must be in [0, 0.5], got {self.hue}")
        sigma = _pair(self.blur_sigma, "blur_sigma")
        if sigma[0] <= 0:
            raise ValueError(f"ViewSpec.blur_sigma must be positive, got {sigma}")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(
                f"ViewSpec.solarize_threshold must be in [0, 256], got {self.solarize_threshold}"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "blur_sigma", sigma)

    @property
    def jitter_ops(self) -> tuple[int, ...]:
        """Colour-jitter ops that are on (``BRIGHTNESS``, ``CONTRAST``, ``SATURATION``, ``HUE``)."""
        if self.color_jitter_p == 0:
            return ()
        strengths = (self.brightness, self.contrast, self.saturation, self.hue)
        return tuple(op for op, s in enumerate(strengths) if s > 0)

    @property
    def photometric(self) -> bool:
        """Whether any colour, grayscale, blur or solarize step can apply."""
        return bool(self.jitter_ops) or max(self.grayscale_p, self.blur_p, self.solarize_p) > 0


class ViewParams(NamedTuple):
    """Every random decision of one view of one sample (plain data, shared by both backends).

    A named tuple: a batch creates one per sample and view, ~10x faster than a frozen dataclass.

    Attributes:
        top: crop box top row in the decoded image.
        left: crop box left column.
        height: crop box height (pixels).
        width: crop box width (pixels).
        flip: horizontal flip.
        jitter_order: colour-jitter ops in the order applied; empty when jitter does not apply.
        brightness: brightness factor (1: unchanged).
        contrast: contrast factor (1: unchanged).
        saturation: saturation factor (1: unchanged).
        hue: hue shift in turns (0: unchanged).
        grayscale: convert to grey.
        blur_sigma: Gaussian blur sigma in output pixels; 0 when no blur.
        solarize: invert pixels at or above the spec's threshold.
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    jitter_order: tuple[int, ...] = ()
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: bool = False
    blur_sigma: float = 0.0
    solarize: bool = False


def _crop_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    u: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop boxes of a batch from 22 uniforms per sample (see :func:`sample_crop_box`).

    Args:
        heights: int64 [B] image heights.
        widths: int64 [B] image widths.
        scale: area fraction range.
        ratio: aspect ratio (w / h) range.
        u: float64 [B, >= 22] uniforms in [0, 1): pairs (area, ratio) per attempt, then top, left.

    Returns:
        int64 arrays [B]: top, left, crop height, crop width.
    """
    n = 2 * _CROP_ATTEMPTS
    area = (heights * widths).astype(np.float64)[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:n:2])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1:n:2])
    cw = np.round(np.sqrt(target_area * aspect)).astype(np.int64)  # half to even, as Python's round
    ch = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (cw > 0) & (cw <= widths[:, None]) & (ch > 0) & (ch <= heights[:, None])
    first = fits.argmax(axis=1)  # the first attempt that fits
    rows = np.arange(len(heights))
    w, h = cw[rows, first], ch[rows, first]
    top = np.minimum((u[:, n] * (heights - h + 1)).astype(np.int64), heights - h)
    left = np.minimum((u[:, n + 1] * (widths - w + 1)).astype(np.int64), widths - w)
    missed = ~fits.any(axis=1)
    if missed.any():  # no attempt fits: the whole image, clamped to the ratio range, from the centre
        in_ratio = widths / heights
        fw = np.where(in_ratio > ratio[1], np.round(heights * ratio[1]).astype(np.int64), widths)
        fh = np.where(in_ratio < ratio[0], np.round(widths / ratio[0]).astype(np.int64), heights)
        h, w = np.where(missed, fh, h), np.where(missed, fw, w)
        top = np.where(missed, (heights - fh) // 2, top)
        left = np.where(missed, (widths - fw) // 2, left)
    return top, left, h, w


def _uniforms(generator: torch.Generator, n: int) -> np.ndarray:
    # One call for a block of draws: ~30x cheaper than n scalar draws.
    return torch.rand(1, n, generator=generator, dtype=torch.float64).numpy()


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop box the way torchvision does, from ``generator``.

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
    size = np.array([height]), np.array([width])
    box = _crop_boxes(*size, scale, ratio, _uniforms(generator, 2 * _CROP_ATTEMPTS + 2))
    return tuple(int(v[0]) for v in box)  # type: ignore[return-value]


def sample_view_params(height: int, width: int, spec: ViewSpec, generator: torch.Generator) -> ViewParams:
    """Draw every random decision of one view of an ``height`` x ``width`` image.

    Always consumes the same number of draws from ``generator``, whatever ``spec`` enables.

    Args:
        height: decoded image height.
        width: decoded image width.
        spec: the view recipe.
        generator: per-sample source of randomness.

    Returns:
        The view's parameters.
    """
    return views_params([height], [width], [spec], _uniforms(generator, DRAWS_PER_VIEW))[0][0]


def _params_from_uniforms(
    heights: np.ndarray, widths: np.ndarray, spec: ViewSpec, u: np.ndarray
) -> list[ViewParams]:
    """One view's parameters for a batch, from :data:`DRAWS_PER_VIEW` uniforms per sample."""
    top, left, h, w = (v.tolist() for v in _crop_boxes(heights, widths, spec.scale, spec.ratio, u))
    k = 2 * _CROP_ATTEMPTS + 2
    flip = (u[:, k] < spec.hflip_p).tolist()
    ops = spec.jitter_ops
    jitter = ((u[:, k + 1] < spec.color_jitter_p) if ops else np.zeros(len(u), dtype=bool)).tolist()
    order = np.minimum((u[:, k + 2] * 24).astype(np.int64), 23).tolist()

    def factor(x: float, v: np.ndarray) -> list[float]:
        return (max(0.0, 1.0 - x) + (1.0 + x - max(0.0, 1.0 - x)) * v).tolist()

    brightness = factor(spec.brightness, u[:, k + 3])
    contrast = factor(spec.contrast, u[:, k + 4])
    saturation = factor(spec.saturation, u[:, k + 5])
    hue = (-spec.hue + 2 * spec.hue * u[:, k + 6]).tolist()
    grayscale = (u[:, k + 7] < spec.grayscale_p).tolist()
    blur = u[:, k + 8] < spec.blur_p
    sigma = np.where(blur, spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u[:, k + 9], 0.0)
    sigma_list = sigma.tolist()
    solarize = (u[:, k + 10] < spec.solarize_p).tolist()
    out = []
    for i in range(len(u)):
        if jitter[i]:
            colour = {
                "jitter_order": tuple(op for op in _ORDERS[order[i]] if op in ops),
                "brightness": brightness[i],
                "contrast": contrast[i],
                "saturation": saturation[i],
                "hue": hue[i],
            }
        else:
            colour = {}
        out.append(
            ViewParams(
                top[i],
                left[i],
                h[i],
                w[i],
                flip[i],
                **colour,
                grayscale=grayscale[i],
                blur_sigma=sigma_list[i],
                solarize=solarize[i],
            )
        )
    return out


def views_params(
    heights: Sequence[int], widths: Sequence[int], specs: Sequence[ViewSpec], uniforms: np.ndarray
) -> list[list[ViewParams]]:
    """Parameters of every view of every sample of a batch, from a block of uniforms per sample.

    View ``i`` of a sample uses its uniforms ``[i * D, (i + 1) * D)`` with ``D =``
    :data:`DRAWS_PER_VIEW`, whatever the spec enables, so views never shift each other's draws.

    Args:
        heights: per sample, the decoded image height.
        widths: per sample, the decoded image width.
        specs: the view recipes.
        uniforms: float64 [B, D * len(specs)] in [0, 1).

    Returns:
        Per sample, one :class:`ViewParams` per spec.
    """
    d = DRAWS_PER_VIEW
    if uniforms.shape != (len(heights), d * len(specs)):
        raise ValueError(f"need uniforms of shape {(len(heights), d * len(specs))}, got {uniforms.shape}")
    hs, ws = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    per_view = [
        _params_from_uniforms(hs, ws, spec, uniforms[:, i * d : (i + 1) * d]) for i, spec in enumerate(specs)
    ]
    return [list(views) for views in zip(*per_view, strict=True)]


def blur_radius(sigma: float, size: int) -> int:
    """Gaussian kernel radius for ``sigma``: ``ceil(3 * sigma)``, at most ``size - 1`` (border reflection)."""
    return max(0, min(math.ceil(3 * sigma), size - 1))


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


def _jitter(x: torch.Tensor, op: int, params: ViewParams) -> torch.Tensor:
    if op == BRIGHTNESS:
        return F.adjust_brightness(x, params.brightness)
    if op == CONTRAST:
        return F.adjust_contrast(x, params.contrast)
    if op == SATURATION:
        return F.adjust_saturation(x, params.saturation)
    return F.adjust_hue(x, params.hue)


def _resized_crop(pixels: torch.Tensor, spec: ViewSpec, params: ViewParams) -> torch.Tensor:
    """One sample's crop, resized to uint8 ``size`` x ``size`` and flipped (torchvision)."""
    out = F.resized_crop(
        pixels,
        params.top,
        params.left,
        params.height,
        params.width,
        [spec.size, spec.size],
        interpolation=_INTERPOLATIONS[spec.interpolation],
        antialias=True,
    )
    return F.horizontal_flip(out) if params.flip else out


def _photometric(x: torch.Tensor, spec: ViewSpec, params: ViewParams) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarize of one view (float [3, S, S] in [0, 1])."""
    for op in params.jitter_order:
        x = _jitter(x, op, params)
    if params.grayscale:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur_sigma > 0:
        radius = blur_radius(params.blur_sigma, spec.size)
        if radius > 0:
            sigma = float(params.blur_sigma)
            x = F.gaussian_blur(x, [2 * radius + 1] * 2, [sigma, sigma])
    if params.solarize:
        x = torch.where(x >= spec.solarize_threshold / 255.0, 1.0 - x, x)
    return x


def render_batch_uint8(
    pixels: Sequence[torch.Tensor], spec: ViewSpec, params: Sequence[ViewParams]
) -> torch.Tensor:
    """Render one view of every sample of a batch on the CPU, as uint8 pixels (before normalization).

    Crop, resize and flip give uint8 ``size`` x ``size`` images: for small images of one size
    with an antialiased filter, all at once as matrix products (:mod:`data_pipelines.resample`,
    the same filter taps), otherwise one by one with torchvision's ``resized_crop``. Photometric
    steps then run per sample on float pixels in [0, 1], only where the sample's parameters ask
    for them, and are rounded back to 8 bits (as the papers' PIL pipelines keep their images).

    Args:
        pixels: per sample, uint8 [C, H, W] with C = 1 or 3.
        spec: the view recipe.
        params: per sample, the view's random decisions (from :func:`sample_view_params`).

    Returns:
        uint8 tensor [B, C, S, S]: C = 1 when the batch took the matrix path with only grey samples
        and no photometric step ran, else 3. :func:`normalize_view` turns it into the network's input.
    """
    sizes = {tuple(p.shape[1:]) for p in pixels}
    if len(sizes) == 1 and fits_batched(*next(iter(sizes)), spec.interpolation):
        grey = all(p.shape[0] == 1 for p in pixels)
        images = torch.stack([p if grey else p.expand(3, -1, -1) for p in pixels])
        boxes = [(q.top, q.left, q.height, q.width) for q in params]
        crops = resized_crops(images, boxes, [q.flip for q in params], spec.size, spec.interpolation)
    else:
        crops = torch.stack(
            [_resized_crop(p, spec, q).expand(3, -1, -1) for p, q in zip(pixels, params, strict=True)]
        )
    drawn = [
        i for i, q in enumerate(params) if q.jitter_order or q.grayscale or q.blur_sigma > 0 or q.solarize
    ]
    if not drawn:
        return crops
    x = F.to_dtype(crops.expand(-1, 3, -1, -1), torch.float32, scale=True)
    for i in drawn:
        x[i] = _photometric(x[i], spec, params[i])
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def normalize_view(images: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """uint8 [B, C, S, S] (C = 1 or 3) -> float32 [B, 3, S, S]: ``(x / 255 - mean) / std``, in one pass.

    Runs on the tensor's device: the ``wds`` loader ships uint8 from its workers (a quarter of the
    bytes, a twelfth for grey images) and normalizes in the training process, on the GPU when
    there is one.

    Args:
        images: uint8 pixels from :func:`render_batch_uint8`.
        spec: the view recipe (``mean``, ``std``).

    Returns:
        The normalized views.
    """
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    shift, scale = -mean * inv_std, inv_std / 255.0
    if images.device.type != "cpu":
        return torch.addcmul(shift, images.to(torch.float32), scale)
    # On the CPU, in chunks below PyTorch's parallel grain (32768 elements), so each op runs on the
    # calling thread: an intra-op parallel op waits for its slowest thread, and in a training process
    # sharing its cores with loader workers that can be a worker's whole time slice (~5 ms, measured).
    n, _, h, w = images.shape
    out = torch.empty(n, 3, h, w)
    step = max(1, _GRAIN // (3 * h * w))
    for i in range(0, n, step):
        torch.addcmul(shift, images[i : i + step].to(torch.float32), scale, out=out[i : i + step])
    return out


def render_batch(
    pixels: Sequence[torch.Tensor], spec: ViewSpec, params: Sequence[ViewParams]
) -> torch.Tensor:
    """Render one view of every sample of a batch on the CPU: :func:`render_batch_uint8`, normalized.

    Args:
        pixels: per sample, uint8 [C, H, W] with C = 1 or 3.
        spec: the view recipe.
        params: per sample, the view's random decisions (from :func:`sample_view_params`).

    Returns:
        float32 tensor [B, 3, S, S], normalized with ``spec.mean``/``spec.std``.
    """
    return normalize_view(render_batch_uint8(pixels, spec, params), spec)


def render_view(pixels: torch.Tensor, spec: ViewSpec, params: ViewParams) -> torch.Tensor:
    """Render one view of one sample on the CPU (:func:`render_batch` of a batch of one).

    Args:
        pixels: uint8 [C, H, W] image, C = 1 or 3.
        spec: the view recipe.
        params: the view's random decisions (from :func:`sample_view_params`).

    Returns:
        float32 tensor [3, S, S], normalized with ``spec.mean``/``spec.std``.
    """
    return render_batch([pixels], spec, [params])[0]


def apply_view(
    image: Image.Image | np.ndarray | torch.Tensor, spec: ViewSpec, generator: torch.Generator
) -> torch.Tensor:
    """Augment one image into one view (draw its parameters, then render on the CPU).

    Args:
        image: the decoded sample (PIL image, uint8 array or uint8 [C, H, W] tensor).
        spec: the view recipe.
        generator: source of all random decisions.

    Returns:
        float32 tensor [3, S, S], normalized with ``spec.mean``/``spec.std``.
    """
    pixels = to_uint8_tensor(image)
    _, height, width = pixels.shape
    return render_view(pixels, spec, sample_view_params(height, width, spec, generator))


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
    params = sample_views_params(int(pixels.shape[1]), int(pixels.shape[2]), specs, generator)
    return [render_view(pixels, spec, prm) for spec, prm in zip(specs, params, strict=True)]


def sample_views_params(
    height: int, width: int, specs: Sequence[ViewSpec], generator: torch.Generator
) -> list[ViewParams]:
    """Parameters of all views of one image (one block of draws: view ``i`` uses draws ``[i * D, (i + 1) * D)``).

    Args:
        height: decoded image height.
        width: decoded image width.
        specs: the view recipes.
        generator: per-sample generator.

    Returns:
        One :class:`ViewParams` per spec; the first equals ``sample_view_params`` from the same generator.
    """
    return views_params([height], [width], specs, _uniforms(generator, DRAWS_PER_VIEW * len(specs)))[0]


# ------------------------------------------------------------------------------------------------
# Recipes


def mae_views(
    size: int = 224,
    scale: tuple[float, float] = (0.2, 1.0),
    *,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    interpolation: str = "bicubic",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> list[ViewSpec]:
    """MAE pretraining augmentation: RandomResizedCrop + horizontal flip, nothing else.

    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (facebookresearch/mae
    ``main_pretrain.py``: ``RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3)``,
    ``RandomHorizontalFlip()``, ImageNet normalization).

    Args:
        size: output side.
        scale: crop area fraction range.
        ratio: crop aspect ratio range.
        hflip_p: flip probability.
        interpolation: resize filter.
        mean: normalization mean.
        std: normalization std.

    Returns:
        One view.
    """
    return [ViewSpec(size, scale, ratio, hflip_p, interpolation, mean, std)]


def dino_views(
    global_size: int = 224,
    local_size: int = 96,
    n_local: int = 8,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    *,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    color_jitter_p: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    grayscale_p: float = 0.2,
    global_blur_p: tuple[float, float] = (1.0, 0.1),
    local_blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: float = 0.2,
    solarize_threshold: float = 128.0,
    interpolation: str = "bicubic",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> list[ViewSpec]:
    """DINO multi-crop: two global views, then ``n_local`` local views.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
    (facebookresearch/dino ``main_dino.py``, ``DataAugmentationDINO``): every crop gets a flip,
    colour jitter (p 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) and grayscale
    (p 0.2); Gaussian blur (sigma 0.1-2) with p 1.0 on the first global view, 0.1 on the second and
    0.5 on local views; solarization (p 0.2) on the second global view only. The repository's
    default is 8 local crops (the paper's speed table uses 10).

    Args:
        global_size: side of the global views.
        local_size: side of the local views.
        n_local: number of local views.
        global_scale: crop area range of the global views.
        local_scale: crop area range of the local views.
        ratio: crop aspect ratio range.
        hflip_p: flip probability.
        color_jitter_p: probability of colour jitter.
        brightness: brightness jitter strength.
        contrast: contrast jitter strength.
        saturation: saturation jitter strength.
        hue: hue jitter strength (turns).
        grayscale_p: grayscale probability.
        global_blur_p: blur probability of the first and second global views.
        local_blur_p: blur probability of local views.
        blur_sigma: blur sigma range.
        solarize_p: solarization probability of the second global view.
        solarize_threshold: solarization threshold (0-255 scale).
        interpolation: resize filter.
        mean: normalization mean.
        std: normalization std.

    Returns:
        ``2 + n_local`` views: ``[global_1, global_2, local_1, ...]``.
    """
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    common = {
        "ratio": ratio,
        "hflip_p": hflip_p,
        "interpolation": interpolation,
        "mean": mean,
        "std": std,
        "color_jitter_p": color_jitter_p,
        "brightness": brightness,
        "contrast": contrast,
        "saturation": saturation,
        "hue": hue,
        "grayscale_p": grayscale_p,
        "blur_sigma": blur_sigma,
        "solarize_threshold": solarize_threshold,
    }
    first = ViewSpec(global_size, global_scale, blur_p=global_blur_p[0], **common)
    second = ViewSpec(global_size, global_scale, blur_p=global_blur_p[1], solarize_p=solarize_p, **common)
    local = ViewSpec(local_size, local_scale, blur_p=local_blur_p, **common)
    return [first, second, *([local] * n_local)]


def clip_views(
    size: int = 224,
    scale: tuple[float, float] = (0.9, 1.0),
    *,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> list[ViewSpec]:
    """CLIP training augmentation: RandomResizedCrop(scale 0.9-1), no flip, CLIP normalization.

    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML
    2021, as trained by OpenCLIP (Cherti et al., CVPR 2023; ``open_clip/transform.py``
    ``image_transform(is_train=True)``). Captions come with the batch when ``data.text_key`` is
    set (see :mod:`data_pipelines.tokenizer`).

    Args:
        size: output side.
        scale: crop area fraction range.
        ratio: crop aspect ratio range.
        interpolation: resize filter.
        mean: normalization mean.
        std: normalization std.

    Returns:
        One view.
    """
    return [ViewSpec(size, scale, ratio, 0.0, interpolation, mean, std)]


VIEW_RECIPES: dict[str, Callable[..., list[ViewSpec]]] = {
    "mae": mae_views,
    "dino": dino_views,
    "clip": clip_views,
}


def view_recipe(name: str, **overrides: object) -> list[ViewSpec]:
    """The views of a named recipe (``mae``, ``dino``, ``clip``) with keyword overrides.

    Args:
        name: recipe name.
        **overrides: keyword arguments of the recipe function.

    Returns:
        The recipe's views.

    Raises:
        KeyError: unknown recipe name (the message lists the valid ones).
    """
    if name not in VIEW_RECIPES:
        raise KeyError(f"unknown view recipe {name!r}; valid: {', '.join(VIEW_RECIPES)}")
    return VIEW_RECIPES[name](**overrides)

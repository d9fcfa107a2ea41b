"""The DALI backend (``data.backend=dali``): the slot stream of :mod:`data_pipelines.wds`, pixels by DALI.

Division of work (one source of truth for the data order and the randomness):

* **Host (Python, this process).** :class:`DaliBatches` is a :class:`~data_pipelines.wds.SlotBatches`:
  for batch ``b`` it plans exactly the samples the ``wds`` backend would (same slots, positions,
  corrupt-sample replacement), reads their encoded bytes from the shards, checks each image's
  header (:func:`probe_image`: format, size, truncation; no pixel decoding), and draws every view's
  :class:`~data_pipelines.augment.ViewParams` from the same per-sample uniforms as the CPU path.
  Labels, captions (tokenized) and keys never enter DALI.
* **DALI graph.** Encoded bytes and per-sample parameters enter through ``fn.external_source``;
  DALI decodes (``device="mixed"``, nvJPEG / the hardware JPEG decoder, on a GPU; its CPU decoders
  without one), then for each view: crop + resize in one step (``fn.resize`` with the crop box as
  ``roi_start``/``roi_end``; a one-view recipe decodes only the crop with
  ``fn.decoders.image_slice``), colour jitter + grayscale as one per-sample affine colour
  transform (``fn.coord_transform``, see below), Gaussian blur (separable ``fn.filter`` with the
  per-sample kernel on the CPU, ``fn.gaussian_blur`` on the GPU: the same kernel), solarization by
  arithmetic (``x ^ 255`` where ``x >= threshold``), and flip + normalization + HWC->CHW in
  ``fn.crop_mirror_normalize``.

Colour jitter as one affine transform. Brightness (``b * x``), saturation (blend with the grey
image), grayscale and contrast (blend with the image's mean grey level) are affine in the pixel
values; DALI's hue is a rotation about the grey axis of RGB space (DALI's own ``hue``/``hsv``
operators rotate the YIQ chroma plane instead; the grey-axis rotation is closer to an HSV shift).
Composed in the sampled random order, the four ops and grayscale give ``A @ x + (v . mean(x)) u``
per pixel, where ``mean(x)`` is the per-channel mean of the resized view (computed in the graph)
and ``A``, ``u``, ``v`` are computed here per sample: one pass over the pixels instead of five.
This equals torchvision's ``ColorJitter`` applied in the same order exactly for brightness,
contrast, saturation and grayscale, except that values are clamped to [0, 255] once at the end
instead of after every op; hue differs from torchvision's HSV hue shift by the colour model (same
angle; on photos the two differ by a mean of ~1.5 / 3.6 / 5.7 grey levels for shifts of
0.02 / 0.05 / 0.1 turns). ``tests/test_data_dali.py`` measures both.

Corrupt data. DALI cannot skip a sample that fails to decode: the whole batch fails. So (1)
``build_shards`` decodes every image once at build time; (2) the host check rejects empty,
non-image and truncated files (and transcodes formats DALI cannot read) before feeding, counting
them like the ``wds`` backend does; (3) if DALI still fails on a batch, the pending batches'
images are decoded with PIL (and, if PIL reads them all, one by one with DALI) to find the bad
ones, they are marked corrupt, and the pipeline is rebuilt and resumes at the failed batch, so one
bad image never ends the job and the stream stays a function of the step.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data_pipelines.augment import (
    BRIGHTNESS,
    CONTRAST,
    GRAY_WEIGHTS,
    HUE,
    SATURATION,
    ViewParams,
    ViewSpec,
    blur_radius,
)
from data_pipelines.pnm import parse_header
from data_pipelines.wds import (
    CorruptSample,
    PlannedBatch,
    ShardSet,
    SlotBatches,
    SlotStream,
    _CorruptStats,
    decode_image,
)

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
# Formats DALI's decoders read (PIL format names); others are transcoded to PNG on the host.
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
_TAIL = 1024  # bytes searched for the end-of-image marker
_W = np.array(GRAY_WEIGHTS, dtype=np.float64)
_ONES = np.ones(3, dtype=np.float64)
_EYE = np.eye(3)
_GREY = np.outer(_ONES, _W)  # every channel := luma
_AXIS = _ONES / math.sqrt(3.0)
_CROSS = np.array([[0.0, -_AXIS[2], _AXIS[1]], [_AXIS[2], 0.0, -_AXIS[0]], [-_AXIS[1], _AXIS[0], 0.0]])
_CROSS2 = _CROSS @ _CROSS


class DaliUnavailableError(ImportError):
    """NVIDIA DALI is not installed, or a GPU was asked for and there is none."""


def import_dali() -> Any:
    """Import ``nvidia.dali`` or raise :class:`DaliUnavailableError` saying how to install it."""
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        raise DaliUnavailableError(
            "data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or the [dali] extra); "
            f"import failed: {exc}"
        ) from exc
    return dali


def resolve_device(device: str) -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``; checks ``gpu`` is possible.

    Args:
        device: ``auto``, ``cpu`` or ``gpu``.

    Returns:
        ``cpu`` or ``gpu``.
    """
    if device not in DEVICES:
        raise ValueError(f"data.dali_device {device!r} is not valid; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise DaliUnavailableError("data.dali_device=gpu but CUDA is not available; use cpu or auto")
    return device


# ------------------------------------------------------------------------------------------------
# Host side: image checks and per-sample parameters


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...; not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame segment, walking the marker segments."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(
                data[pos + 7 : pos + 9], "big"
            )
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a valid JPEG
            return None
        pos += 2 + length
    return None


def _fast_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, height, width) of a JPEG, PNG or binary PGM/PPM from its header alone; else ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(data)
        return ("JPEG", *size) if size else None
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return "PNG", int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    pnm = parse_header(data)
    if pnm is not None:
        return "PPM", pnm.height, pnm.width
    return None


def probe_image(data: bytes, ext: str) -> tuple[int, int, bytes]:
    """Check an encoded image without decoding its pixels.

    JPEG and PNG sizes are read straight from their headers (a few microseconds: the host feeds
    thousands of images per second to a GPU); other files are opened with PIL. A JPEG without an
    end-of-image marker or a PNG without an ``IEND`` chunk near its end (a truncated file) is
    decoded fully, and rejected if that fails; formats DALI cannot decode are decoded with PIL and
    passed on as PNG. Damage a header check cannot see is caught when DALI fails (see the module
    docstring).

    Args:
        data: the file bytes.
        ext: member extension (for messages).

    Returns:
        (height, width, bytes to feed DALI).

    Raises:
        CorruptSample: empty, not an image, or truncated/undecodable.
    """
    if not data:
        raise CorruptSample(f"empty {ext} member (0 bytes)")
    fast = _fast_size(data)
    if fast is not None:
        fmt, height, width = fast
    else:
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            fmt = image.format
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise CorruptSample(f"cannot decode {ext}: {type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise CorruptSample(f"{ext} image has zero size {width}x{height}")
    if fmt not in DALI_FORMATS:
        pixels = decode_image(data, ext)
        if pixels.mode not in ("L", "RGB"):
            pixels = pixels.convert("RGB")
        buf = io.BytesIO()
        pixels.save(buf, format="PNG")
        return height, width, buf.getvalue()
    tail = data[-_TAIL:]
    if (fmt == "JPEG" and b"\xff\xd9" not in tail) or (fmt == "PNG" and b"IEND" not in tail):
        decode_image(data, ext)  # raises CorruptSample for a truncated file
    pnm = parse_header(data) if fmt == "PPM" else None
    if pnm is not None and len(data) < pnm.offset + pnm.raster_bytes:
        raise CorruptSample(
            f"{ext} raster is truncated ({len(data) - pnm.offset} of {pnm.raster_bytes} bytes)"
        )
    return height, width, data


def gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """Normalized 1-D Gaussian taps ``exp(-x^2 / (2 sigma^2))`` for ``x`` in ``[-radius, radius]``.

    Args:
        sigma: standard deviation in pixels.
        radius: half width (0: the identity kernel ``[1]``).

    Returns:
        float32 array of ``2 * radius + 1`` taps summing to 1.
    """
    if radius == 0 or sigma <= 0:
        return np.ones(1, dtype=np.float32)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _hue_matrix(turns: float) -> np.ndarray:
    """Rotation by ``turns`` (fraction of a full turn) about the grey axis (1, 1, 1) of RGB space.

    The linear stand-in for torchvision's HSV hue shift: it keeps grey pixels and the mean of
    R, G, B, and turns colours the same way (red towards yellow for positive shifts). On natural
    images it is closer to the HSV shift than a YIQ chroma rotation (mean error 1.5 / 3.6 / 5.7
    of 255 for shifts of 0.02 / 0.05 / 0.1 turns, against 2.2 / 5.5 / 9.1).
    """
    theta = 2 * math.pi * turns
    return _EYE + math.sin(theta) * _CROSS + (1 - math.cos(theta)) * _CROSS2


def color_transform(params: ViewParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compose a view's colour jitter (in its sampled order) and grayscale into one affine map.

    The result maps a pixel ``x`` (RGB, any scale) of an image whose per-channel mean is ``m`` to
    ``A @ x + (v . m) * u``.

    Args:
        params: the view's parameters.

    Returns:
        (A [3, 3], u [3], v [3]) as float32 arrays.
    """
    a = _EYE
    u = np.zeros(3)
    v = np.zeros(3)
    for op in params.jitter_order:
        if op == BRIGHTNESS:
            a, u = params.brightness * a, params.brightness * u
            continue
        if op == SATURATION:
            s = params.saturation
            step = s * _EYE + (1 - s) * _GREY
        elif op == HUE:
            step = _hue_matrix(params.hue)
        else:
            assert op == CONTRAST
            c = params.contrast
            # grey mean of the current image = w . (a @ m); contrast happens once, so u == 0 here
            v = a.T @ _W
            a = c * a
            u = (1 - c) * _ONES
            continue
        a = step @ a
        u = step @ u
    if params.grayscale:
        a, u = _GREY @ a, _GREY @ u
    return a.astype(np.float32), u.astype(np.float32), v.astype(np.float32)


@dataclass(frozen=True)
class _ViewOps:
    """Which DALI operators a view's graph needs (static), from its spec."""

    color: bool
    contrast: bool
    blur: bool
    solarize: bool

    @classmethod
    def of(cls, spec: ViewSpec) -> _ViewOps:
        ops = spec.jitter_ops
        return cls(
            color=bool(ops) or spec.grayscale_p > 0,
            contrast=CONTRAST in ops,
            blur=spec.blur_p > 0,
            solarize=spec.solarize_p > 0,
        )


_INTERP = {
    "bicubic": "INTERP_CUBIC",
    "bilinear": "INTERP_LINEAR",
    "nearest": "INTERP_NN",
    "nearest-exact": "INTERP_NN",
}


def _feed_names(i: int, ops: _ViewOps, device: str, slice_decode: bool) -> list[str]:
    names = [f"start{i}", f"end{i}", f"flip{i}"]
    if ops.color:
        names += [f"cmat{i}", f"cshift{i}", f"cweight{i}"] if ops.contrast else [f"cmat{i}"]
    if ops.blur:
        names += [f"sigma{i}", f"window{i}"] if device == "gpu" else [f"krow{i}", f"kcol{i}"]
    if ops.solarize:
        names.append(f"solar{i}")
    return names


def _view_arrays(
    spec: ViewSpec, ops: _ViewOps, params: ViewParams, device: str, slice_decode: bool
) -> list[np.ndarray]:
    """The per-sample arrays fed for one view, in :func:`_feed_names` order."""
    box_type = np.int32 if slice_decode else np.float32  # decoder slice: int; resize ROI: float
    out = [
        np.array([params.top, params.left], dtype=box_type),
        np.array([params.top + params.height, params.left + params.width], dtype=box_type),
        np.array(int(params.flip), dtype=np.int32),
    ]
    if ops.color:
        a, u, v = color_transform(params)
        out += [a, u, v] if ops.contrast else [a]
    if ops.blur:
        radius = blur_radius(params.blur_sigma, spec.size) if params.blur_sigma > 0 else 0
        if device == "gpu":
            out += [
                np.array(max(params.blur_sigma, 1e-3), dtype=np.float32),
                np.array(2 * radius + 1, dtype=np.int32),
            ]
        else:
            k = gaussian_kernel(params.blur_sigma, radius)
            out += [k.reshape(1, -1), k.reshape(-1, 1)]
    if ops.solarize:
        out.append(np.array(255 if params.solarize else 0, dtype=np.uint8))
    return out


# ------------------------------------------------------------------------------------------------
# The DALI graph


def build_pipeline(
    views: Sequence[ViewSpec],
    *,
    batch_size: int,
    device: str,
    num_threads: int,
    device_id: int | None,
    prefetch: int,
    seed: int,
    hw_decoder_load: float | None = None,
) -> Any:
    """Build the DALI pipeline that renders ``views`` from fed bytes and parameters.

    Args:
        views: view recipes.
        batch_size: samples per batch.
        device: ``cpu`` (CPU operators) or ``gpu`` (mixed decode, GPU operators).
        num_threads: DALI CPU threads.
        device_id: CUDA device (``None`` on the CPU).
        prefetch: batches DALI runs ahead (``prefetch_queue_depth``).
        seed: DALI's own seed (unused by the graph: all randomness is fed).
        hw_decoder_load: share of JPEGs for the hardware decoder (``mixed`` only; ``None``: DALI's default).

    Returns:
        The built pipeline; outputs are one float32 CHW view batch per view.
    """
    dali = import_dali()
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    ops = [_ViewOps.of(v) for v in views]
    slice_decode = len(views) == 1

    @dali.pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed % (2**31),
        prefetch_queue_depth=prefetch,
    )
    def pipeline() -> tuple:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
        decoder_args: dict[str, Any] = {"output_type": types.RGB, "adjust_orientation": False}
        decoder_args["device"] = "mixed" if device == "gpu" else "cpu"
        if device == "gpu" and hw_decoder_load is not None:
            decoder_args["hw_decoder_load"] = hw_decoder_load
        decoded = None if slice_decode else fn.decoders.image(encoded, **decoder_args)
        outputs = []
        for i, (spec, op) in enumerate(zip(views, ops, strict=True)):
            feeds = {name: fn.external_source(name=name) for name in _feed_names(i, op, device, slice_decode)}
            interp = getattr(types, _INTERP[spec.interpolation])
            if slice_decode:
                crop = fn.decoders.image_slice(
                    encoded, start=feeds[f"start{i}"], end=feeds[f"end{i}"], axis_names="HW", **decoder_args
                )
                x = fn.resize(crop, size=(spec.size, spec.size), interp_type=interp, antialias=True)
            else:
                x = fn.resize(
                    decoded,
                    size=(spec.size, spec.size),
                    roi_start=feeds[f"start{i}"],
                    roi_end=feeds[f"end{i}"],
                    roi_relative=False,
                    interp_type=interp,
                    antialias=True,
                )
            if op.color:
                if op.contrast:
                    mean = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)  # [3] per sample
                    weight = feeds[f"cweight{i}"]
                    shift = feeds[f"cshift{i}"]
                    if device == "gpu":
                        weight, shift = weight.gpu(), shift.gpu()
                    offset = fn.reductions.sum(mean * weight, axes=[0]) * shift  # [3]
                    if device == "gpu":  # argument inputs must live on the CPU: add as a tensor
                        x = fn.coord_transform(x, M=feeds[f"cmat{i}"], dtype=types.FLOAT) + offset
                        x = fn.cast(dmath.clamp(x, 0.0, 255.0), dtype=types.UINT8)
                    else:
                        x = fn.coord_transform(x, M=feeds[f"cmat{i}"], T=offset, dtype=types.UINT8)
                else:
                    x = fn.coord_transform(x, M=feeds[f"cmat{i}"], dtype=types.UINT8)
            if op.blur:
                if device == "gpu":
                    x = fn.gaussian_blur(x, sigma=feeds[f"sigma{i}"], window_size=feeds[f"window{i}"])
                else:
                    x = fn.filter(fn.filter(x, feeds[f"krow{i}"]), feeds[f"kcol{i}"])
            if op.solarize:
                threshold = math.ceil(spec.solarize_threshold)
                flag = feeds[f"solar{i}"]
                if device == "gpu":
                    flag = flag.gpu()
                x = x ^ ((x >= threshold) * flag)
            outputs.append(
                fn.crop_mirror_normalize(
                    x,
                    mirror=feeds[f"flip{i}"],
                    mean=[255.0 * m for m in spec.mean],
                    std=[255.0 * s for s in spec.std],
                    dtype=types.FLOAT,
                    output_layout="CHW",
                )
            )
        return tuple(outputs)

    pipe = pipeline()
    pipe.build()
    return pipe


def _single_decode_fails(data: bytes) -> str | None:
    """Decode one image alone with DALI's CPU decoder; the error text, or ``None`` when it works."""
    dali = import_dali()
    from nvidia.dali import fn, types

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def one() -> Any:
        return fn.decoders.image(fn.external_source(name="x"), device="cpu", output_type=types.RGB)

    pipe = one()
    pipe.build()
    pipe.feed_input("x", [np.frombuffer(data, dtype=np.uint8)])
    try:
        pipe.run()
    except RuntimeError as exc:
        return _dali_error_line(exc)
    return None


def _dali_error_line(exc: Exception) -> str:
    """The informative line of a DALI pipeline error (the one after ``encountered:``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("encountered"):
            return lines[i + 1][:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


# ------------------------------------------------------------------------------------------------
# The iterator


@dataclass
class _Pending:
    batch: int
    plan: PlannedBatch
    host: dict[str, Any]
    stats_before: dict[int, _CorruptStats]


class DaliBatches(SlotBatches):
    """Infinite stream of collated batches for one rank, rendered by DALI.

    Arguments as :class:`~data_pipelines.wds.SlotBatches`, plus:

    Args:
        device: ``auto``, ``cpu`` or ``gpu`` (see :func:`resolve_device`).
        num_threads: DALI CPU threads per rank.
        prefetch: batches DALI prepares ahead.
        hw_decoder_load: share of JPEGs for the GPU's hardware decoder (``None``: DALI's default).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        views: Sequence[ViewSpec],
        *,
        device: str = "auto",
        num_threads: int = 2,
        prefetch: int = 2,
        hw_decoder_load: float | None = None,
        **kwargs: Any,
    ) -> None:
        import_dali()
        self.device = resolve_device(device)
        super().__init__(shard_set, views, **kwargs)
        self.num_threads, self.prefetch, self.hw_decoder_load = num_threads, prefetch, hw_decoder_load
        self.ops = [_ViewOps.of(v) for v in self.views]
        self.slice_decode = len(self.views) == 1
        self.device_id = torch.cuda.current_device() if self.device == "gpu" else None
        self._streams: dict[int, SlotStream] = {}
        self._stats: dict[int, _CorruptStats] = {}

    def prepare(self, ext: str, data: bytes) -> tuple[int, int, bytes, torch.Tensor | None]:
        height, width, data = probe_image(data, ext)
        return height, width, data, None

    def _build(self) -> Any:
        return build_pipeline(
            self.views,
            batch_size=self.batch_size,
            device=self.device,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch=self.prefetch,
            seed=self.seed,
            hw_decoder_load=self.hw_decoder_load,
        )

    def _plan(self, b: int) -> _Pending:
        """Plan rank batch ``b``: batch ``b // N`` of the slot of worker ``b % N`` (as ``wds``)."""
        slot = self.slot_id(b % self.workers)
        if slot not in self._streams:
            self._streams[slot] = self.slot_stream(slot)
            self._stats[slot] = _CorruptStats()
        before = copy.deepcopy(self._stats)
        plan = self.plan(self._streams[slot], b // self.workers, self._stats[slot])
        return _Pending(b, plan, self.host_fields(plan), before)

    def _feed(self, pipe: Any, pending: _Pending) -> None:
        plan = pending.plan
        pipe.feed_input("encoded", [np.frombuffer(s.image, dtype=np.uint8) for s in plan.samples])
        names = [_feed_names(i, op, self.device, self.slice_decode) for i, op in enumerate(self.ops)]
        columns: dict[str, list[np.ndarray]] = {name: [] for view_names in names for name in view_names}
        for params in self.view_params(plan):
            for spec, op, prm, view_names in zip(self.views, self.ops, params, names, strict=True):
                arrays = _view_arrays(spec, op, prm, self.device, self.slice_decode)
                for name, array in zip(view_names, arrays, strict=True):
                    columns[name].append(array)
        for name, arrays in columns.items():
            pipe.feed_input(name, arrays)

    def _stream(self) -> tuple[Any, ...]:
        """``run()``'s argument: on the GPU, outputs are made ready on torch's current stream."""
        if self.device == "cpu":
            return ()
        return (torch.cuda.current_stream(self.device_id).cuda_stream,)

    def _to_torch(self, outputs: Sequence[Any]) -> list[torch.Tensor]:
        if self.device == "cpu":
            return [torch.from_numpy(out.as_array()) for out in outputs]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensors = []
        for out in outputs:
            dense = out.as_tensor()
            t = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
            feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(self.device_id))
            tensors.append(t)
        return tensors

    def _find_bad(self, pending: Sequence[_Pending], error: Exception) -> int:
        """After a DALI failure: find undecodable images of the pending batches; returns how many."""
        found = 0
        candidates: dict[tuple[int, int], bytes] = {}
        for p in pending:
            for s in p.plan.samples:
                candidates.setdefault(s.location, s.image)
        for location, data in candidates.items():
            try:
                decode_image(data, "image")
            except CorruptSample as exc:
                self.known_bad[location] = f"DALI failed on this batch; {exc}"
                found += 1
        if not found:  # PIL reads them all: ask DALI, one image at a time
            for location, data in candidates.items():
                reason = _single_decode_fails(data)
                if reason is not None:
                    self.known_bad[location] = f"DALI cannot decode it: {reason}"
                    found += 1
        for location in candidates:
            if location in self.known_bad:
                shard = self.reader.shards[location[0]]
                key = self.reader.index(location[0])[location[1]].key
                log.warning(
                    "DALI: marking sample %s of shard %s corrupt (%s)",
                    key,
                    shard.path,
                    self.known_bad[location],
                )
        if found:
            log.warning(
                "DALI failed on a batch (%s); %d undecodable image(s) found and skipped",
                _dali_error_line(error),
                found,
            )
        return found

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pipe = self._build()
        pending: deque[_Pending] = deque()
        next_batch = self.start_batch
        try:
            while True:
                while len(pending) < self.prefetch:
                    item = self._plan(next_batch)
                    self._feed(pipe, item)
                    pending.append(item)
                    next_batch += 1
                try:
                    outputs = pipe.run(*self._stream())
                except RuntimeError as exc:
                    if not self._find_bad(list(pending), exc):
                        raise
                    self._stats = pending[0].stats_before  # those batches are planned again
                    next_batch = pending[0].batch
                    pending.clear()
                    del pipe
                    pipe = self._build()
                    continue
                done = pending.popleft()
                yield {"images": self._to_torch(outputs), **done.host}
        finally:
            self.reader.close()

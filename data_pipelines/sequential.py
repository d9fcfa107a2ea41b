"""A finite, ordered, deterministic pass over WebDataset shards, for evaluation.

The training loader (:mod:`data_pipelines.loader`) is an infinite, resampled, augmented stream.
Evaluations need the opposite: every sample exactly once, in a fixed order, with a fixed
(non-random) transform. This module provides it:

* **Order.** Samples are numbered ``0 .. N-1`` in shard order (manifest order, or sorted file
  names) and archive order inside each shard. A sample's number is its *index*; every batch
  carries the indices of its samples, so results can be matched to samples across runs and ranks.
* **Ranks.** With ``world_size`` ranks, rank ``r`` takes the samples whose position ``p`` in the
  requested index list satisfies ``p % world_size == r`` (for the full data set: index
  ``i % world_size == r``). Gathering every rank's output and sorting by index gives exactly the
  single-rank result.
* **Reading.** Samples are read by random access through the DALI-format ``.idx`` files written
  beside every shard (:func:`data_pipelines.tar_index.load_index`; the tar headers are scanned
  when an index is missing), so any subset (e.g. the 1 % of labels of a few-label protocol) costs
  only what it reads.
* **Transform** (:class:`EvalTransform`): the standard evaluation transform of the ImageNet
  literature (resize the shorter side to ``size / crop_pct``, ``crop_pct = 0.875``, i.e. 256 for
  224, then a central ``size x size`` crop; e.g. He et al. 2022, Caron et al. 2021), or a plain
  resize to ``size x size`` (what tiny 28 px data wants), or nothing (images already at ``size``).
  Grey images become three channels; pixels are scaled to [0, 1] and normalized with mean/std.
* **Corrupt samples** (undecodable, truncated, missing label when labels are required) are not
  replaced (that would change the evaluated set): they are dropped from their batch, logged and
  counted (:attr:`ShardSequence.num_corrupt` of the process that read them).

Usage::

    for batch in iter_dataset("data/fmnist/test", img_size=28, mean=m, std=s, batch_size=256):
        batch.images   # float32 [B, 3, S, S]
        batch.labels   # int64 [B] (-1 when the data set has no labels)
        batch.indices  # int64 [B], global sample indices, ascending within the rank
        batch.texts    # list of caption lists (with_text=True), else None
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from data_pipelines.wds import (
    CorruptSample,
    ShardReader,
    ShardSet,
    check_shard_sizes,
    decode_sample,
    resolve_shards,
)
from pretrain.fileio import sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "RESIZE_MODES",
    "EvalBatch",
    "EvalTransform",
    "ShardSequence",
    "data_identity",
    "iter_dataset",
    "rank_positions",
]

RESIZE_MODES = ("center_crop", "resize", "none")
_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
TEXT_EXTS = ("txt", "caption", "text")


class ImageSizeError(ValueError):
    """An image does not have the size the transform requires (``resize="none"``)."""


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic evaluation transform: resize (+ centre crop), 3 channels, normalize.

    Attributes:
        size: output side ``S`` (the checkpoint's image size).
        resize: ``"center_crop"``: resize the shorter side to ``int(size / crop_pct)`` then crop the
            central ``S x S`` (the standard ImageNet eval transform, 256 -> 224); ``"resize"``: resize
            the whole image to ``S x S`` (aspect ratio not kept; for tiny square data such as 28 px
            Fashion-MNIST); ``"none"``: the image must already be ``S x S``.
        crop_pct: crop fraction for ``center_crop`` (0.875 in DINO's and MAE's eval code).
        interpolation: ``bicubic`` (MAE, DINO), ``bilinear`` or ``nearest``.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by.
    """

    size: int
    resize: str = "center_crop"
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"EvalTransform.size must be a positive int, got {self.size!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"EvalTransform.resize {self.resize!r} is not valid; choose one of {RESIZE_MODES}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"EvalTransform.crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"EvalTransform.interpolation {self.interpolation!r} is not valid; "
                f"choose one of {', '.join(_INTERPOLATIONS)}"
            )
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"EvalTransform.mean/std need 3 values (std > 0), got {mean} / {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (part of the feature-cache key and of every result file)."""
        return {
            "size": self.size,
            "resize": self.resize,
            "crop_pct": self.crop_pct if self.resize == "center_crop" else None,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Transform one decoded image.

        Args:
            image: PIL image of any mode.

        Returns:
            float32 ``[3, S, S]``.

        Raises:
            ImageSizeError: ``resize="none"`` and the image is not ``S x S``.
        """
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        pixels = TF.pil_to_tensor(image)  # uint8 [C, H, W], C in (1, 3)
        height, width = pixels.shape[-2:]
        mode = _INTERPOLATIONS[self.interpolation]
        if self.resize == "center_crop":
            short = int(self.size / self.crop_pct)
            pixels = TF.resize(pixels, [short], interpolation=mode, antialias=True)  # shorter side -> short
            pixels = TF.center_crop(pixels, [self.size, self.size])
        elif self.resize == "resize":
            if (height, width) != (self.size, self.size):
                pixels = TF.resize(pixels, [self.size, self.size], interpolation=mode, antialias=True)
        elif (height, width) != (self.size, self.size):
            raise ImageSizeError(
                f"image is {width}x{height} but {self.size}x{self.size} is required (resize='none')"
            )
        if pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1)  # grey -> RGB
        out = pixels.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return out.sub_(mean).div_(std)  # [3, S, S]


def _decode_texts(components: dict[str, bytes]) -> list[str]:
    """Captions of a sample: every non-empty line of its text member(s)."""
    texts: list[str] = []
    for ext in TEXT_EXTS:
        raw = components.get(ext)
        if raw is not None:
            texts += [line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    return texts


class ShardSequence(Dataset):
    """Random access to the samples of a shard set by global index (map-style dataset).

    Args:
        shards: a shard spec understood by :func:`data_pipelines.wds.resolve_shards` (directory with
            ``manifest.json``, glob, brace pattern) or an already resolved :class:`ShardSet`.
        transform: applied to each decoded image (``None``: return the PIL image).
        require_labels: a sample without a ``.cls`` member is corrupt (else its label is -1).
        with_text: also return the sample's captions (``.txt`` members, one caption per line).

    Each item is a dict ``{"image", "label", "index", "texts"}``, or ``None`` for a corrupt sample.
    File handles are opened lazily per process, so the dataset can be sent to DataLoader workers.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | ShardSet,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        require_labels: bool = False,
        with_text: bool = False,
    ) -> None:
        self.shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
        check_shard_sizes(self.shard_set)  # a truncated copy would silently shrink the evaluated set
        self.transform = transform
        self.require_labels = require_labels
        self.with_text = with_text
        self.num_corrupt = 0
        self._reader: ShardReader | None = None
        self._reader_pid = -1
        counts = [self.reader.count(i) for i in range(len(self.shard_set.shards))]
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)

    @property
    def classes(self) -> list[str] | None:
        """Class names from the manifest (``None`` without a manifest)."""
        return self.shard_set.classes

    @property
    def reader(self) -> ShardReader:
        """This process's shard reader.

        A forked DataLoader worker inherits the parent's open files, and a shared file offset would
        interleave reads between processes: every process opens its own handles.
        """
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = ShardReader(self.shard_set.shards)
            self._reader_pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # open file handles stay in the process that opened them
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (shard number, sample number inside the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def key(self, index: int) -> str:
        """``"<shard name>/<sample key>"`` of a global index."""
        shard, j = self.locate(index)
        return f"{self.reader.shards[shard].name}/{self.reader.index(shard)[j].key}"

    def read(self, index: int) -> tuple[Image.Image, int, list[str]]:
        """Decode sample ``index``: (image, label, captions).

        Raises:
            CorruptSample: the sample cannot be used.
        """
        shard, j = self.locate(index)
        _, components = self.reader.read(shard, j)
        image, label = decode_sample(components, self.require_labels)
        texts = _decode_texts(components) if self.with_text else []
        if self.with_text and not texts:
            raise CorruptSample("no caption (.txt member) although captions are required")
        return image, label, texts

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            image, label, texts = self.read(index)
        except CorruptSample as exc:
            self.num_corrupt += 1
            log.warning("skipping corrupt sample %d (%s): %s", index, self.key(index), exc)
            return None
        out = self.transform(image) if self.transform is not None else image
        return {"image": out, "label": label, "index": index, "texts": texts}

    def _members(self, exts: Sequence[str]) -> Iterator[tuple[int, dict[str, bytes]]]:
        """(index, ext -> bytes) of the given members of every sample, without decoding images."""
        for s, shard in enumerate(self.reader.shards):
            entries = self.reader.index(s)
            with open(shard.path, "rb") as f:
                for j, entry in enumerate(entries):
                    found = {}
                    if not entry.problem:
                        for ext in exts:
                            member = entry.components.get(ext)
                            if member is not None:
                                f.seek(member.offset)
                                found[ext] = f.read(member.size)
                    yield self._starts[s] + j, found

    def labels(self) -> torch.Tensor:
        """Every sample's class index (``.cls`` members only, no image decoding; -1 where missing or bad).

        Returns:
            int64 ``[N]`` in index order.
        """
        out = torch.full((len(self),), -1, dtype=torch.int64)
        for index, found in self._members(("cls",)):
            try:
                out[index] = int(found["cls"].decode("ascii").strip())
            except (KeyError, UnicodeDecodeError, ValueError):
                continue
        return out

    def captions(self) -> list[list[str]]:
        """Every sample's captions (``.txt`` members, one caption per line; no image decoding).

        Returns:
            One list of captions per sample, in index order (empty where there is none).
        """
        out: list[list[str]] = [[] for _ in range(len(self))]
        for index, found in self._members(TEXT_EXTS):
            out[index] = _decode_texts(found)
        return out

    def image_sizes(self, indices: Sequence[int]) -> set[tuple[int, int]]:
        """(width, height) of the images at ``indices`` (decoded; corrupt ones skipped)."""
        sizes = set()
        for i in indices:
            try:
                image, _, _ = self.read(i)
            except CorruptSample:
                continue
            sizes.add(image.size)
        return sizes


@dataclass
class EvalBatch:
    """One batch of an evaluation pass.

    Attributes:
        images: float32 ``[B, 3, S, S]``.
        labels: int64 ``[B]`` (-1 where unknown).
        indices: int64 ``[B]`` global sample indices.
        texts: captions per sample (only with ``with_text``), else ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    texts: list[list[str]] | None = None

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``images, labels, indices``."""
        return iter((self.images, self.labels, self.indices))


def _collate(items: list[dict[str, Any] | None], with_text: bool) -> EvalBatch:
    good = [it for it in items if it is not None]
    if not good:
        return EvalBatch(torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    return EvalBatch(
        images=torch.stack([it["image"] for it in good]),
        labels=torch.tensor([it["label"] for it in good], dtype=torch.int64),
        indices=torch.tensor([it["index"] for it in good], dtype=torch.int64),
        texts=[it["texts"] for it in good] if with_text else None,
    )


class _Collate:
    """Picklable collate function (DataLoader workers)."""

    def __init__(self, with_text: bool) -> None:
        self.with_text = with_text

    def __call__(self, items: list[dict[str, Any] | None]) -> EvalBatch:
        return _collate(items, self.with_text)


def rank_positions(num: int, rank: int, world_size: int) -> range:
    """Positions ``p`` in ``[0, num)`` that rank ``rank`` handles: ``p % world_size == rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return range(rank, num, world_size)


def iter_dataset(
    shards: str | os.PathLike[str] | ShardSet | ShardSequence,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    resize: str = "center_crop",
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    indices: Sequence[int] | None = None,
    require_labels: bool = False,
    with_text: bool = False,
) -> Iterator[EvalBatch]:
    """One finite, ordered pass over (a subset of) a shard set, split over ranks.

    Args:
        shards: shard spec, :class:`ShardSet` or an existing :class:`ShardSequence` (its transform
            is replaced by the one described by the arguments below).
        img_size: output side ``S``.
        mean: normalization mean (3 values).
        std: normalization std (3 values).
        batch_size: samples per batch on this rank (the last batch may be smaller; batches lose
            their corrupt samples).
        rank: this rank.
        world_size: number of ranks.
        num_workers: DataLoader worker processes (0: read in this process). Any value gives the same
            batches in the same order.
        resize: ``center_crop`` | ``resize`` | ``none`` (see :class:`EvalTransform`).
        crop_pct: crop fraction of ``center_crop``.
        interpolation: resize filter.
        indices: the global sample indices to visit, in this order (default: all, ascending).
        require_labels: samples without a label are corrupt.
        with_text: return captions (``.txt`` members) too; samples without one are corrupt.

    Yields:
        :class:`EvalBatch` (unpacks as ``images, labels, indices``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = EvalTransform(
        size=img_size,
        resize=resize,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )
    if isinstance(shards, ShardSequence):
        dataset = shards
        dataset.transform, dataset.require_labels, dataset.with_text = transform, require_labels, with_text
    else:
        dataset = ShardSequence(shards, transform, require_labels=require_labels, with_text=with_text)
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    mine = [order[p] for p in rank_positions(len(order), rank, world_size)]
    if not mine:
        return
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_Collate(with_text),
        persistent_workers=False,
    )
    yield from loader


def data_identity(shards: str | os.PathLike[str] | ShardSet | ShardSequence) -> dict[str, Any]:
    """What identifies a data set in result files and feature-cache keys.

    With a manifest: its path, SHA-256, fingerprint, split, sample and class counts. Without one: the
    shard paths and sizes (hashed): this changes when shards move or change size, but not on a same-size
    edit (build shards with a manifest for a content-based identity).

    Args:
        shards: a shard spec, a resolved :class:`ShardSet` or a :class:`ShardSequence`.

    Returns:
        A JSON-able dict; ``"id"`` is a short hash of the contents (manifest SHA-256 or shard list, and
        the sample count), independent of where the directory lives.
    """
    if isinstance(shards, ShardSequence):
        shard_set, num = shards.shard_set, len(shards)
    else:
        shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
        num = None
    out: dict[str, Any] = {"origin": shard_set.origin, "num_shards": len(shard_set.shards)}
    manifest = shard_set.manifest
    if manifest is not None:
        manifest_path = Path(shard_set.origin)
        out.update(
            manifest=str(manifest_path.resolve()),
            manifest_sha256=sha256_file(manifest_path),
            fingerprint=manifest.get("fingerprint"),
            split=manifest.get("split"),
            num_samples=manifest.get("num_samples"),
            num_classes=len(manifest["classes"]) if manifest.get("classes") else None,
        )
    else:
        h = hashlib.sha256()
        for s in shard_set.shards:
            h.update(f"{s.path.resolve()}:{s.path.stat().st_size}\n".encode())
        out.update(shards_sha256=h.hexdigest())
    if num is not None:
        out["num_samples"] = num
    content = out.get("manifest_sha256") or out.get("shards_sha256")
    out["id"] = hashlib.sha256(f"{content}:{out.get('num_samples')}".encode()).hexdigest()[:16]
    return out

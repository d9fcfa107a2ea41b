"""Sample sources for shard building: where raw samples come from.

A source is an indexed, deterministic sequence of :class:`SourceItem` (image + optional label,
metadata and extra members). :mod:`data_pipelines.build_shards` only talks to the
:class:`SampleSource` interface, so adding a source type (caption folders, CSV of paths and
captions, img2dataset shards, ...) is one subclass decorated with :func:`register_source`:

* ``kind``: a short name stored in the manifest;
* ``detect(path, split)``: whether ``path`` has this source's layout;
* ``open(path, split, limit)``: build it (list files, read headers) — deterministic order;
* ``__len__``, ``classes``, ``item(index)``, ``describe()``.

Sources must be reopenable in worker processes from :class:`SourceSpec` (kind, path, split,
limit), which is all that is sent to them.

Sources here:

* :class:`IdxSource` — MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` + labels), in file
  order. The test split's files are called ``t10k-*``.
* :class:`ImageFolderSource` — ``ROOT/<class>/**/<image>``; classes are the sorted sub-folder names
  (index = position), images sorted by (class, relative path). If ``ROOT/<split>`` exists (or
  ``ROOT/val`` for ``--split test``), that folder is the root.
"""

from __future__ import annotations

import gzip
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from data_pipelines import datasets

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
SPLITS = ("train", "test")


class SourceError(ValueError):
    """A source path is missing, has an unrecognised layout or holds no samples."""


@dataclass
class SourceItem:
    """One raw sample, before encoding and validation.

    Attributes:
        index: position in the source (0-based).
        key: WebDataset key (no dots, unique within the source).
        image: an encoded image file (``bytes``) or a uint8 pixel array (H x W or H x W x C).
        label: class index, or ``None`` when unlabelled.
        meta: JSON-serialisable metadata stored as ``<key>.json`` (source path, original index...).
        extras: further members, extension -> bytes (e.g. ``{"txt": caption}``).
    """

    index: int
    key: str
    image: bytes | np.ndarray
    label: int | None
    meta: dict[str, Any]
    extras: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceSpec:
    """What is needed to reopen a source in another process.

    Attributes:
        kind: registered source kind.
        path: resolved source path.
        split: ``train`` or ``test``.
        limit: only the first ``limit`` items, or ``None`` for all.
    """

    kind: str
    path: str
    split: str
    limit: int | None


class SampleSource(ABC):
    """An indexed, deterministic sequence of raw samples."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec

    @classmethod
    @abstractmethod
    def detect(cls, path: Path, split: str) -> bool:
        """Whether ``path`` has this source's layout."""

    @classmethod
    @abstractmethod
    def open(cls, path: Path, split: str, limit: int | None) -> SampleSource:
        """Open the source (raises :class:`SourceError` for a bad or empty one)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of items (after ``limit``)."""

    @property
    @abstractmethod
    def classes(self) -> list[str] | None:
        """Class names in label order, or ``None`` for an unlabelled source."""

    @abstractmethod
    def item(self, index: int) -> SourceItem:
        """The item at ``index`` (0 <= index < len)."""

    def describe(self) -> dict[str, Any]:
        """JSON description stored in the manifest's ``source`` field."""
        return {"kind": self.kind, "path": self.spec.path, "split": self.spec.split, "limit": self.spec.limit}

    @staticmethod
    def key_for(index: int, total: int) -> str:
        """Zero-padded decimal key (at least 9 digits) so keys sort like indices."""
        return f"{index:0{max(9, len(str(max(total - 1, 0))))}d}"


_REGISTRY: list[type[SampleSource]] = []


def register_source(cls: type[SampleSource]) -> type[SampleSource]:
    """Class decorator adding a source type; detection tries types in registration order.

    Args:
        cls: a :class:`SampleSource` subclass with a unique ``kind``.

    Returns:
        ``cls`` unchanged.
    """
    if not cls.kind or any(c.kind == cls.kind for c in _REGISTRY):
        raise ValueError(f"source kind {cls.kind!r} is empty or already registered")
    _REGISTRY.append(cls)
    return cls


def source_kinds() -> list[str]:
    """The registered source kinds, in detection order."""
    return [c.kind for c in _REGISTRY]


# ------------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8}


def _idx_path(directory: Path, prefix: str, part: str) -> Path | None:
    for name in (f"{prefix}-{part}", f"{prefix}-{part}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Args:
        path: ``*-idx1-ubyte`` / ``*-idx3-ubyte`` file, plain or ``.gz``.

    Returns:
        The array with the file's shape (uint8 data only).

    Raises:
        SourceError: not an IDX file, an unsupported data type or a truncated file.
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise SourceError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SourceError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES:
        raise SourceError(f"{path}: IDX data type 0x{dtype:02x} is not supported (only unsigned byte, 0x08)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 0
    offset = 4 + 4 * ndim
    if len(data) - offset < count:
        raise SourceError(
            f"{path} is truncated: header says {shape} but only {len(data) - offset} bytes follow"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=offset).reshape(shape)


@register_source
class IdxSource(SampleSource):
    """MNIST-style IDX image + label files, in file order."""

    kind = "idx"

    def __init__(
        self, spec: SourceSpec, images: np.ndarray, labels: np.ndarray, classes: list[str], files: list[str]
    ):
        super().__init__(spec)
        self.images, self.labels, self._classes, self.files = images, labels, classes, files

    @classmethod
    def detect(cls, path: Path, split: str) -> bool:
        return path.is_dir() and any(_idx_path(path, p, "images-idx3-ubyte") for p in _IDX_PREFIX.values())

    @classmethod
    def open(cls, path: Path, split: str, limit: int | None) -> IdxSource:
        prefix = _IDX_PREFIX[split]
        images_path = _idx_path(path, prefix, "images-idx3-ubyte")
        labels_path = _idx_path(path, prefix, "labels-idx1-ubyte")
        if images_path is None or labels_path is None:
            present = sorted(p.name for p in path.iterdir() if "idx" in p.name)
            raise SourceError(
                f"{path}: IDX files for split {split!r} not found: need {prefix}-images-idx3-ubyte[.gz] and "
                f"{prefix}-labels-idx1-ubyte[.gz]; present: {', '.join(present) or 'none'}"
            )
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise SourceError(
                f"{path}: IDX shapes do not match: images {images.shape} (need N x H x W), labels {labels.shape} (need N)"
            )
        if limit is not None:  # copies, so the full arrays can be freed
            images, labels = images[:limit].copy(), labels[:limit].copy()
        if len(images) == 0:
            raise SourceError(f"empty source: {images_path} holds no images")
        known = datasets.known_for_directory(path)
        num_classes = int(labels.max()) + 1
        classes = list(known.classes) if known else [str(i) for i in range(num_classes)]
        spec = SourceSpec(cls.kind, str(path), split, limit)
        return cls(spec, images, labels, classes, [images_path.name, labels_path.name])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def classes(self) -> list[str]:
        return self._classes

    def item(self, index: int) -> SourceItem:
        label = int(self.labels[index])
        return SourceItem(
            index=index,
            key=self.key_for(index, len(self)),
            image=self.images[index],
            label=label,
            meta={"source": self.files[0], "index": index, "label": label, "class": self._classes[label]},
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "files": self.files}


# ------------------------------------------------------------------------------------------------
# ImageFolder


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@register_source
class ImageFolderSource(SampleSource):
    """``ROOT/<class>/**/<image>`` trees, classes sorted by name."""

    kind = "imagefolder"

    def __init__(self, spec: SourceSpec, root: Path, classes: list[str], files: list[tuple[str, int]]):
        super().__init__(spec)
        self.root, self._classes, self.files = root, classes, files

    @staticmethod
    def _root(path: Path, split: str) -> Path:
        for name in (split, "val") if split == "test" else (split,):
            if (path / name).is_dir():
                return path / name
        return path

    @classmethod
    def detect(cls, path: Path, split: str) -> bool:
        if not path.is_dir():
            return False
        return bool(_class_dirs(cls._root(path, split)))

    @classmethod
    def open(cls, path: Path, split: str, limit: int | None) -> ImageFolderSource:
        root = cls._root(path, split)
        classes = [d.name for d in _class_dirs(root)]
        files: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            rel = sorted(
                p.relative_to(root).as_posix()
                for p in (root / name).rglob("*")
                if p.is_file() and _is_image(p)
            )
            files += [(r, label) for r in rel]
        if not files:
            raise SourceError(
                f"empty source: {root} has class folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) "
                f"but no image files in them (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if limit is not None:
            files = files[:limit]
        return cls(SourceSpec(cls.kind, str(path), split, limit), root, classes, files)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def classes(self) -> list[str]:
        return self._classes

    def item(self, index: int) -> SourceItem:
        rel, label = self.files[index]
        data = (self.root / rel).read_bytes()
        return SourceItem(
            index=index,
            key=self.key_for(index, len(self)),
            image=data,
            label=label,
            meta={"source": rel, "index": index, "label": label, "class": self._classes[label]},
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root)}


# ------------------------------------------------------------------------------------------------
# Opening


def _layouts_help(path: Path) -> str:
    return (
        f"valid SOURCE layouts: a known data set name ({', '.join(sorted(datasets.KNOWN_DATASETS))}); "
        f"a directory with IDX files (train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz], "
        f"t10k-* for the test split); or an ImageFolder tree {path}/<class>/<image>.jpg|png|... "
        f"(optionally under {path}/train and {path}/test)"
    )


def open_source(
    source: str | os.PathLike[str], split: str = "train", limit: int | None = None
) -> SampleSource:
    """Open a source from a path or a known data set name.

    Args:
        source: a directory (IDX files or ImageFolder tree) or a name such as ``fashion-mnist``.
        split: ``train`` or ``test``.
        limit: keep only the first ``limit`` items (``None``: all).

    Returns:
        The opened source.

    Raises:
        SourceError: missing path, unrecognised layout or empty source, naming the path and the
            valid layouts.
        datasets.DatasetNotFoundError: a known name whose files are nowhere to be found.
    """
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if limit is not None and limit <= 0:
        raise SourceError(f"limit must be a positive number of samples, got {limit}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists() and datasets.is_known(text):
        path = datasets.locate_dataset(text)
    if not path.exists():
        raise SourceError(f"source {text!r} does not exist; {_layouts_help(path)}")
    path = path.resolve()
    if path.is_dir() and not any(path.iterdir()):
        raise SourceError(f"empty source: directory {path} is empty; {_layouts_help(path)}")
    for cls in _REGISTRY:
        if cls.detect(path, split):
            return cls.open(path, split, limit)
    what = "a file" if path.is_file() else "a directory whose layout is not recognised"
    if path.is_dir() and any(_is_image(p) for p in path.iterdir()):
        what = "a flat folder of images (ImageFolder needs one sub-folder per class)"
    raise SourceError(f"unrecognised source layout: {path} is {what}; {_layouts_help(path)}")


_OPENED: dict[SourceSpec, SampleSource] = {}


def remember(source: SampleSource) -> None:
    """Make :func:`reopen` in this process return ``source`` (avoids opening it twice).

    Args:
        source: an opened source.
    """
    _OPENED[source.spec] = source


def forget(spec: SourceSpec) -> None:
    """Drop a cached source (frees its memory).

    Args:
        spec: the source's spec.
    """
    _OPENED.pop(spec, None)


def reopen(spec: SourceSpec) -> SampleSource:
    """Open a source again from its spec (cached per process; used by shard-writing workers).

    Args:
        spec: the :attr:`SampleSource.spec` of a source opened elsewhere.

    Returns:
        The source.
    """
    if spec not in _OPENED:
        for cls in _REGISTRY:
            if cls.kind == spec.kind:
                _OPENED[spec] = cls.open(Path(spec.path), spec.split, spec.limit)
                break
        else:
            raise SourceError(f"unknown source kind {spec.kind!r}; registered: {', '.join(source_kinds())}")
    return _OPENED[spec]

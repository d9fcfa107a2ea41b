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

Sources here (auto-detection tries them in this order; ``--source-type`` forces one):

* :class:`IdxSource` — MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` + labels), in file
  order. The test split's files are called ``t10k-*``.
* :class:`CaptionFolderSource` — a tree of images with a caption file beside each
  (``<name>.png`` + ``<name>.txt``, first line = caption), like the Tux Paint stamps
  (``/usr/share/tuxpaint/stamps``). Detected when at least half of the images have a caption
  file. ``<name>_mirror.*`` / ``<name>_flip.*`` images beside ``<name>.*`` are mirrored variants of
  the same picture and are left out; an image without (or with an empty) caption is skipped with
  that reason.
* :class:`ImageFolderSource` — ``ROOT/<class>/**/<image>``; classes are the sorted sub-folder names
  (index = position), images sorted by (class, relative path). If ``ROOT/<split>`` exists (or
  ``ROOT/val`` for ``--split test``), that folder is the root.
* :class:`CsvSource` — a ``.csv`` / ``.tsv`` file of ``path,caption`` rows (header optional: a
  first row naming the columns, e.g. ``filepath,title``, is recognised and may put them in any
  order); relative paths are resolved against the file's folder. Rows that are malformed, name
  a missing file or have an empty caption are skipped with the reason.

Items a source cannot turn into a sample raise :class:`SkipSample` (the build records the reason).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from data_pipelines import datasets

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
SPLITS = ("train", "test")


class SourceError(ValueError):
    """A source path is missing, has an unrecognised layout or holds no samples."""


class SkipSample(Exception):
    """An item that cannot become a sample (bad image, missing caption...); the message is the reason."""


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
    extra_members: ClassVar[tuple[str, ...]] = ()  # extensions of SourceItem.extras (e.g. ("txt",))

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

    def item_path(self, index: int) -> str:
        """Where item ``index`` comes from, for the manifest's list of skipped items."""
        return f"{self.spec.path}#{index}"

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
# Folders of images with a caption file beside each

CAPTION_EXT = ".txt"
VARIANT_SUFFIXES = ("_mirror", "_flip")
VECTOR_EXTENSIONS = frozenset({".svg", ".svgz"})
_DETECT_SAMPLE = 200


def _split_root(path: Path, split: str) -> Path:
    for name in (split, "val") if split == "test" else (split,):
        if (path / name).is_dir():
            return path / name
    return path


def _images_under(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and _is_image(p)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _first_images(root: Path, n: int) -> list[Path]:
    """Up to ``n`` images under ``root`` in sorted walk order, without listing a whole large tree."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_image(p):
                found.append(p)
                if len(found) >= n:
                    return found
    return found


def _is_variant(path: Path) -> bool:
    """``x_mirror.png`` / ``x_flip.png`` beside an image ``x.*``: a mirrored copy of the same picture."""
    for suffix in VARIANT_SUFFIXES:
        if path.stem.endswith(suffix):
            base = path.stem[: -len(suffix)]
            if any((path.parent / f"{base}{ext}").is_file() for ext in IMAGE_EXTENSIONS):
                return True
    return False


def read_caption(path: Path) -> str:
    """The caption in a text file: its first line, stripped.

    Args:
        path: the caption file.

    Returns:
        The caption.

    Raises:
        SkipSample: the file is missing, not UTF-8, or its first line is empty.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SkipSample(f"missing caption: no {path.name} beside the image") from None
    except UnicodeDecodeError:
        raise SkipSample(f"caption file {path.name} is not UTF-8 text") from None
    caption = text.splitlines()[0].strip() if text.strip() else ""
    if not caption:
        raise SkipSample(f"empty caption in {path.name}")
    return caption


@register_source
class CaptionFolderSource(SampleSource):
    """Images with a caption file beside each (``<name>.<image ext>`` + ``<name>.txt``), unlabelled."""

    kind = "captions"
    extra_members = ("txt",)

    def __init__(self, spec: SourceSpec, root: Path, files: list[str], ignored: dict[str, int]):
        super().__init__(spec)
        self.root, self.files, self.ignored = root, files, ignored

    @classmethod
    def detect(cls, path: Path, split: str) -> bool:
        if not path.is_dir():
            return False
        images = [p for p in _first_images(_split_root(path, split), _DETECT_SAMPLE) if not _is_variant(p)]
        with_caption = sum(p.with_suffix(CAPTION_EXT).is_file() for p in images)
        return bool(images) and 2 * with_caption >= len(images)

    @classmethod
    def open(cls, path: Path, split: str, limit: int | None) -> CaptionFolderSource:
        root = _split_root(path, split)
        images = _images_under(root)
        variants = [p for p in images if _is_variant(p)]
        files = [p.relative_to(root).as_posix() for p in images if not _is_variant(p)]
        vectors = sum(
            1
            for p in root.rglob("*")
            if p.suffix.lower() in VECTOR_EXTENSIONS and p.with_suffix(CAPTION_EXT).is_file()
        )
        if not files:
            raise SourceError(
                f"empty source: {root} has no image files (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if variants or vectors:
            log.info(
                "%s: left out %d mirrored variants (*_mirror/*_flip) and %d vector images (.svg) with captions",
                root,
                len(variants),
                vectors,
            )
        if limit is not None:
            files = files[:limit]
        ignored = {"mirrored_variants": len(variants), "vector_images": vectors}
        return cls(SourceSpec(cls.kind, str(path), split, limit), root, files, ignored)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def classes(self) -> None:
        return None

    def item(self, index: int) -> SourceItem:
        rel = self.files[index]
        caption = read_caption((self.root / rel).with_suffix(CAPTION_EXT))
        return SourceItem(
            index=index,
            key=self.key_for(index, len(self)),
            image=(self.root / rel).read_bytes(),
            label=None,
            meta={"source": rel, "index": index},
            extras={"txt": caption.encode("utf-8")},
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root), "ignored": self.ignored}

    def item_path(self, index: int) -> str:
        return str(self.root / self.files[index])


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
        return _split_root(path, split)

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

    def item_path(self, index: int) -> str:
        return str(self.root / self.files[index][0])


# ------------------------------------------------------------------------------------------------
# CSV / TSV of image paths and captions

PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "txt", "description")
CSV_SUFFIXES = (".csv", ".tsv")


@register_source
class CsvSource(SampleSource):
    """A ``.csv`` / ``.tsv`` of ``path,caption`` rows (optional header), unlabelled."""

    kind = "csv"
    extra_members = ("txt",)

    def __init__(
        self, spec: SourceSpec, base: Path, rows: list[tuple[int, list[str]]], columns: tuple[int, int]
    ):
        super().__init__(spec)
        self.base, self.rows, self.columns = base, rows, columns

    @classmethod
    def detect(cls, path: Path, split: str) -> bool:
        return path.is_file() and path.suffix.lower() in CSV_SUFFIXES

    @classmethod
    def open(cls, path: Path, split: str, limit: int | None) -> CsvSource:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read caption table {path}: {exc}") from exc
        first = text.split("\n", 1)[0]
        delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
        rows = [
            (line, row)
            for line, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1)
            if any(cell.strip() for cell in row)
        ]
        columns = (0, 1)
        if rows:
            header = [cell.strip().lower() for cell in rows[0][1]]
            path_col = next((header.index(n) for n in PATH_COLUMNS if n in header), None)
            text_col = next((header.index(n) for n in CAPTION_COLUMNS if n in header), None)
            if path_col is not None and text_col is not None:
                columns = (path_col, text_col)
                rows = rows[1:]
        if not rows:
            raise SourceError(
                f"empty source: {path} has no rows (expected 'path{delimiter}caption' per line, header optional)"
            )
        if limit is not None:
            rows = rows[:limit]
        return cls(SourceSpec(cls.kind, str(path), split, limit), path.parent, rows, columns)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def classes(self) -> None:
        return None

    def _row(self, index: int) -> tuple[int, str, str]:
        line, row = self.rows[index]
        need = max(self.columns) + 1
        if len(row) < need:
            raise SkipSample(f"malformed row {line}: {len(row)} column(s), need {need} (path, caption)")
        return line, row[self.columns[0]].strip(), row[self.columns[1]].strip()

    def item(self, index: int) -> SourceItem:
        line, rel, caption = self._row(index)
        if not rel:
            raise SkipSample(f"row {line} has an empty path")
        if not caption:
            raise SkipSample(f"missing caption: row {line} has an empty caption")
        return SourceItem(
            index=index,
            key=self.key_for(index, len(self)),
            image=(self.base / rel).read_bytes(),
            label=None,
            meta={"source": rel, "index": index, "row": line},
            extras={"txt": caption.encode("utf-8")},
        )

    def item_path(self, index: int) -> str:
        line, row = self.rows[index]
        rel = row[self.columns[0]].strip() if len(row) > self.columns[0] else ""
        return str(self.base / rel) if rel else f"{self.spec.path}:{line}"


# ------------------------------------------------------------------------------------------------
# Opening


def _layouts_help(path: Path) -> str:
    return (
        f"valid SOURCE layouts: a known data set name ({', '.join(sorted(datasets.KNOWN_DATASETS))}); "
        f"a directory with IDX files (train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz], "
        f"t10k-* for the test split); an ImageFolder tree {path}/<class>/<image>.jpg|png|... "
        f"(optionally under {path}/train and {path}/test); a folder of images with a caption file "
        f"beside each (<name>.jpg + <name>.txt); or a .csv/.tsv file of path,caption rows"
    )


def open_source(
    source: str | os.PathLike[str], split: str = "train", limit: int | None = None, kind: str | None = None
) -> SampleSource:
    """Open a source from a path or a known data set name.

    Args:
        source: a directory (IDX files, caption folder or ImageFolder tree), a ``.csv``/``.tsv``
            file, or a name such as ``fashion-mnist``.
        split: ``train`` or ``test``.
        limit: keep only the first ``limit`` items (``None``: all).
        kind: force a source kind (:func:`source_kinds`) instead of detecting the layout.

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
    if kind is not None:
        for cls in _REGISTRY:
            if cls.kind == kind:
                return cls.open(path, split, limit)
        raise SourceError(f"unknown source type {kind!r}; valid: {', '.join(source_kinds())}")
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

"""The slot stream: a deterministic, resumable, infinite stream of batches from WebDataset shards.

This module decides *which* samples every batch holds and seeds *every* random augmentation
decision; the pixels are then produced by the CPU renderer here (``data.backend=wds``) or by the
DALI graph of :mod:`data_pipelines.dali` (``data.backend=dali``), which share :class:`SlotBatches`.

Design (the stream is a pure function of ``(seed, batch number, rank, world_size, num_workers,
mix_shards)``):

* **Slots.** With ``W`` ranks and ``N`` loader workers per rank (``N = 0`` counts as one), there
  are ``W * N`` slots; slot ``s = rank * N + worker`` owns the shards ``k`` with
  ``k % (W * N) == s``. Slots never share a shard, so ranks never see the same sample in a step.
  The DALI backend has no worker processes but plays the same ``N`` slots in turn, so both
  backends read the same stream for the same config.
* **Slot stream** (:class:`SlotStream`). Each slot reads an infinite sequence of sample
  positions ``p = 0, 1, ...``; epoch ``e`` is positions ``[e * E, (e + 1) * E)`` with ``E`` the
  number of samples the slot owns. Epoch ``e`` orders the slot's non-empty shards by a
  permutation seeded by ``(seed, slot, e)`` and cuts that order into groups of ``M =
  mix_shards`` consecutive shards (``data.mix_shards``, default 16; the last group may be
  smaller). The groups are read one after the other; within group ``g`` the samples of all its
  shards are read in one permutation of their union seeded by ``(seed, slot, e, g)``. So a batch
  draws from up to ``M`` shards at once -- the random-access analogue of WebDataset's shuffle
  buffer across shards -- and, with ``build_shards``' global shuffle, from the whole data set
  even when the source was class-sorted. Position ``p`` is mapped to (epoch, group, shard,
  sample) from the per-shard sample counts alone, and the sample is read by random access (a
  slice of the shard's memory map at its tar offset from the shard's index), so jumping to any
  position costs nothing. A slot holds the permutation of its current group (and the one
  before: 8 bytes per sample, ``M x`` shard size) and keeps every shard of the group mapped
  (:class:`ShardReader` keeps ``max(32, N * M)`` maps: the DALI backend plays ``N`` slots in one
  process), so memory and open files stay bounded by ``M``.
* **Batches.** Batch ``b`` of a rank is the ``(b // N)``-th batch of its worker ``b % N``, i.e.
  positions ``[n * B, (n + 1) * B)`` of that worker's slot with ``n = b // N``. A resumed run
  starting at batch ``b0`` has DataLoader worker ``w`` play the slot of worker ``(b0 + w) % N``
  (DataLoader hands out batches round-robin from worker 0), starting at its batch
  ``(b0 + w) // N``.
* **Augmentation.** Sample position ``p`` of slot ``s`` is augmented from a fixed block of
  uniforms, ``counter_uniforms(derive_seed(seed, s), p)``, from which
  :func:`data_pipelines.augment.views_params` draws every view's parameters; no global RNG state
  is used, and a whole batch's draws are a few array operations.
* **Corrupt samples** (undecodable, empty, truncated, missing image, label or caption, duplicate
  key) are counted (``num_corrupt`` of the batch) and replaced by another good sample of the same
  batch (augmented with the corrupt position's uniforms), so positions stay aligned. Each is
  logged once, with shard and key, for the first :data:`LOG_CORRUPT_PER_SHARD` of a shard; later
  ones get one summary line per shard at 10, 100, 1000, ... When a slot's running corrupt
  fraction exceeds ``max_corrupt_fraction`` after at least :data:`MIN_SAMPLES_FOR_FRACTION`
  samples, :class:`CorruptDataError` stops the job.
* **Shard sizes** are checked against the manifest's ``bytes`` when the stream is built
  (:func:`check_shard_sizes`, one ``stat`` per shard): a truncated copy is refused with
  :class:`ShardSpecError` before the first step instead of surfacing as corrupt samples hours later.

Resuming with a different world size (or ``num_workers``): the run continues at the same global
step ``s``; rank ``r`` of the new ``W'`` ranks starts at batch ``s * accum_steps`` of the
``W' x N'`` slot split, i.e. it reads exactly what a fresh ``W'``-rank run would read from step
``s`` on. Consequences (tested): every sample still comes from the new rank's own shards; no
sample appears twice within a step; each slot is at the epoch a ``W'``-rank run would have reached
at step ``s`` (so the number of passes over the data is kept, up to rounding), but the samples are
not the ones the ``W``-rank run would have read next, and some samples of the interrupted epoch
may be seen again or skipped once.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import logging
import math
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data_pipelines.augment import (
    DRAWS_PER_VIEW,
    ViewParams,
    ViewSpec,
    render_batch_uint8,
    to_uint8_tensor,
    views_params,
)
from data_pipelines.pnm import PNM_EXTS, decode_pnm
from data_pipelines.seeds import counter_uniforms, derive_seed, permutation
from data_pipelines.tar_index import SampleEntry, TarIndexError, load_index

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SUPPORTED_MANIFEST_VERSION = 1
MIN_SAMPLES_FOR_FRACTION = 100
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "pnm", "bmp", "tif", "tiff")
_TAG_SHARD_ORDER, _TAG_SAMPLE_ORDER, _TAG_AUGMENT = 1, 2, 3
_MAX_OPEN_FILES = 32
DEFAULT_MIX_SHARDS = 16
MAX_MIX_SHARDS = 64  # each shard of a group stays memory-mapped (one file descriptor each)
LOG_CORRUPT_PER_SHARD = 5  # corrupt samples of one shard logged one by one; then counted in summaries


class ShardSpecError(ValueError):
    """The shard specification (directory, manifest, glob, brace pattern) cannot be used."""


class CorruptDataError(RuntimeError):
    """Too many corrupt samples: the data, not the code, needs fixing."""


class CorruptSample(Exception):
    """One sample cannot be used; the message says why."""


# ------------------------------------------------------------------------------------------------
# Resolving shard specifications


@dataclass
class ShardInfo:
    """One shard file.

    Attributes:
        path: the tar file.
        index_path: its DALI index file (may not exist: then the tar is scanned).
        num_samples: sample count from the manifest, or ``None`` until the index is loaded.
        num_bytes: file size the manifest records (``None`` without one).
    """

    path: Path
    index_path: Path
    num_samples: int | None = None
    num_bytes: int | None = None

    @property
    def name(self) -> str:
        """Shard file stem, used in keys and messages."""
        return self.path.name.removesuffix(".tar")


@dataclass
class ShardSet:
    """The resolved shard list plus what the manifest says about it."""

    shards: list[ShardInfo]
    classes: list[str] | None = None
    manifest: dict[str, Any] | None = None
    origin: str = ""


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..123}`` numeric ranges (zero padding kept).

    Args:
        pattern: e.g. ``"data/shard-{000000..000009}.tar"``.

    Returns:
        The expanded strings, in order.
    """
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ShardSpecError(f"cannot read shard manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardSpecError(
            f"shard manifest {path} has no 'shards' list; rebuild it with data_pipelines.build_shards"
        )
    version = manifest.get("version")
    if not isinstance(version, int) or version > SUPPORTED_MANIFEST_VERSION:
        raise ShardSpecError(
            f"shard manifest {path} has version {version!r}; this code reads versions <= {SUPPORTED_MANIFEST_VERSION}"
        )
    return manifest


def resolve_shards(spec: str | os.PathLike[str]) -> ShardSet:
    """Resolve a shard specification to shard files.

    Args:
        spec: a directory with ``manifest.json`` (preferred; a directory without one uses its
            ``*.tar`` files), a ``manifest.json`` path, a glob (``data/*.tar``) or a brace pattern
            (``data/shard-{000000..000009}.tar``).

    Returns:
        The shards in a deterministic order (manifest order, or sorted).

    Raises:
        ShardSpecError: empty spec, missing path, unreadable manifest, or nothing matched.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ShardSpecError(
            "no shards given (data.shards is empty): set it to a directory built by "
            "`python -m data_pipelines.build_shards`, a glob or a brace pattern"
        )
    path = Path(text).expanduser()
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path if path.name == MANIFEST_NAME else None
    if manifest_path is not None and (manifest_path.exists() or not path.is_dir()):
        manifest = _read_manifest(manifest_path)
        root = manifest_path.parent
        shards = []
        for entry in manifest["shards"]:
            tar = root / entry["name"]
            idx = root / entry.get("index_file", Path(entry["name"]).with_suffix(".idx").name)
            if not tar.is_file():
                raise ShardSpecError(f"shard {tar} listed in {manifest_path} does not exist")
            num_bytes = entry.get("bytes")
            shards.append(
                ShardInfo(
                    tar,
                    idx,
                    int(entry["num_samples"]),
                    int(num_bytes) if isinstance(num_bytes, int) else None,
                )
            )
        if not shards:
            raise ShardSpecError(f"shard manifest {manifest_path} lists no shards")
        return ShardSet(shards, manifest.get("classes"), manifest, str(manifest_path))
    if path.is_dir():
        files = sorted(path.glob("*.tar"))
        if not files:
            raise ShardSpecError(f"directory {path} has neither {MANIFEST_NAME} nor *.tar shards")
        log.info("%s has no %s; using its %d *.tar files", path, MANIFEST_NAME, len(files))
    else:
        files = []
        for pattern in expand_braces(text):
            if glob.has_magic(pattern):
                files += [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
            elif Path(pattern).expanduser().is_file():
                files.append(Path(pattern).expanduser())
            else:
                raise ShardSpecError(f"shard {pattern} (from {text!r}) does not exist")
        if not files:
            raise ShardSpecError(f"no shard files match {text!r}")
    return ShardSet([ShardInfo(f, f.with_suffix(".idx")) for f in files], origin=text)


def check_shard_sizes(shard_set: ShardSet) -> None:
    """Refuse shards whose file size differs from the manifest's record (one ``stat`` per shard).

    A copy cut short (a full disk, an interrupted ``rsync``) otherwise trains until a slot reaches
    the missing samples, maybe hours later; this check finds it before the first step. Shards
    without a recorded size (no manifest, or a manifest that does not record ``bytes``) pass.

    Args:
        shard_set: resolved shards.

    Raises:
        ShardSpecError: naming every shard whose size differs, and how to check the copy.
    """
    wrong = []
    for shard in shard_set.shards:
        if shard.num_bytes is None:
            continue
        try:
            size = shard.path.stat().st_size
        except OSError as exc:
            raise ShardSpecError(f"cannot read shard {shard.path}: {exc.strerror or exc}") from exc
        if size != shard.num_bytes:
            wrong.append(f"{shard.path.name} is {size} bytes, the manifest says {shard.num_bytes}")
    if wrong:
        shown = "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        directory = Path(shard_set.origin).parent
        raise ShardSpecError(
            f"{len(wrong)} of {len(shard_set.shards)} shards in {directory} differ in size from "
            f"{shard_set.origin} (a truncated or incomplete copy?): {shown}. Copy them again or rebuild them; "
            f"python -m data_pipelines.verify_shards {directory} checks every shard's hash and samples"
        )


# ------------------------------------------------------------------------------------------------
# Reading samples


class ShardReader:
    """Random access to samples of shards (indexes loaded lazily, shards memory-mapped).

    Samples are read by slicing a read-only memory map of the shard (a seek + read on a buffered
    file costs ~25 us per member at random offsets, a slice ~1 us); the maps of the ``max_open``
    most recently used shards stay open (each holds a file descriptor).

    Args:
        shards: the shards.
        max_open: memory maps kept open (default :data:`_MAX_OPEN_FILES`).
    """

    def __init__(self, shards: Sequence[ShardInfo], max_open: int = _MAX_OPEN_FILES) -> None:
        self.shards = list(shards)
        self.max_open = max_open
        self._indexes: dict[int, list[SampleEntry]] = {}
        self._files: OrderedDict[int, mmap.mmap | bytes] = OrderedDict()

    def index(self, i: int) -> list[SampleEntry]:
        """Samples of shard ``i`` (loaded on first use; checked against the manifest count)."""
        if i not in self._indexes:
            shard = self.shards[i]
            try:
                entries = load_index(shard.path, shard.index_path)
            except TarIndexError as exc:
                raise ShardSpecError(str(exc)) from exc
            if shard.num_samples is not None and shard.num_samples != len(entries):
                raise ShardSpecError(
                    f"shard {shard.path}: the manifest says {shard.num_samples} samples but its index has "
                    f"{len(entries)}; rebuild the shards (python -m data_pipelines.build_shards)"
                )
            shard.num_samples = len(entries)
            self._indexes[i] = entries
        return self._indexes[i]

    def count(self, i: int) -> int:
        """Number of samples in shard ``i``."""
        n = self.shards[i].num_samples
        return n if n is not None else len(self.index(i))

    def _file(self, i: int) -> mmap.mmap | bytes:
        f = self._files.get(i)
        if f is None:
            with open(self.shards[i].path, "rb") as handle:
                try:
                    f = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                except ValueError:  # an empty file cannot be mapped; every read of it is short
                    f = b""
            self._files[i] = f
            if len(self._files) > self.max_open:
                _close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(i)
        return f

    def read(self, i: int, j: int, wanted: Collection[str] | None = None) -> tuple[str, dict[str, bytes]]:
        """Read sample ``j`` of shard ``i``.

        Args:
            i: shard index.
            j: sample index in the shard.
            wanted: read only these member extensions (``None``: all members).

        Returns:
            (key, extension -> bytes).

        Raises:
            CorruptSample: a problem recorded in the index, or a short read (truncated shard).
        """
        entry = self.index(i)[j]
        if entry.problem:
            raise CorruptSample(entry.problem)
        f = self._file(i)
        out = {}
        for ext, member in entry.components.items():
            if wanted is not None and ext not in wanted:
                continue
            data = f[member.offset : member.offset + member.size]
            if len(data) != member.size:
                raise CorruptSample(f"member {member.name} is truncated ({len(data)} of {member.size} bytes)")
            out[ext] = data
        return entry.key, out

    def close(self) -> None:
        """Close the cached memory maps."""
        while self._files:
            _close(self._files.popitem()[1])


def _close(f: mmap.mmap | bytes) -> None:
    if isinstance(f, mmap.mmap):
        f.close()


@dataclass
class Sample:
    """One usable sample of the stream, ready for a renderer.

    Attributes:
        key: ``"<shard>/<key>"``.
        location: (shard index, sample index) in the reader.
        image: the encoded image bytes.
        height: image height in pixels.
        width: image width in pixels.
        label: class index (-1 when unknown).
        caption: the caption text when captions are read, else ``None``.
        pixels: decoded uint8 [C, H, W] pixels (CPU renderer only).
    """

    key: str
    location: tuple[int, int]
    image: bytes
    height: int
    width: int
    label: int = -1
    caption: str | None = None
    pixels: torch.Tensor | None = None


def parse_sample(
    components: dict[str, bytes], *, require_label: bool, text_key: str = ""
) -> tuple[str, bytes, int, str | None]:
    """Check a sample's members and extract its image bytes, label and caption (no decoding).

    Args:
        components: extension -> bytes.
        require_label: a missing ``cls`` member makes the sample corrupt (else label -1).
        text_key: member extension of the caption (``"txt"``); empty: captions are not read.

    Returns:
        (image extension, image bytes, label, caption or ``None``).

    Raises:
        CorruptSample: no image member, empty image, bad or missing label, missing or empty caption.
    """
    ext = next((e for e in IMAGE_EXTS if e in components), None)
    if ext is None:
        raise CorruptSample(f"no image member (has: {', '.join(sorted(components)) or 'nothing'})")
    data = components[ext]
    if not data:
        raise CorruptSample(f"empty {ext} member (0 bytes)")
    label = -1
    raw = components.get("cls")
    if raw is None:
        if require_label:
            raise CorruptSample("missing cls member (the data set is labelled)")
    else:
        try:
            label = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise CorruptSample(f"cls member {raw[:20]!r} is not an ASCII integer") from None
    caption = None
    if text_key:
        blob = components.get(text_key)
        if blob is None:
            raise CorruptSample(f"missing caption: no {text_key} member")
        try:
            caption = blob.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CorruptSample(f"caption member {text_key} is not UTF-8 text") from None
        if not caption:
            raise CorruptSample(f"empty caption ({text_key} member)")
    return ext, data, label, caption


def decode_image(data: bytes, ext: str) -> Image.Image:
    """Fully decode an encoded image with PIL.

    Args:
        data: the file bytes.
        ext: its member extension (for messages).

    Returns:
        The decoded image.

    Raises:
        CorruptSample: undecodable or truncated data.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for bad data
        raise CorruptSample(f"cannot decode {ext}: {type(exc).__name__}: {exc}") from None
    return image


def decode_pixels(data: bytes, ext: str) -> torch.Tensor:
    """Decode an encoded image to uint8 [C, H, W] pixels (C = 1 or 3) for the CPU renderer.

    8-bit binary PGM/PPM is read directly (:mod:`data_pipelines.pnm`); every other format, and
    PNM variants, goes through PIL (:func:`decode_image`).

    Args:
        data: the file bytes.
        ext: its member extension.

    Returns:
        The pixels.

    Raises:
        CorruptSample: undecodable, zero-size or truncated data.
    """
    if ext in PNM_EXTS:
        try:
            pixels = decode_pnm(data)
        except ValueError as exc:
            raise CorruptSample(f"cannot decode {ext}: {exc}") from None
        if pixels is not None:
            return pixels
    return to_uint8_tensor(decode_image(data, ext))


def decode_sample(components: dict[str, bytes], require_label: bool) -> tuple[Image.Image, int]:
    """Decode a sample's image and class index.

    Args:
        components: extension -> bytes.
        require_label: a missing ``cls`` member makes the sample corrupt (else label -1).

    Returns:
        (decoded PIL image, label).

    Raises:
        CorruptSample: no image member, empty or undecodable image, bad or missing label.
    """
    ext, data, label, _ = parse_sample(components, require_label=require_label)
    return decode_image(data, ext), label


# ------------------------------------------------------------------------------------------------
# The slot stream


class SlotStream:
    """Maps a slot's sample positions to (shard, sample) without reading data.

    Epoch ``e`` takes the slot's non-empty shards in a permutation seeded by ``(seed, slot, e)``
    and cuts it into groups of ``mix_shards`` consecutive shards (the last group may be smaller);
    the groups are read one after the other, and the samples of a group in one permutation of
    the union of its shards' samples, seeded by ``(seed, slot, e, group)``. Only the permutations
    of the current group and the one before are kept (``mix_shards x`` shard size integers each).

    Args:
        reader: reader over *all* shards.
        shard_ids: indices (into ``reader.shards``) of the shards this slot owns.
        seed: run seed.
        slot: global slot id.
        mix_shards: shards whose samples are read interleaved (1: one shard after the other).
    """

    _KEEP_GROUPS = 2  # group permutations cached: the current one and the one before

    def __init__(
        self, reader: ShardReader, shard_ids: Sequence[int], seed: int, slot: int, *, mix_shards: int
    ) -> None:
        if mix_shards < 1:
            raise ValueError(f"mix_shards must be >= 1, got {mix_shards}")
        self.reader, self.shard_ids, self.seed, self.slot = reader, list(shard_ids), seed, slot
        self.mix_shards = mix_shards
        self.counts = [reader.count(i) for i in self.shard_ids]
        self.epoch_size = sum(self.counts)
        self._epoch: int | None = None
        self._groups: list[list[int]] = []  # per group: local shard numbers (into shard_ids)
        self._group_cum: list[int] = []  # cumulative group sizes within the epoch
        self._perms: OrderedDict[tuple[int, int], tuple[list[int], np.ndarray]] = OrderedDict()

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            order = permutation(
                len(self.shard_ids), derive_seed(_TAG_SHARD_ORDER, self.seed, self.slot, epoch)
            )
            order = [k for k in order if self.counts[k] > 0]
            self._groups = [order[i : i + self.mix_shards] for i in range(0, len(order), self.mix_shards)]
            self._group_cum, total = [], 0
            for group in self._groups:
                total += sum(self.counts[k] for k in group)
                self._group_cum.append(total)
            self._epoch = epoch

    def _group(self, epoch: int, g: int) -> tuple[list[int], np.ndarray]:
        """(cumulative sample counts of group ``g``'s shards, the permutation of its samples)."""
        key = (epoch, g)
        found = self._perms.get(key)
        if found is None:
            cum, total = [], 0
            for k in self._groups[g]:
                total += self.counts[k]
                cum.append(total)
            perm = permutation(total, derive_seed(_TAG_SAMPLE_ORDER, self.seed, self.slot, epoch, g))
            found = (cum, np.asarray(perm, dtype=np.int64))  # 8 bytes per sample, not a list's ~36
            self._perms[key] = found
            if len(self._perms) > self._KEEP_GROUPS:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return found

    def locate(self, position: int) -> tuple[int, int]:
        """The (shard index, sample index) read at ``position`` of this slot's stream."""
        epoch, rest = divmod(position, self.epoch_size)
        self._set_epoch(epoch)
        g = bisect.bisect_right(self._group_cum, rest)
        offset = rest - (self._group_cum[g - 1] if g else 0)
        cum, perm = self._group(epoch, g)
        u = int(perm[offset])  # a sample of the group's union, numbered shard after shard
        k = bisect.bisect_right(cum, u)
        sample = u - (cum[k - 1] if k else 0)
        return self.shard_ids[self._groups[g][k]], sample


# ------------------------------------------------------------------------------------------------
# Batch planning, shared by both backends


@dataclass
class _CorruptStats:
    seen: int = 0  # samples read by the slot
    corrupt: int = 0  # of those, corrupt (a sample read in two epochs counts twice)
    by_shard: dict[str, int] = field(default_factory=dict)  # corrupt reads per shard
    logged: set[tuple[str, str]] = field(default_factory=set)  # (shard, key) already reported
    distinct: dict[str, int] = field(default_factory=dict)  # distinct corrupt samples per shard


@dataclass
class PlannedBatch:
    """Which samples a batch holds and which position's uniforms augment each.

    Attributes:
        slot: global slot id the batch comes from.
        n: batch number within the slot.
        samples: ``B`` samples; corrupt positions hold a replacement from the same batch.
        positions: ``B`` slot positions; the position's uniforms augment entry ``i``.
        num_corrupt: corrupt samples that were replaced.
    """

    slot: int
    n: int
    samples: list[Sample]
    positions: list[int]
    num_corrupt: int


class SlotBatches:
    """The slot-based batch stream of one rank, independent of how pixels are produced.

    Subclasses choose how an image is checked (:meth:`prepare`) and rendered; both backends use
    :meth:`plan`, so they read the same samples in the same order, replace the same corrupt ones,
    and seed every augmentation identically (see the module docstring).

    Args:
        shard_set: resolved shards.
        views: view recipes.
        batch_size: samples per batch (per rank).
        rank: this rank.
        world_size: number of ranks.
        num_workers: loader slots per rank (0 counts as one).
        seed: run seed.
        mix_shards: shards a slot reads interleaved (see :class:`SlotStream`).
        start_batch: number of the first batch to produce.
        max_corrupt_fraction: stop when a slot's corrupt fraction exceeds this.
        require_labels: treat samples without ``cls`` as corrupt.
        text_key: caption member extension; empty: no captions (no ``text`` in batches).
        context_length: caption token length (``text`` is int64 [B, context_length]).
        return_keys: add ``keys`` (``"<shard>/<key>"`` per sample) to each batch.

    Raises:
        ShardSpecError: a shard whose size differs from the manifest (:func:`check_shard_sizes`),
            fewer shards than ``world_size * max(1, num_workers)`` slots, or a slot whose shards
            are all empty.
    """

    def __init__(
        self,
        shard_set: ShardSet,
        views: Sequence[ViewSpec],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        mix_shards: int = DEFAULT_MIX_SHARDS,
        start_batch: int = 0,
        max_corrupt_fraction: float = 0.01,
        require_labels: bool = False,
        text_key: str = "",
        context_length: int = 77,
        return_keys: bool = False,
    ) -> None:
        self.shard_set = shard_set
        self.views = list(views)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers = max(1, num_workers)
        self.seed, self.start_batch = seed, start_batch
        if not 1 <= mix_shards <= MAX_MIX_SHARDS:
            raise ValueError(f"mix_shards must be in [1, {MAX_MIX_SHARDS}], got {mix_shards}")
        self.mix_shards = mix_shards
        self.max_corrupt_fraction = max_corrupt_fraction
        self.require_labels, self.return_keys = require_labels, return_keys
        self.text_key, self.context_length = text_key, context_length
        self.known_bad: dict[tuple[int, int], str] = {}
        self.wanted = frozenset({*IMAGE_EXTS, "cls", *([text_key] if text_key else [])})  # never the json
        self.num_slots = world_size * self.workers
        if len(shard_set.shards) < self.num_slots:
            raise ShardSpecError(
                f"{len(shard_set.shards)} shards ({shard_set.origin}) are fewer than the {self.num_slots} loader "
                f"slots (world_size {world_size} x num_workers {self.workers}); every (rank, worker) needs at least "
                f"one shard: build more, smaller shards (--shard-size) or use fewer workers"
            )
        check_shard_sizes(shard_set)
        # One process may play every slot of the rank (DALI): keep all their groups' shards mapped.
        self.reader = ShardReader(shard_set.shards, max_open=max(_MAX_OPEN_FILES, self.workers * mix_shards))
        for worker in range(self.workers):  # fail early, in the main process, on empty slots
            slot = self.slot_id(worker)
            if sum(self.reader.count(i) for i in self.slot_shards(slot)) == 0:
                raise ShardSpecError(
                    f"loader slot {slot} (rank {rank}, worker {worker}) owns only empty shards"
                )
        if text_key:
            from data_pipelines.tokenizer import get_tokenizer

            get_tokenizer()  # load once here: forked worker processes inherit it

    def slot_id(self, worker: int) -> int:
        """Global slot id of this rank's ``worker``."""
        return self.rank * self.workers + worker

    def slot_shards(self, slot: int) -> list[int]:
        """Indices of the shards owned by ``slot``."""
        return list(range(slot, len(self.shard_set.shards), self.num_slots))

    def slot_stream(self, slot: int) -> SlotStream:
        """The position -> sample map of ``slot``."""
        return SlotStream(self.reader, self.slot_shards(slot), self.seed, slot, mix_shards=self.mix_shards)

    def uniforms(self, slot: int, positions: Sequence[int]) -> np.ndarray:
        """The uniforms that draw the augmentation of ``positions`` of ``slot`` (one row each)."""
        seed = derive_seed(_TAG_AUGMENT, self.seed, slot)
        return counter_uniforms(seed, positions, DRAWS_PER_VIEW * len(self.views))

    def prepare(self, ext: str, data: bytes) -> tuple[int, int, bytes, torch.Tensor | None]:
        """Check an image for the renderer: (height, width, bytes to use, decoded pixels or None).

        The CPU renderer decodes fully here (:func:`decode_pixels`); raises :class:`CorruptSample`
        when it cannot.
        """
        pixels = decode_pixels(data, ext)
        return int(pixels.shape[1]), int(pixels.shape[2]), data, pixels

    def plan(self, stream: SlotStream, n: int, stats: _CorruptStats) -> PlannedBatch:
        """Read and check the ``n``-th batch of a slot stream (positions ``[n * B, (n + 1) * B)``)."""
        positions = list(range(n * self.batch_size, (n + 1) * self.batch_size))
        found: list[Sample | None] = []
        for p in positions:
            shard_i, sample_j = stream.locate(p)
            shard_name = self.reader.shards[shard_i].name
            key = self.reader.index(shard_i)[sample_j].key
            try:
                if (shard_i, sample_j) in self.known_bad:
                    raise CorruptSample(self.known_bad[(shard_i, sample_j)])
                key, components = self.reader.read(shard_i, sample_j, self.wanted)
                ext, data, label, caption = parse_sample(
                    components, require_label=self.require_labels, text_key=self.text_key
                )
                height, width, data, pixels = self.prepare(ext, data)
                found.append(
                    Sample(
                        f"{shard_name}/{key}",
                        (shard_i, sample_j),
                        data,
                        height,
                        width,
                        label,
                        caption,
                        pixels,
                    )
                )
            except CorruptSample as exc:
                found.append(None)
                stats.corrupt += 1
                stats.by_shard[shard_name] = stats.by_shard.get(shard_name, 0) + 1
                _log_corrupt(stats, shard_name, key, self.reader.shards[shard_i].path, exc, stream.slot)
        stats.seen += len(positions)
        good = [s for s in found if s is not None]
        if not good:
            raise CorruptDataError(
                f"every sample of batch {n} of loader slot {stream.slot} is corrupt "
                f"(shards: {', '.join(sorted(stats.by_shard))}); check the data"
            )
        self._check_fraction(stats, stream.slot)
        samples, replacement = [], 0
        for item in found:
            if item is None:  # a good sample of the same batch, augmented with this position's uniforms
                item = good[replacement % len(good)]
                replacement += 1
            samples.append(item)
        return PlannedBatch(stream.slot, n, samples, positions, len(positions) - len(good))

    def _check_fraction(self, stats: _CorruptStats, slot: int) -> None:
        if stats.seen >= MIN_SAMPLES_FOR_FRACTION and stats.corrupt > self.max_corrupt_fraction * stats.seen:
            worst = sorted(stats.by_shard.items(), key=lambda kv: -kv[1])[:5]
            detail = ", ".join(f"{name}: {count}" for name, count in worst)
            raise CorruptDataError(
                f"{stats.corrupt} of {stats.seen} samples read by loader slot {slot} (rank {self.rank}) were corrupt "
                f"({stats.corrupt / stats.seen:.2%} > max_corrupt_fraction {self.max_corrupt_fraction:.2%}); "
                f"corrupt samples per shard: {detail}. Fix or rebuild these shards "
                f"(python -m data_pipelines.build_shards), or raise data.max_corrupt_fraction"
            )

    def host_fields(self, plan: PlannedBatch) -> dict[str, Any]:
        """The batch entries that do not depend on pixels: label, text, num_corrupt, keys."""
        out: dict[str, Any] = {
            "label": torch.tensor([s.label for s in plan.samples], dtype=torch.int64),
            "num_corrupt": plan.num_corrupt,
        }
        if self.text_key:
            from data_pipelines.tokenizer import tokenize

            out["text"] = tokenize([s.caption or "" for s in plan.samples], self.context_length)
        if self.return_keys:
            out["keys"] = [s.key for s in plan.samples]
        return out

    def view_params(self, plan: PlannedBatch) -> list[list[ViewParams]]:
        """Per sample, the parameters of every view, drawn from the sample position's uniforms."""
        heights, widths = [s.height for s in plan.samples], [s.width for s in plan.samples]
        return views_params(heights, widths, self.views, self.uniforms(plan.slot, plan.positions))


def _log_corrupt(stats: _CorruptStats, shard: str, key: str, path: Path, exc: Exception, slot: int) -> None:
    """Report a corrupt sample: once per sample, one by one for the first few of a shard, then summaries.

    A damaged shard (cut short, overwritten) has thousands of bad samples: the first
    :data:`LOG_CORRUPT_PER_SHARD` of each shard are logged with their reason, later ones only
    counted, with one line per shard when its count reaches 10, 100, 1000, ...
    """
    if (shard, key) in stats.logged:
        return
    stats.logged.add((shard, key))
    n = stats.distinct[shard] = stats.distinct.get(shard, 0) + 1
    if n <= LOG_CORRUPT_PER_SHARD:
        log.warning("corrupt sample %s in shard %s: %s", key, path, exc)
        if n == LOG_CORRUPT_PER_SHARD:
            log.warning(
                "shard %s: %d corrupt samples; further ones are counted and summarised (at 10, 100, 1000, ...), "
                "not logged one by one; python -m data_pipelines.verify_shards lists them all",
                path,
                n,
            )
    elif n == 10 ** round(math.log10(n)):
        log.warning(
            "shard %s: %d corrupt samples so far (loader slot %d); the latest, %s: %s",
            path,
            n,
            slot,
            key,
            exc,
        )


# ------------------------------------------------------------------------------------------------
# The CPU backend


class WdsBatches(SlotBatches, IterableDataset):
    """Infinite stream of collated batches for one rank, rendered on the CPU.

    Each DataLoader worker (or the main process when ``num_workers == 0``) plays one slot and
    yields whole batches whose ``images`` are uint8 (:func:`~data_pipelines.augment.render_batch_uint8`);
    :func:`data_pipelines.loader.build_loader` normalizes them in the training process (see there
    for the batch contract). Arguments as :class:`SlotBatches`.
    """

    def __init__(self, shard_set: ShardSet, views: Sequence[ViewSpec], **kwargs: Any) -> None:
        SlotBatches.__init__(self, shard_set, views, **kwargs)
        IterableDataset.__init__(self)

    def batch(self, stream: SlotStream, n: int, stats: _CorruptStats) -> dict[str, Any]:
        """Collate the ``n``-th batch of a slot stream."""
        plan = self.plan(stream, n, stats)
        pixels = [s.pixels for s in plan.samples]
        assert all(p is not None for p in pixels)
        per_sample = self.view_params(plan)
        images = [
            render_batch_uint8(pixels, spec, [params[v] for params in per_sample])  # type: ignore[arg-type]
            for v, spec in enumerate(self.views)
        ]
        # Small tensors travel by value as NumPy arrays: a shared-memory segment per tensor costs a
        # worker ~0.3 ms (build_loader turns them back into tensors).
        fields = {
            k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in self.host_fields(plan).items()
        }
        return {"images": images, **fields}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs in {info.num_workers}")
        plays = (self.start_batch + loader_worker) % self.workers
        n = (self.start_batch + loader_worker) // self.workers
        stream = self.slot_stream(self.slot_id(plays))
        stats = _CorruptStats()
        try:
            while True:
                yield self.batch(stream, n, stats)
                n += 1
        finally:
            self.reader.close()

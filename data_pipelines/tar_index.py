"""Member index of a WebDataset tar shard, and DALI-compatible ``.idx`` files.

A WebDataset shard is a plain tar file whose members are grouped into samples by their
*basename*: everything before the first dot of the file name (``000123.png`` and ``000123.cls``
belong to sample ``000123``). Members of one sample are consecutive in the tar.

For random access, a reader needs each member's data offset and size. These come from:

* the index file that :mod:`data_pipelines.build_shards` writes beside every shard, in the text
  format of DALI's ``wds2idx`` tool (so ``fn.readers.webdataset(index_paths=...)`` can use it too)::

      v1.2 <num_samples>
      <ext> <data_offset> <size> <member_name> [<ext> <data_offset> <size> <member_name> ...]
      ...

  one line per sample, offsets in bytes to the first byte of the member's *data* (the tar header
  is 512 bytes before it for plain ustar members);
* or, when the index file is missing or unreadable, a scan of the tar headers (:func:`scan_tar`), which reads only 512-byte
  headers and seeks over the data. This is how shards written by other tools (img2dataset, plain
  ``tar``) are read as they are: the index of a complete, well-formed tar is then written beside
  it when the directory is writable (atomically, so concurrent readers are safe), and kept in
  memory otherwise. A tar cut short keeps the index it had: samples past its end read short and
  count as corrupt.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pretrain.fileio import atomic_write_text

log = logging.getLogger(__name__)

BLOCK = 512
DALI_INDEX_VERSION = "v1.2"
_KNOWN_VERSIONS = ("v1.0", "v1.1", "v1.2")


_DIGITS = re.compile(r"[0-9]+(?: [0-9]+)*")


class TarIndexError(ValueError):
    """A tar shard or its index file cannot be read."""


class TarMember(NamedTuple):
    """One regular file in a tar archive (a named tuple: indexes hold millions of them).

    Attributes:
        name: member path inside the archive.
        offset: byte offset of the member's data (not its header).
        size: data size in bytes.
    """

    name: str
    offset: int
    size: int


@dataclass
class SampleEntry:
    """One WebDataset sample: the members sharing a basename.

    Attributes:
        key: the basename (member name up to the first dot of its last path component).
        components: extension (``"png"``, ``"cls"``, ...) -> member.
        problem: why the sample cannot be used (duplicate key or member), ``None`` when fine.
    """

    key: str
    components: dict[str, TarMember] = field(default_factory=dict)
    problem: str | None = None


def split_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at the first dot of its last path component.

    Args:
        name: member path, e.g. ``"a/b/000123.seg.png"``.

    Returns:
        ``("a/b/000123", "seg.png")``; the extension is ``""`` when the name has no dot.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _parse_number(field_bytes: bytes, what: str, where: str) -> int:
    """Parse a tar numeric header field: NUL/space padded octal, or GNU base-256."""
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 encoding for large values
        value = int.from_bytes(field_bytes[1:], "big")
        return -value if field_bytes[0] & 0x40 else value
    text = field_bytes.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise TarIndexError(f"{where}: bad {what} field {field_bytes!r} in a tar header") from exc


def _parse_pax(data: bytes) -> dict[str, str]:
    """Parse pax extended header records (``"<len> key=value\\n"``)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def scan_tar(path: str | os.PathLike[str]) -> list[TarMember]:
    """List the regular files of an (uncompressed) tar archive by reading its headers.

    Handles ustar prefixes, GNU long names and pax ``path``/``size`` records. A truncated archive
    yields the members whose headers are complete; the data of the last one may be cut short,
    which readers detect when they read it.

    Args:
        path: the tar file.

    Returns:
        The regular-file members in archive order.

    Raises:
        TarIndexError: the file is missing or is not a tar archive.
    """
    return _scan(path)[0]


def scan_tar_status(path: str | os.PathLike[str]) -> tuple[list[TarMember], bool]:
    """:func:`scan_tar`, and whether the archive ended cleanly (``False``: cut short or damaged).

    Args:
        path: the tar file.

    Returns:
        (members, complete): ``complete`` is true when the scan reached the end-of-archive marker
        (or the end of the file on a member boundary) and every member's data lies inside the file.

    Raises:
        TarIndexError: the file is missing or is not a tar archive.
    """
    return _scan(path)


def _scan(path: str | os.PathLike[str]) -> tuple[list[TarMember], bool]:
    """Scan a tar; returns (members, whether the archive ended cleanly)."""
    where = os.fspath(path)
    try:
        f = open(where, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise TarIndexError(f"cannot open tar shard {where}: {exc.strerror}") from exc
    members: list[TarMember] = []
    complete = False
    with f:
        file_size = os.fstat(f.fileno()).st_size
        pos = 0
        long_name: str | None = None
        pax: dict[str, str] = {}
        while pos + BLOCK <= file_size:
            f.seek(pos)
            header = f.read(BLOCK)
            if len(header) < BLOCK:
                break  # truncated header
            if header == b"\0" * BLOCK:
                complete = True  # end-of-archive marker
                break
            stored = _parse_number(header[148:156], "checksum", where)
            computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
            if stored != computed:
                if pos == 0:
                    raise TarIndexError(f"{where} is not a tar archive (bad header checksum at offset 0)")
                log.warning("tar %s: bad header checksum at offset %d; stopping the scan there", where, pos)
                break
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            size = _parse_number(header[124:136], "size", where)
            typeflag = header[156:157]
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = f"{prefix}/{name}"
            data_offset = pos + BLOCK
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if typeflag in (b"L", b"x", b"g"):
                f.seek(data_offset)
                payload = f.read(size)
                if typeflag == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif typeflag == b"x":
                    pax = _parse_pax(payload)
                pos = data_offset + padded
                continue
            if long_name is not None:
                name = long_name
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                size = int(pax["size"])
                padded = (size + BLOCK - 1) // BLOCK * BLOCK
            long_name, pax = None, {}
            if typeflag in (b"0", b"\0", b"7"):  # regular file (old and new style, contiguous)
                members.append(TarMember(name=name, offset=data_offset, size=size))
            pos = data_offset + padded
        if pos == file_size:  # archives without an end marker, ending on a member boundary
            complete = True
    if members and members[-1].offset + members[-1].size > file_size:
        complete = False
    return members, complete


def group_samples(members: Iterable[TarMember], where: str = "") -> list[SampleEntry]:
    """Group consecutive members sharing a basename into samples.

    Hidden files (a basename that is empty or ends with ``/``) are ignored, as DALI does. A sample
    that contains the same extension twice, or whose key already appeared earlier in the shard, is
    kept (positions must not shift) but marked with a ``problem`` so readers count it as corrupt.

    Args:
        members: archive members in archive order.
        where: shard name used in log messages.

    Returns:
        The samples in archive order.
    """
    samples: list[SampleEntry] = []
    seen: set[str] = set()
    current: SampleEntry | None = None
    for member in members:
        key, ext = split_name(member.name)
        if not key or key.endswith("/"):
            continue
        if current is None or key != current.key:
            current = SampleEntry(key=key)
            if key in seen:
                current.problem = f"duplicate key {key!r} (an earlier sample of this shard has it)"
            seen.add(key)
            samples.append(current)
        if ext in current.components:
            current.problem = f"duplicate member {member.name!r}"
            log.warning("shard %s: %s", where, current.problem)
            continue
        current.components[ext] = member
    return samples


def format_dali_index(samples: Sequence[SampleEntry]) -> str:
    """Render samples as the text of a DALI ``wds2idx`` index file (version ``v1.2``).

    Args:
        samples: the shard's samples in archive order (every sample needs at least one member).

    Returns:
        The file's text, ending with a newline.
    """
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        parts = []
        for ext, m in sample.components.items():
            parts.append(f"{ext} {m.offset} {m.size} {m.name}")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


def write_dali_index(path: str | os.PathLike[str], samples: Sequence[SampleEntry]) -> None:
    """Write a DALI-compatible index file atomically and durably (:func:`pretrain.fileio.atomic_write_text`).

    Args:
        path: destination ``.idx`` path.
        samples: the shard's samples in archive order.

    Raises:
        OSError: the directory is not writable.
    """
    atomic_write_text(path, format_dali_index(samples))


def read_dali_index(path: str | os.PathLike[str]) -> list[SampleEntry]:
    """Read a DALI ``wds2idx`` index file.

    Versions ``v1.1``/``v1.2`` (``ext offset size name`` groups) and ``v1.0`` (``ext offset size``
    groups, no names) are understood.

    Args:
        path: the ``.idx`` file.

    Returns:
        The samples in archive order.

    Raises:
        TarIndexError: the file is missing, has an unknown version line or a malformed line.
    """
    where = os.fspath(path)
    try:
        text = Path(where).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TarIndexError(f"cannot read index file {where}: {exc}") from exc
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] not in _KNOWN_VERSIONS or not head[1].isdigit():
        raise TarIndexError(
            f"{where}: first line {lines[0] if lines else ''!r} is not a DALI index header "
            f"('<version> <num_samples>' with version in {', '.join(_KNOWN_VERSIONS)})"
        )
    width = 3 if head[0] == "v1.0" else 4
    expected = int(head[1])
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != expected:
        raise TarIndexError(f"{where}: header announces {expected} samples but {len(body)} lines follow")
    samples: list[SampleEntry] = []
    for lineno, line in enumerate(body, start=2):
        tokens = line.split(" ")
        if len(tokens) % width:
            raise TarIndexError(f"{where}:{lineno}: expected groups of {width} fields, got {len(tokens)}")
        offsets, sizes = tokens[1::width], tokens[2::width]
        if not _DIGITS.fullmatch(" ".join(offsets + sizes)):
            raise TarIndexError(f"{where}:{lineno}: offsets/sizes {offsets}/{sizes} are not all integers")
        exts = tokens[0::width]
        names = tokens[3::width] if width == 4 else [f"?.{ext}" for ext in exts]
        key = split_name(names[0])[0] if width == 4 else f"#{len(samples)}"
        entry = SampleEntry(key=key)
        for ext, name, offset, size in zip(exts, names, offsets, sizes, strict=True):
            entry.components[ext] = TarMember(name, int(offset), int(size))
        samples.append(entry)
    return samples


def load_index(
    tar_path: str | os.PathLike[str],
    idx_path: str | os.PathLike[str] | None = None,
    *,
    write_missing: bool = True,
) -> list[SampleEntry]:
    """The samples of a shard: from its index file when readable, else by scanning the tar.

    Args:
        tar_path: the shard.
        idx_path: its index file; default: the shard path with ``.idx`` instead of ``.tar``.
        write_missing: after scanning a complete tar, write its index file when possible (a
            read-only directory is fine: the index then lives in memory only).

    Returns:
        The samples in archive order.

    Raises:
        TarIndexError: the tar is missing or is not a tar archive.
    """
    tar_path = Path(tar_path)
    idx = Path(idx_path) if idx_path is not None else tar_path.with_suffix(".idx")
    if idx.exists():
        try:
            samples = read_dali_index(idx)
        except TarIndexError as exc:
            log.warning("%s; scanning the tar headers of %s instead", exc, tar_path)
        else:
            # Duplicate checks also apply to index-loaded samples.
            seen: set[str] = set()
            for s in samples:
                if s.key in seen and not s.key.startswith("#"):
                    s.problem = f"duplicate key {s.key!r} (an earlier sample of this shard has it)"
                seen.add(s.key)
            return samples
        write_missing = False  # never overwrite an index file someone else wrote
    members, complete = _scan(tar_path)
    samples = group_samples(members, where=str(tar_path))
    # Only a complete, problem-free scan is persisted: an index cannot record duplicate members.
    if write_missing and complete and samples and not any(s.problem for s in samples):
        try:
            write_dali_index(idx, samples)
            log.info("wrote index %s for %s (%d samples)", idx, tar_path, len(samples))
        except OSError as exc:  # read-only data set: keep the index in memory
            log.info("cannot write index %s (%s); keeping it in memory", idx, exc.strerror or exc)
    return samples

"""Durable file writes and file hashes: the one implementation the whole project uses.

A reader (a resuming trainer, an eval job, a second tool run) must never see half a file, and a
file that a marker or pointer refers to must survive a crash of the machine: every write goes to a
temporary file in the same directory, is fsynced, renamed over the target, and the directory is
fsynced so the rename itself is durable. Used by checkpoints, exports, run configs, shard
manifests and eval results.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = [
    "atomic_symlink",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "sha256_file",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file another library wrote (e.g. safetensors) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    # Per process: two processes writing the same file never share a temporary file.
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename over ``path``, fsync the directory.

    Readers see either the old file or the whole new one, also after a crash.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_symlink(target: str, link: str | os.PathLike[str]) -> None:
    """Point symlink ``link`` at ``target`` (relative names stay relative) in one atomic rename."""
    link = Path(link)
    tmp = _tmp_name(link)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()

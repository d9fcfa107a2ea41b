"""Check a shard directory completely: hashes, indexes and every sample.

Usage::

    python -m data_pipelines.verify_shards DIR [--workers N] [--no-decode] [--quiet]

For each shard (the manifest's list, or the ``*.tar`` files of a directory without one):

* **file**: it exists, and its size and SHA-256 equal what the manifest records (a copy cut short,
  a shard overwritten by another build);
* **index**: the ``.idx`` file exists, parses, and lists exactly the members a scan of the tar's
  headers finds (names, offsets, sizes); the tar ends cleanly; the sample count equals the manifest's;
* **samples** (unless ``--no-decode``): every sample has an image that decodes fully, a class index
  within the manifest's classes when the data set is labelled, a non-empty UTF-8 caption when the
  shards hold captions, and no duplicate key or member.

Training checks only the file sizes when it starts (:func:`data_pipelines.wds.check_shard_sizes`),
and skips and counts corrupt samples as it reads them; this tool is the full check, e.g. after
copying a data set to a cluster's file system. It reads every byte (I/O bound for PNG/PGM shards,
decode bound for JPEG ones: use ``--workers``).

Output: a progress bar over samples, then one line per shard with problems (the first few corrupt
samples with their reasons, then a count) and a summary. Exit code: 0 when every check passed, 1
when problems were found, 2 for bad input (no such directory, unreadable manifest, no shards).
"""

from __future__ import annotations

import argparse
import logging
import mmap
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from data_pipelines.tar_index import (
    SampleEntry,
    TarIndexError,
    group_samples,
    load_index,
    read_dali_index,
    scan_tar_status,
)
from data_pipelines.wds import (
    MANIFEST_NAME,
    CorruptSample,
    ShardSpecError,
    _read_manifest,
    decode_pixels,
    parse_sample,
    resolve_shards,
)
from pretrain.fileio import sha256_file

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PROBLEMS, EXIT_BAD_INPUT = 0, 1, 2
SHOW_SAMPLES = 3  # corrupt samples of a shard listed with their reason; the rest are counted


@dataclass(frozen=True)
class ShardCheck:
    """What one shard should be (from the manifest where there is one).

    Attributes:
        path: the tar file.
        index_path: its ``.idx`` file.
        num_samples: expected sample count, or ``None``.
        num_bytes: expected file size, or ``None``.
        sha256: expected SHA-256, or ``None``.
        num_classes: labels must lie in ``[0, num_classes)``; ``None``: unlabelled (labels not required).
        text_key: caption member every sample must have (``"txt"``), or ``""``.
        decode: decode every sample's image.
    """

    path: Path
    index_path: Path
    num_samples: int | None = None
    num_bytes: int | None = None
    sha256: str | None = None
    num_classes: int | None = None
    text_key: str = ""
    decode: bool = True


@dataclass
class ShardReport:
    """The result of checking one shard.

    Attributes:
        name: the tar's file name.
        num_samples: samples the loaders would read (the index's; the tar's when it has no usable
            index or samples were not decoded; 0 when it cannot be read).
        problems: shard-level problems (file, hash, index), one sentence each.
        corrupt: ``(key, reason)`` of every unusable sample.
    """

    name: str
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems and not self.corrupt

    def describe(self) -> str:
        """One line: the shard-level problems, then the corrupt samples (first few with reasons, then a count)."""
        parts = list(self.problems)
        if self.corrupt:
            shown = "; ".join(f"{key}: {reason}" for key, reason in self.corrupt[:SHOW_SAMPLES])
            more = len(self.corrupt) - SHOW_SAMPLES
            parts.append(
                f"{len(self.corrupt)} of {self.num_samples} samples corrupt ({shown}"
                + (f"; and {more} more" if more > 0 else "")
                + ")"
            )
        return f"{self.name}: " + "; ".join(parts)


def _index_difference(indexed: Sequence[SampleEntry], scanned: Sequence[SampleEntry]) -> str | None:
    """Where an index file disagrees with the tar's headers, or ``None`` when it lists the same members."""
    first = next(
        (
            n
            for n, (a, b) in enumerate(zip(indexed, scanned))
            if (a.key, a.components) != (b.key, b.components)
        ),
        None,
    )
    if first is None and len(indexed) == len(scanned):
        return None
    where = (
        f"first difference at sample {first} ({indexed[first].key!r})"
        if first is not None
        else "the rest agrees"
    )
    return f"it lists {len(indexed)} samples, the tar's headers {len(scanned)}; {where}"


def check_shard(check: ShardCheck, on_sample: Callable[[], None] | None = None) -> ShardReport:
    """Run every check on one shard.

    Args:
        check: the shard and what it should be.
        on_sample: called after each sample (progress).

    Returns:
        The report; never raises for damaged data.
    """
    report = ShardReport(check.path.name)
    try:
        size = check.path.stat().st_size
    except OSError as exc:
        report.problems.append(f"cannot read the file ({exc.strerror or exc})")
        return report
    if check.num_bytes is not None and size != check.num_bytes:
        report.problems.append(f"{size} bytes, the manifest says {check.num_bytes} (truncated or replaced)")
    if check.sha256 is not None and sha256_file(check.path) != check.sha256:
        report.problems.append("SHA-256 differs from the manifest's (the contents changed)")
    try:
        members, complete = scan_tar_status(check.path)
    except TarIndexError as exc:
        report.problems.append(str(exc))
        return report
    if not complete:
        report.problems.append(
            "the tar does not end cleanly (cut short or damaged): the last samples are lost"
        )
    samples = group_samples(members, where=str(check.path))
    report.num_samples = len(samples)
    if check.num_samples is not None and len(samples) != check.num_samples:
        report.problems.append(f"holds {len(samples)} samples, the manifest says {check.num_samples}")
    if not check.index_path.exists():
        report.problems.append(f"index file {check.index_path.name} is missing (loaders then scan the tar)")
    else:
        try:
            difference = _index_difference(read_dali_index(check.index_path), samples)
        except TarIndexError as exc:
            difference = str(exc)
        if difference is not None:
            report.problems.append(f"index file {check.index_path.name} does not match the tar: {difference}")
    if not check.decode:
        return report
    # Decode what the loaders read: the samples the index lists (a scan where it is missing or bad),
    # so samples an index promises but a cut-short tar lost count as corrupt.
    samples = load_index(check.path, check.index_path, write_missing=False)
    report.num_samples = len(samples)
    with open(check.path, "rb") as f:
        try:
            data: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            data = b""
        try:
            for sample in samples:
                try:
                    _check_sample(sample, data, check)
                except CorruptSample as exc:
                    report.corrupt.append((sample.key, str(exc)))
                if on_sample is not None:
                    on_sample()
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
    return report


def _check_sample(sample: SampleEntry, data: mmap.mmap | bytes, check: ShardCheck) -> None:
    """Raise :class:`CorruptSample` when the loaders could not use ``sample``."""
    if sample.problem:
        raise CorruptSample(sample.problem)
    components = {}
    for ext, member in sample.components.items():
        blob = data[member.offset : member.offset + member.size]
        if len(blob) != member.size:
            raise CorruptSample(f"member {member.name} is truncated ({len(blob)} of {member.size} bytes)")
        components[ext] = blob
    ext, image, label, _ = parse_sample(
        components, require_label=check.num_classes is not None, text_key=check.text_key
    )
    if check.num_classes is not None and not 0 <= label < check.num_classes:
        raise CorruptSample(
            f"class index {label} is not in [0, {check.num_classes}) (the manifest's classes)"
        )
    decode_pixels(image, ext)


def _check_quiet(check: ShardCheck) -> ShardReport:
    return check_shard(check)


def plan_checks(spec: str, *, decode: bool = True) -> tuple[list[ShardCheck], str]:
    """The checks for a shard directory (or a glob / brace pattern of tars).

    Args:
        spec: a directory with ``manifest.json``, a ``manifest.json`` path, a directory of tars, a
            glob or a brace pattern (as ``data.shards``).
        decode: also decode every sample.

    Returns:
        (checks, a description of what is checked against).

    Raises:
        ShardSpecError: no such path, an unreadable manifest, or no shards.
    """
    path = Path(spec).expanduser()
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path if path.name == MANIFEST_NAME else None
    if manifest_path is None or not manifest_path.exists():
        shard_set = resolve_shards(spec)  # a directory of tars, a glob or a brace pattern
        checks = [ShardCheck(s.path, s.index_path, decode=decode) for s in shard_set.shards]
        return (
            checks,
            f"{len(checks)} tar files of {spec} (no manifest: sizes, hashes and counts not checked)",
        )
    manifest = _read_manifest(manifest_path)
    if not manifest["shards"]:
        raise ShardSpecError(f"shard manifest {manifest_path} lists no shards")
    classes = manifest.get("classes")
    members = manifest.get("members") if isinstance(manifest.get("members"), list) else []
    root = manifest_path.parent
    checks = []
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ShardSpecError(f"shard manifest {manifest_path}: entry {entry!r} has no 'name'")
        tar = root / entry["name"]
        sha = entry.get("sha256")
        checks.append(
            ShardCheck(
                tar,
                root / entry.get("index_file", Path(entry["name"]).with_suffix(".idx").name),
                num_samples=entry.get("num_samples") if isinstance(entry.get("num_samples"), int) else None,
                num_bytes=entry.get("bytes") if isinstance(entry.get("bytes"), int) else None,
                sha256=sha if isinstance(sha, str) else None,
                num_classes=len(classes) if isinstance(classes, list) else None,
                text_key="txt" if "txt" in members else "",
                decode=decode,
            )
        )
    return checks, str(manifest_path)


def verify(checks: Sequence[ShardCheck], *, workers: int = 1, progress: bool = True) -> list[ShardReport]:
    """Check shards, in ``workers`` processes; returns one report per shard, in order.

    Args:
        checks: from :func:`plan_checks`.
        workers: processes (1: in this process).
        progress: show a tqdm bar over samples.

    Returns:
        The reports, in the order of ``checks``.
    """
    total = sum(c.num_samples for c in checks if c.num_samples is not None) if checks else 0
    known = all(c.num_samples is not None for c in checks)
    reports: dict[int, ShardReport] = {}
    with tqdm(total=total if known else None, unit="sample", disable=not progress, desc="verify") as bar:
        if workers <= 1 or len(checks) <= 1:
            for i, check in enumerate(checks):
                reports[i] = check_shard(check, on_sample=lambda: bar.update(1))
        else:
            with ProcessPoolExecutor(min(workers, len(checks)), mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_check_quiet, c): i for i, c in enumerate(checks)}
                for fut in as_completed(futures):
                    i = futures[fut]
                    reports[i] = fut.result()
                    bar.update(reports[i].num_samples if checks[i].decode else 0)
    return [reports[i] for i in range(len(checks))]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every check passed, 1 when problems were found, 2 for bad input, 130 when interrupted.
    """
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.verify_shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Check WebDataset shards completely, e.g. after copying them to a cluster's file system:\n"
            "  - each shard's size and SHA-256 against manifest.json,\n"
            "  - its .idx index against the tar's headers (and that the tar ends cleanly),\n"
            "  - unless --no-decode: that every sample decodes and has the label or caption the data set needs.\n"
            "Problems are listed per shard (the first corrupt samples with their reason, then a count).\n"
            "Exit code: 0 all good, 1 problems found, 2 bad input (no such directory, unreadable manifest)."
        ),
        epilog="example: python -m data_pipelines.verify_shards data/fmnist/train --workers 8",
    )
    parser.add_argument(
        "shards",
        metavar="DIR",
        help="shard directory written by data_pipelines.build_shards (or a directory / glob of .tar files)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes checking shards in parallel (default 1)"
    )
    parser.add_argument(
        "--no-decode", action="store_true", help="check files, hashes and indexes only (no image decoding)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("data_pipelines.tar_index").setLevel(
        logging.ERROR
    )  # what it warns about is reported below
    if args.workers < 1:
        print(f"{parser.prog}: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        checks, against = plan_checks(args.shards, decode=not args.no_decode)
    except ShardSpecError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        reports = verify(checks, workers=args.workers, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return _summarise(reports, against, decode=not args.no_decode)


def _summarise(reports: Sequence[ShardReport], against: str, *, decode: bool) -> int:
    bad = [r for r in reports if not r.ok]
    for report in bad:
        print(report.describe())
    samples = sum(r.num_samples for r in reports)
    corrupt = sum(len(r.corrupt) for r in reports)
    what = (
        "files, hashes, indexes and samples" if decode else "files, hashes and indexes (samples not decoded)"
    )
    verdict = (
        "all good"
        if not bad
        else f"{len(bad)} shard(s) with problems, {corrupt} corrupt sample(s); rebuild or copy them again"
    )
    print(f"checked {what} of {len(reports)} shards ({samples} samples) against {against}: {verdict}")
    return EXIT_PROBLEMS if bad else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

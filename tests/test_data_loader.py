"""The WebDataset loader: batch contract, determinism, resume, rank disjointness, corrupt data, views."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import signal
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import build_shards as bs
from data_pipelines import datasets
from data_pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, apply_view, sample_crop_box
from data_pipelines.loader import CorruptDataError, LoaderConfig, ShardSpecError, build_loader
from data_pipelines.sequential import ShardSequence
from data_pipelines.tar_index import group_samples, scan_tar, write_dali_index
from data_pipelines.wds import (
    LOG_CORRUPT_PER_SHARD,
    ShardReader,
    SlotStream,
    expand_braces,
    permutation,
    resolve_shards,
)
from tests.conftest import run_cmd, skip_or_fail

VIEWS = [ViewSpec(size=32), ViewSpec(size=16, scale=(0.05, 0.4), interpolation="bilinear")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """800 Fashion-MNIST training images in 8 shards of 100."""
    try:
        source = datasets.locate_dataset("fashion-mnist")
    except datasets.DatasetNotFoundError as exc:
        skip_or_fail(f"Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): {exc}")
    out = tmp_path_factory.mktemp("fmnist_shards")
    bs.build_shards(source, out, limit=800, shard_size=100, progress=False)
    return out


@pytest.fixture(scope="module")
def shard_labels(shards: Path) -> dict[str, int]:
    """'<shard>/<key>' -> class index, read straight from the tars."""
    labels = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    labels[f"{tar.stem}/{m.name[:-4]}"] = int(tf.extractfile(m).read())
    return labels


def _take(cfg: LoaderConfig, n: int, **kw: Any) -> list[dict[str, Any]]:
    args = {"batch_size": 8, "rank": 0, "world_size": 1, "seed": 0, **kw}
    return list(itertools.islice(build_loader(cfg, VIEWS, **args), n))


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["keys"] == b["keys"]
        and torch.equal(a["label"], b["label"])
        and all(torch.equal(x, y) for x, y in zip(a["images"], b["images"], strict=True))
    )


def test_batch_contract(shards: Path, shard_labels: dict[str, int]) -> None:
    cfg = LoaderConfig(shards=str(shards), num_workers=0, return_keys=True)
    batches = _take(cfg, 3, batch_size=6)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for batch in batches:
        assert set(batch) == {"images", "label", "num_corrupt", "keys"}
        assert [tuple(t.shape) for t in batch["images"]] == [(6, 3, 32, 32), (6, 3, 16, 16)]
        assert all(t.dtype == torch.float32 for t in batch["images"])
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (6,)
        assert batch["num_corrupt"] == 0 and len(batch["keys"]) == 6
        assert batch["label"].tolist() == [shard_labels[k] for k in batch["keys"]]
        for view in batch["images"]:
            pixels = view * std + mean  # undo the normalization: back in [0, 1]
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
            assert pixels.std() > 0.05  # real image content, not a constant
            torch.testing.assert_close(pixels[:, 0], pixels[:, 2])  # grey -> 3 equal channels


def test_batches_are_deterministic(shards: Path) -> None:
    cfg = LoaderConfig(shards=str(shards), num_workers=2, return_keys=True)
    a, b = _take(cfg, 5), _take(cfg, 5)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    c = _take(cfg, 5, seed=1)
    assert not any(_same(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_start_batch(shards: Path, num_workers: int) -> None:
    cfg = LoaderConfig(shards=str(shards), num_workers=num_workers, return_keys=True)
    full = _take(cfg, 8)
    for start in (3, 4):
        resumed = _take(cfg, 8 - start, start_batch=start)
        assert all(_same(x, y) for x, y in zip(full[start:], resumed, strict=True)), f"start_batch={start}"


def test_epoch_visits_every_sample_once(shards: Path, shard_labels: dict[str, int]) -> None:
    cfg = LoaderConfig(shards=str(shards), num_workers=0, return_keys=True)
    keys = [k for b in _take(cfg, 16, batch_size=50, seed=3) for k in b["keys"]]  # 800 = one epoch
    assert sorted(keys) == sorted(shard_labels)
    assert keys[:100] != sorted(keys[:100])  # shuffled within shards


def test_ranks_see_disjoint_samples(shards: Path) -> None:
    cfg = LoaderConfig(shards=str(shards), num_workers=2, return_keys=True)
    per_rank = [_take(cfg, 6, rank=r, world_size=2) for r in range(2)]
    for step in range(6):
        k0, k1 = (set(per_rank[r][step]["keys"]) for r in range(2))
        assert not k0 & k1, f"step {step}"
    # slot s = rank * workers + worker owns the shards k with k % 4 == s
    owned = [{int(k.split("/")[0][-6:]) % 4 for b in per_rank[r] for k in b["keys"]} for r in range(2)]
    assert owned == [{0, 1}, {2, 3}]


def test_configuration_errors(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ShardSpecError, match=r"8 shards .* fewer than the 9 loader slots \(world_size 3 x num_workers 3\)"
    ):
        build_loader(
            LoaderConfig(shards=str(shards), num_workers=3), VIEWS, batch_size=4, rank=0, world_size=3, seed=0
        )
    with pytest.raises(ShardSpecError, match="does not exist"):
        build_loader(
            LoaderConfig(shards=str(tmp_path / "none.tar")), VIEWS, batch_size=4, rank=0, world_size=1, seed=0
        )
    with pytest.raises(ValueError, match=r"data.shards is empty"):
        build_loader(LoaderConfig(), VIEWS, batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match=r"backend 'ffcv' is not available; valid: wds, dali, synthetic"):
        build_loader(
            LoaderConfig(backend="ffcv", shards=str(shards)),
            VIEWS,
            batch_size=4,
            rank=0,
            world_size=1,
            seed=0,
        )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ShardSpecError, match=r"cannot read shard manifest .*bad/manifest.json"):
        build_loader(LoaderConfig(shards=str(bad)), VIEWS, batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(ShardSpecError, match="no shard files match"):
        build_loader(
            LoaderConfig(shards=str(tmp_path / "*.tar")), VIEWS, batch_size=4, rank=0, world_size=1, seed=0
        )


def _loader_workers() -> list[int]:
    """Pids of this process's DataLoader workers: forked children, so with this process's command line.

    Other children (multiprocessing's resource tracker, left by an earlier test) run another command.
    """
    me = Path(f"/proc/{os.getpid()}/cmdline").read_bytes()
    children: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    workers = []
    for pid in children:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == me:
                workers.append(pid)
        except OSError:  # exited meanwhile
            continue
    return workers


def _worker_policies() -> list[int]:
    """Scheduling policies of the DataLoader workers."""
    return [os.sched_getscheduler(pid) for pid in _loader_workers()]


@pytest.mark.parametrize(("priority", "policy"), [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")])
def test_worker_priority_sets_the_workers_scheduling_policy(shards: Path, priority: str, policy: str) -> None:
    if not Path(f"/proc/{os.getpid()}/task").exists():
        skip_or_fail("needs Linux /proc")
    it = build_loader(
        LoaderConfig(shards=str(shards), num_workers=2, worker_priority=priority),
        VIEWS,
        batch_size=4,
        rank=0,
        world_size=1,
        seed=0,
    )
    try:
        next(it)
        assert _worker_policies() == [getattr(os, policy)] * 2
    finally:
        it.close()
    with pytest.raises(
        ValueError, match=r"data.worker_priority 'low' is not valid; choose one of auto, normal, idle"
    ):
        LoaderConfig(shards=str(shards), worker_priority="low").validate()


def test_glob_and_brace_specs_without_manifest(shards: Path) -> None:
    expected = [f"s-{n}-{c}.tar" for n in ("08", "09", "10") for c in "ab"]
    assert expand_braces("s-{08..10}-{a,b}.tar") == expected
    by_dir = _take(LoaderConfig(shards=str(shards), num_workers=0, return_keys=True), 2)
    brace = str(shards / "shard-{000000..000007}.tar")
    by_brace = _take(LoaderConfig(shards=brace, num_workers=0, return_keys=True), 2)
    by_glob = _take(LoaderConfig(shards=str(shards / "shard-*.tar"), num_workers=0, return_keys=True), 2)
    assert all(_same(a, b) and _same(a, c) for a, b, c in zip(by_dir, by_brace, by_glob, strict=True))


def test_missing_index_files_are_rebuilt_by_scanning(shards: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"  # tars only: no manifest, no .idx files
    bare.mkdir()
    for tar in shards.glob("*.tar"):
        (bare / tar.name).write_bytes(tar.read_bytes())
    with_idx = _take(LoaderConfig(shards=str(shards / "*.tar"), num_workers=0, return_keys=True), 3)
    scanned = _take(LoaderConfig(shards=str(bare), num_workers=0, return_keys=True), 3)
    assert all(_same(a, b) for a, b in zip(with_idx, scanned, strict=True))


def test_manifest_without_shards_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": [], "classes": None}))
    with pytest.raises(ShardSpecError, match=r"manifest.json lists no shards"):
        build_loader(LoaderConfig(shards=str(tmp_path)), VIEWS, batch_size=4, rank=0, world_size=1, seed=0)


# ------------------------------------------------------------------------------------------------
# Corrupt samples


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(root: Path, shards: list[list[tuple[str, bytes]]], classes: list[str]) -> None:
    """Write tars (members as given), their DALI indexes and a manifest."""
    root.mkdir()
    entries = []
    for i, members in enumerate(shards):
        tar = root / f"shard-{i:06d}.tar"
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        samples = group_samples(scan_tar(tar))
        write_dali_index(tar.with_suffix(".idx"), samples)
        entries.append({"name": tar.name, "num_samples": len(samples)})
    (root / "manifest.json").write_text(json.dumps({"version": 1, "shards": entries, "classes": classes}))


def _good(key: str, label: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", _png(label * 20)), (f"{key}.cls", str(label).encode())]


def _corrupt_set(root: Path, num_shards: int = 4, per_shard: int = 100) -> set[str]:
    """Shards of good samples with planted corruption; returns the corrupt keys."""
    shards = [
        [m for j in range(per_shard) for m in _good(f"{i:02d}{j:04d}", (i + j) % 10)]
        for i in range(num_shards)
    ]
    planted = {"010000", "010001", "010002", "010003"}
    s1 = shards[1]
    s1[0:2] = [("010000.png", b""), ("010000.cls", b"1")]  # 0-byte image
    s1[2:4] = [("010001.png", b"<html>Not Found</html>"), ("010001.cls", b"2")]  # HTML bytes as image
    s1[4:6] = [("010002.png", _png(3)), ("010002.txt", b"no label")]  # missing cls in a labelled set
    s1[6:8] = [("010003.png", _png(4)), ("010003.cls", b"x7")]  # unparsable label
    _write_shards(root, shards, [str(c) for c in range(10)])
    # Truncate the last shard inside its last sample's image: the index (written before) still lists it.
    last = root / f"shard-{num_shards - 1:06d}.tar"
    idx = (root / last.with_suffix(".idx").name).read_text().splitlines()[-1].split()
    last.write_bytes(last.read_bytes()[: int(idx[1]) + 10])
    planted.add(f"{num_shards - 1:02d}{per_shard - 1:04d}")
    return planted


def test_corrupt_samples_counted_logged_once_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    planted = _corrupt_set(tmp_path / "c")
    cfg = LoaderConfig(shards=str(tmp_path / "c"), num_workers=0, max_corrupt_fraction=0.2, return_keys=True)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.wds"):
        batches = _take(cfg, 20, batch_size=40)  # two epochs of 400
    epoch1, epoch2 = batches[:10], batches[10:]
    assert sum(b["num_corrupt"] for b in epoch1) == len(planted)
    assert sum(b["num_corrupt"] for b in epoch2) == len(planted)
    warnings = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(warnings) == len(planted)  # logged once each, not once per epoch
    assert {w.split()[2] for w in warnings} == planted
    assert all("shard-0000" in w for w in warnings)
    for b in batches:  # replaced by good samples of the same batch: full batches, real labels
        assert b["images"][0].shape[0] == 40 and not {k.split("/")[1] for k in b["keys"]} & planted
        assert (b["label"] >= 0).all()
        if b["num_corrupt"]:
            assert len(set(b["keys"])) == 40 - b["num_corrupt"]


def test_too_many_corrupt_samples_stop_the_job(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shards = [[m for j in range(60) for m in _good(f"{i}{j:03d}", 1)] for i in range(2)]
    for j in range(0, 60, 5):  # 12 of 60 samples of shard 1 are empty images: 10% of all
        shards[1][2 * j] = (f"1{j:03d}.png", b"")
    _write_shards(root, shards, ["a", "b"])
    for workers in (0, 2):
        cfg = LoaderConfig(shards=str(root), num_workers=workers, max_corrupt_fraction=0.01)
        with pytest.raises(
            CorruptDataError, match=r"\d+ of \d+ samples .*corrupt.*shard-000001: \d+"
        ) as info:
            _take(cfg, 40, batch_size=10, world_size=1)
        assert "Traceback" not in str(info.value)  # a worker's error arrives as its message alone


def test_a_damaged_shard_is_summarised_not_logged_sample_by_sample(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "damaged"
    shards = [[m for j in range(60) for m in _good(f"{i}{j:03d}", 1)] for i in range(2)]
    for j in range(30):  # half of shard 1 is empty images
        shards[1][2 * j] = (f"1{j:03d}.png", b"")
    _write_shards(root, shards, ["a", "b"])
    cfg = LoaderConfig(shards=str(root), num_workers=0, max_corrupt_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.wds"):
        batches = _take(cfg, 3, batch_size=40)  # one epoch
    assert sum(b["num_corrupt"] for b in batches) == 30  # every one counted
    lines = [r.getMessage() for r in caplog.records]
    one_by_one = [m for m in lines if m.startswith("corrupt sample")]
    assert len(one_by_one) == LOG_CORRUPT_PER_SHARD and all("shard-000001.tar" in m for m in one_by_one)
    assert sum("further ones are counted and summarised" in m for m in lines) == 1
    assert sum("shard-000001.tar: 10 corrupt samples so far" in m for m in lines) == 1
    assert len(lines) == LOG_CORRUPT_PER_SHARD + 2


def test_a_shard_cut_short_is_refused_when_the_loader_starts(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shards.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cut = copy / "shard-000003.tar"
    size = cut.stat().st_size
    os.truncate(cut, size // 3)
    for backend_cfg in (
        LoaderConfig(shards=str(copy), num_workers=0),
        LoaderConfig(shards=str(copy), num_workers=2),
    ):
        with pytest.raises(ShardSpecError) as info:
            build_loader(backend_cfg, VIEWS, batch_size=4, rank=0, world_size=1, seed=0)
        message = str(info.value)
        assert f"shard-000003.tar is {size // 3} bytes, the manifest says {size}" in message
        assert "1 of 8 shards" in message and f"python -m data_pipelines.verify_shards {copy}" in message
    with pytest.raises(ShardSpecError, match=r"shard-000003.tar is \d+ bytes"):
        ShardSequence(str(copy))  # evaluations read the same shards: refused the same way


# ------------------------------------------------------------------------------------------------
# Mixing shards


def _class_sorted_shards(root: Path, num_classes: int, per_class: int, shard_size: int) -> Path:
    """An ImageFolder source built with --no-shuffle: shards in class order, each holding one class."""
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(
                root / "src" / f"c{c}" / f"{i}.png"
            )
    out = root / "shards"
    bs.build_shards(root / "src", out, shard_size=shard_size, shuffle=False, progress=False)
    return out


def test_batches_mix_classes_from_class_sorted_shards(tmp_path: Path) -> None:
    # 10 classes x 64 images in 20 shards of 32: shard k holds only class k // 2 (the ImageFolder case).
    out = _class_sorted_shards(tmp_path, num_classes=10, per_class=64, shard_size=32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 20
    cfg = LoaderConfig(shards=str(out), num_workers=2)  # each slot owns 10 shards, one of every class
    batches = _take(cfg, 12, batch_size=64)  # 6 per slot: more than an epoch (320 samples) of each
    classes = [len(set(b["label"].tolist())) for b in batches]
    assert min(classes) >= 6, classes
    # Reading one shard at a time (mix_shards=1) gives batches of one or two classes: what mixing fixes.
    single = _take(LoaderConfig(shards=str(out), num_workers=2, mix_shards=1), 12, batch_size=64)
    assert max(len(set(b["label"].tolist())) for b in single) <= 2


def test_slot_stream_reads_its_shards_in_groups_of_mix_shards(tmp_path: Path) -> None:
    sizes = [5, 7, 3, 6, 4, 8]
    _write_shards(
        tmp_path / "s",
        [[m for j in range(n) for m in _good(f"{i}{j:03d}", 0)] for i, n in enumerate(sizes)],
        ["a"],
    )
    reader = ShardReader(resolve_shards(tmp_path / "s").shards)
    stream = SlotStream(reader, range(6), seed=3, slot=0, mix_shards=2)
    assert stream.epoch_size == sum(sizes)
    epochs = [[stream.locate(e * stream.epoch_size + p) for p in range(stream.epoch_size)] for e in range(2)]
    everything = sorted((i, j) for i, n in enumerate(sizes) for j in range(n))
    for epoch in epochs:
        assert sorted(epoch) == everything  # every sample once per epoch
        pos, groups = 0, []
        while pos < len(epoch):  # consecutive blocks, each the whole of two shards, interleaved
            members: list[int] = []
            for shard, _ in epoch[pos:]:
                if shard not in members:
                    members.append(shard)
                if len(members) == 2:
                    break
            block = [shard for shard, _ in epoch[pos : pos + sum(sizes[k] for k in members)]]
            assert set(block) == set(members)
            assert sum(a != b for a, b in itertools.pairwise(block)) > 1  # not one shard after the other
            groups.append(frozenset(members))
            pos += len(block)
        assert len(groups) == 3 and frozenset().union(*groups) == set(range(6))
    assert epochs[0] != epochs[1]  # each epoch has its own shard order, groups and permutations
    whole = SlotStream(reader, range(6), seed=3, slot=0, mix_shards=16)  # more than the slot owns: one group
    assert len({whole.locate(p)[0] for p in range(8)}) >= 4
    with pytest.raises(ValueError, match=r"data\.mix_shards must be between 1 and 64"):
        LoaderConfig(shards="x", mix_shards=0).validate()


# ------------------------------------------------------------------------------------------------
# Stop signals


def test_workers_ignore_stop_signals_and_closing_the_loader_ends_them(shards: Path) -> None:
    if not Path(f"/proc/{os.getpid()}/task").exists():
        skip_or_fail("needs Linux /proc")
    it = build_loader(
        LoaderConfig(shards=str(shards), num_workers=2), VIEWS, batch_size=4, rank=0, world_size=1, seed=0
    )
    try:
        next(it)
        workers = _loader_workers()
        assert len(workers) == 2
        for sig in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGUSR1,
            signal.SIGUSR2,
        ):  # scancel, Ctrl-C, requeue
            for pid in workers:
                os.kill(pid, sig)
        time.sleep(0.5)
        assert len([next(it) for _ in range(8)]) == 8  # the loader keeps yielding
        assert sorted(_loader_workers()) == sorted(workers)
    finally:
        it.close()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # stopped and reaped


def test_a_loader_left_open_at_exit_does_not_hang_the_process(shards: Path) -> None:
    script = f"""
import os
from pathlib import Path
from data_pipelines.augment import ViewSpec
from data_pipelines.loader import LoaderConfig, build_loader
it = build_loader(LoaderConfig(shards={str(shards)!r}, num_workers=2), [ViewSpec(size=16)], batch_size=4, rank=0,
                  world_size=1, seed=0)
next(it)
tasks = Path(f"/proc/{{os.getpid()}}/task").iterdir()
print(" ".join(pid for t in tasks for pid in (t / "children").read_text().split()), flush=True)
"""  # exits without closing the loader: multiprocessing's exit handler SIGTERMs the workers, then joins them
    proc = run_cmd([sys.executable, "-c", script], timeout=120)
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) >= 2
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


# ------------------------------------------------------------------------------------------------
# Views


def _implied_area_mean(scale: tuple[float, float], ratio: tuple[float, float], n: int = 200_000) -> float:
    """Mean crop-area fraction of RandomResizedCrop's sampling on a square image, simulated in NumPy."""
    rng = np.random.default_rng(0)
    result = np.full(n, np.nan)
    for _ in range(10):
        todo = np.isnan(result)
        area = rng.uniform(*scale, n)
        aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), n))
        fits = (area * aspect <= 1) & (area / aspect <= 1)
        result[todo & fits] = area[todo & fits]
    result[np.isnan(result)] = 1.0  # central fallback: the whole (square) image
    return float(result.mean())


def test_crop_area_distribution_and_flip_rate() -> None:
    spec = ViewSpec(size=8, scale=(0.2, 1.0))
    side = 200
    areas = []
    for i in range(4000):
        gen = torch.Generator().manual_seed(i)
        top, left, h, w = sample_crop_box(side, side, spec.scale, spec.ratio, gen)
        assert top >= 0 and top + h <= side and left >= 0 and left + w <= side
        assert spec.ratio[0] - 0.02 <= w / h <= spec.ratio[1] + 0.02
        areas.append(h * w / side**2)
    areas_np = np.array(areas)
    assert areas_np.min() >= 0.2 - 0.01 and areas_np.max() <= 1.0
    assert abs(areas_np.mean() - _implied_area_mean(spec.scale, spec.ratio)) < 0.015
    assert abs(np.median(areas_np) - 0.55) < 0.06  # roughly uniform on [0.2, 1], a little lighter at the top

    ramp = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))  # left dark, right bright
    full = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.5)
    flips = 0
    for i in range(1000):
        out = apply_view(ramp, full, torch.Generator().manual_seed(i))
        flips += int(out[0, 0, 0] > out[0, 0, -1])
    assert abs(flips / 1000 - 0.5) < 0.06
    never = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0)
    assert all(apply_view(ramp, never, torch.Generator().manual_seed(i))[0, 0, 0] < 0 for i in range(20))


def test_view_spec_validation_and_purity() -> None:
    spec = ViewSpec(size=24, scale=[0.3, 0.9], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])  # YAML lists
    assert spec.scale == (0.3, 0.9) and hash(spec)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    a = apply_view(image, spec, torch.Generator().manual_seed(7))
    b = apply_view(image, spec, torch.Generator().manual_seed(7))
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    torch.manual_seed(123)  # global RNG state has no effect
    assert torch.equal(apply_view(image, spec, torch.Generator().manual_seed(7)), a)
    for bad in ({"interpolation": "cubic"}, {"scale": (0.9, 0.1)}, {"hflip_p": 2.0}, {"size": 0}):
        with pytest.raises(ValueError, match="ViewSpec"):
            ViewSpec(**{"size": 8, **bad})


def test_permutation_is_a_permutation() -> None:
    for n in (0, 1, 2, 17, 1000):
        assert sorted(permutation(n, 42)) == list(range(n))
    assert permutation(1000, 1) != permutation(1000, 2)
    assert permutation(50, 5) == permutation(50, 5)

"""Shard building: IDX and ImageFolder sources, manifest, DALI index files, resume, errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_pipelines import build_shards as bs
from data_pipelines import datasets, sources
from data_pipelines.tar_index import (
    format_dali_index,
    group_samples,
    load_index,
    read_dali_index,
    scan_tar,
)
from tests.components import require_module, skip_or_fail

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fmnist_dir() -> Path:
    try:
        return datasets.locate_dataset("fashion-mnist")
    except datasets.DatasetNotFoundError as exc:
        skip_or_fail(f"Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): {exc}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST)


def test_idx_build_manifest_checksums_and_index(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fm"
    manifest = bs.build_shards("fashion-mnist", out, limit=600, shard_size=100, progress=False)

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == bs.FORMAT_VERSION
    assert manifest["num_samples"] == 600 and manifest["split"] == "train"
    assert manifest["classes"] == list(datasets.FASHION_MNIST_CLASSES)
    assert manifest["skipped"] == []
    assert manifest["source"]["kind"] == "idx" and manifest["source"]["path"] == str(fmnist_dir.resolve())
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    for shard in manifest["shards"]:
        tar = out / shard["name"]
        assert shard["num_samples"] == 100
        assert shard["bytes"] == tar.stat().st_size
        assert shard["sha256"] == _sha(tar)

    images = sources.read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    labels = sources.read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz")
    assert manifest["shuffle_seed"] == 0  # written in a seeded global shuffle by default
    order = bs.build_order(600, 0)
    assert sorted(order) == list(range(600)) and order != list(range(600))
    # The .idx files: DALI's header line, offsets pointing at the member data, equal to a header scan.
    tar = out / "shard-000002.tar"
    text = (out / "shard-000002.idx").read_text()
    assert text.splitlines()[0] == "v1.2 100"
    entries = read_dali_index(out / "shard-000002.idx")
    assert text == format_dali_index(group_samples(scan_tar(tar)))
    blob = tar.read_bytes()
    with tarfile.open(tar) as tf:
        by_name = {m.name: m for m in tf.getmembers()}
    for j, entry in enumerate(entries):
        index = order[200 + j]  # shard 2 holds positions 200..299 of the build order
        assert entry.key == f"{index:09d}" and set(entry.components) == {"png", "cls", "json"}
        for member in entry.components.values():
            assert by_name[member.name].offset_data == member.offset
            assert by_name[member.name].size == member.size
        png = entry.components["png"]
        pil = Image.open(io.BytesIO(blob[png.offset : png.offset + png.size]))
        assert pil.mode == "L" and pil.size == (28, 28)  # grey stays single-channel
        np.testing.assert_array_equal(np.asarray(pil), images[index])
        cls = entry.components["cls"]
        assert int(blob[cls.offset : cls.offset + cls.size]) == labels[index]
        meta = json.loads(blob[entry.components["json"].offset :][: entry.components["json"].size])
        assert meta["index"] == index and meta["label"] == labels[index]


def test_idx_matches_dali_wds2idx(fmnist_dir: Path, tmp_path: Path) -> None:
    try:
        import wds2idx
    except ImportError:
        skip_or_fail("nvidia-dali's wds2idx not installed")
    out = tmp_path / "fm"
    bs.build_shards(fmnist_dir, out, limit=50, shard_size=50, progress=False, split="test")
    ref = tmp_path / "ref.idx"
    with wds2idx.IndexCreator(str(out / "shard-000000.tar"), str(ref), verbose=False) as creator:
        creator.create_index()
    assert (out / "shard-000000.idx").read_bytes() == ref.read_bytes()


def test_deterministic_and_parallel_build(fmnist_dir: Path, tmp_path: Path) -> None:
    a = bs.build_shards(fmnist_dir, tmp_path / "a", limit=300, shard_size=100, progress=False)
    b = bs.build_shards(fmnist_dir, tmp_path / "b", limit=300, shard_size=100, progress=False, workers=2)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    for i in range(3):
        name = f"shard-{i:06d}.idx"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_resume_rebuilds_only_missing_shards(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fm"
    first = bs.build_shards(fmnist_dir, out, limit=400, shard_size=100, progress=False)
    tars = [out / s["name"] for s in first["shards"]]
    mtimes = {p.name: p.stat().st_mtime_ns for p in tars}

    tars[1].unlink()  # a shard lost
    (out / "shard-000003.tar.tmp.12345").write_bytes(b"half a shard")  # leftovers from a killed run
    (out / ".shard-000003.done.tmp.12345").write_text("{")  # pretrain.fileio's temporary names
    (out / ".manifest.json.tmp.12345").write_text("{")
    (out / "shard-000002.idx").unlink()  # index lost: regenerated from the intact tar
    second = bs.build_shards(fmnist_dir, out, limit=400, shard_size=100, progress=False)

    assert second["shards"] == first["shards"]
    assert not list(out.glob("*.tmp.*")) and not list(out.glob(".*.tmp.*"))
    assert tars[1].exists() and _sha(tars[1]) == first["shards"][1]["sha256"]
    for p in (tars[0], tars[2], tars[3]):
        assert p.stat().st_mtime_ns == mtimes[p.name], f"{p.name} was rewritten"
    assert read_dali_index(out / "shard-000002.idx") == load_index(tars[2], out / "nonexistent.idx")

    # A shard whose bytes changed (same size) fails its sha check and is rebuilt.
    data = bytearray(tars[3].read_bytes())
    data[600] ^= 0xFF
    tars[3].write_bytes(bytes(data))
    third = bs.build_shards(fmnist_dir, out, limit=400, shard_size=100, progress=False)
    assert third["shards"] == first["shards"]
    assert tars[0].stat().st_mtime_ns == mtimes[tars[0].name]


def test_interrupted_build_leaves_no_manifest_and_resumes(
    fmnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "fm"
    real_write = bs.write_shard

    def dying_write(task: bs.ShardTask, on_sample: Any = None) -> dict[str, Any]:
        if task.index == 2:
            raise KeyboardInterrupt
        return real_write(task, on_sample)

    monkeypatch.setattr(bs, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        bs.build_shards(fmnist_dir, out, limit=300, shard_size=100, progress=False)
    assert not (out / "manifest.json").exists()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert sorted(done_before) == ["shard-000000.tar", "shard-000001.tar"]

    monkeypatch.setattr(bs, "write_shard", real_write)
    manifest = bs.build_shards(fmnist_dir, out, limit=300, shard_size=100, progress=False)
    assert manifest["num_samples"] == 300 and len(manifest["shards"]) == 3
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == done_before


# ------------------------------------------------------------------------------------------------
# ImageFolder


def _make_image_folder(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Three classes of small images plus planted bad files; returns (good rel path -> label, bad)."""
    rng = np.random.default_rng(0)
    good: dict[str, int] = {}
    for label, cls in enumerate(["ant", "bee", "cat"]):  # created out of order on purpose below
        d = root / cls
        d.mkdir(parents=True)
        for i in range(3):
            rgb = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            (d / f"rgb{i}.png").write_bytes(_png(rgb))
            good[f"{cls}/rgb{i}.png"] = label
        grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        (d / "sub").mkdir()
        (d / "sub" / "grey.jpg").write_bytes(_jpg(grey))
        good[f"{cls}/sub/grey.jpg"] = label
        (d / "notes.txt").write_text("not an image, ignored")
    bad = {
        "ant/empty.png": "empty file (0 bytes)",
        "bee/page.jpg": "not a recognised image",
        "cat/truncated.png": "cannot decode image",
    }
    (root / "ant" / "empty.png").write_bytes(b"")
    (root / "bee" / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    (root / "cat" / "truncated.png").write_bytes(
        _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[:200]
    )
    return good, bad


def test_image_folder_skips_planted_corrupt_files(tmp_path: Path) -> None:
    good, bad = _make_image_folder(tmp_path / "src")
    out = tmp_path / "out"
    manifest = bs.build_shards(tmp_path / "src", out, shard_size=4, progress=False)

    assert manifest["classes"] == ["ant", "bee", "cat"]
    assert manifest["source"]["kind"] == "imagefolder"
    assert manifest["num_samples"] == len(good) and manifest["num_source_items"] == len(good) + len(bad)
    skipped = {
        Path(s["path"]).relative_to(tmp_path / "src").as_posix(): s["reason"] for s in manifest["skipped"]
    }
    assert set(skipped) == set(bad)
    for rel, reason in bad.items():
        assert skipped[rel].startswith(reason), (rel, skipped[rel])

    stored: dict[str, int] = {}
    for shard in manifest["shards"]:
        tar = out / shard["name"]
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        assert shard["num_samples"] == len(read_dali_index(out / shard["index_file"]))
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                meta = json.loads(data)
                stored[meta["source"]] = int(members[f"{key}.cls"])
                image_name = next(
                    n for n in members if n.startswith(key + ".") and n.endswith(("png", "jpg"))
                )
                original = (tmp_path / "src" / meta["source"]).read_bytes()
                if meta["source"].endswith(".png"):
                    assert members[image_name] == original  # already png: stored unchanged
                else:  # jpg re-encoded losslessly as png: same pixels as the decoded original
                    stored_pixels = np.asarray(Image.open(io.BytesIO(members[image_name])))
                    np.testing.assert_array_equal(stored_pixels, np.asarray(Image.open(io.BytesIO(original))))
    assert stored == good


def test_image_folder_reencodes_to_jpg_keeping_grey(tmp_path: Path) -> None:
    good, _ = _make_image_folder(tmp_path / "src")
    manifest = bs.build_shards(
        tmp_path / "src", tmp_path / "out", shard_size=100, image_format="jpg", progress=False
    )
    with tarfile.open(tmp_path / "out" / manifest["shards"][0]["name"]) as tf:
        names = tf.getnames()
        images = {n: Image.open(io.BytesIO(tf.extractfile(n).read())) for n in names if n.endswith(".jpg")}
    assert len(images) == len(good) and not any(n.endswith(".png") for n in names)
    assert {im.format for im in images.values()} == {"JPEG"}
    assert sorted(im.mode for im in images.values()).count("L") == 3


def test_image_folder_split_subfolders(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        d = tmp_path / "src" / split / "only"
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i}.png").write_bytes(_png(np.full((8, 8), i, dtype=np.uint8)))
    m = bs.build_shards(tmp_path / "src", tmp_path / "test", split="test", progress=False)
    assert m["num_samples"] == 2 and m["classes"] == ["only"]


def _class_folder(root: Path, num_classes: int, per_class: int) -> None:
    """An ImageFolder tree of tiny grey PNGs, ``per_class`` images in each of ``num_classes`` classes."""
    rng = np.random.default_rng(1)
    for c in range(num_classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            (root / f"class{c}" / f"{i:03d}.png").write_bytes(_png(pixels))


def _shard_labels(out: Path, manifest: dict[str, Any]) -> list[list[int]]:
    """The class index of every sample, shard by shard, in archive order."""
    labels = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            labels.append([int(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".cls")])
    return labels


def test_default_build_interleaves_classes_and_no_shuffle_keeps_source_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    _class_folder(src, num_classes=3, per_class=20)  # ImageFolder lists it class by class
    kept = tmp_path / "kept"
    assert bs.main([str(src), str(kept), "--shard-size", "10", "--no-shuffle", "--quiet"]) == 0
    kept_manifest = json.loads((kept / "manifest.json").read_text())
    assert kept_manifest["shuffle_seed"] is None
    assert _shard_labels(kept, kept_manifest) == [[k // 2] * 10 for k in range(6)]  # one class per shard
    with tarfile.open(kept / "shard-000001.tar") as tf:
        sources = [
            json.loads(tf.extractfile(m).read())["source"] for m in tf.getmembers() if m.name.endswith("json")
        ]
    assert sources == [f"class0/{i:03d}.png" for i in range(10, 20)]  # source order

    mixed = tmp_path / "mixed"
    assert bs.main([str(src), str(mixed), "--shard-size", "10", "--quiet"]) == 0
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert manifest["shuffle_seed"] == 0
    labels = _shard_labels(mixed, manifest)
    assert all(len(set(shard)) >= 2 for shard in labels), labels  # every shard holds several classes
    every = sorted(label for shard in labels for label in shard)
    assert every == sorted(label for shard in _shard_labels(kept, kept_manifest) for label in shard)

    # The order is a function of the seed: the same seed rebuilds the same bytes, another seed differs,
    # and the seed is part of what a resumed build must match.
    again = bs.build_shards(src, tmp_path / "again", shard_size=10, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert bs.main([str(src), str(tmp_path / "seed1"), "--shard-size", "10", "--seed", "1", "--quiet"]) == 0
    seed1 = json.loads((tmp_path / "seed1" / "manifest.json").read_text())
    assert seed1["shuffle_seed"] == 1 and _shard_labels(tmp_path / "seed1", seed1) != labels
    capsys.readouterr()
    assert bs.main([str(src), str(mixed), "--shard-size", "10", "--seed", "1", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Errors


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = bs.main([*args, "--quiet"])
    return code, capsys.readouterr().err


def test_cli_errors_name_the_path_and_valid_layouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    code, err = _cli(capsys, str(missing), str(tmp_path / "o"))
    assert code == 2 and str(missing) in err and "does not exist" in err and "ImageFolder" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli(capsys, str(empty), str(tmp_path / "o"))
    assert code == 2 and "empty source" in err and str(empty) in err

    no_images = tmp_path / "no_images"
    (no_images / "classA").mkdir(parents=True)
    (no_images / "classA" / "readme.txt").write_text("x")
    code, err = _cli(capsys, str(no_images), str(tmp_path / "o"))
    assert code == 2 and "empty source" in err and "classA" in err

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(_png(np.zeros((4, 4), dtype=np.uint8)))
    code, err = _cli(capsys, str(flat), str(tmp_path / "o"))
    assert code == 2 and "unrecognised source layout" in err and "sub-folder per class" in err

    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    code, err = _cli(capsys, str(a_file), str(tmp_path / "o"))
    assert code == 2 and "unrecognised source layout" in err

    code, err = _cli(capsys, str(flat), str(tmp_path / "o"), "--shard-size", "0")
    assert code == 2 and "--shard-size" in err


def test_idx_layout_errors(tmp_path: Path) -> None:
    d = tmp_path / "idx"
    d.mkdir()
    header = bytes([0, 0, 8, 3]) + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (d / "train-images-idx3-ubyte").write_bytes(header)
    (d / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (0).to_bytes(4, "big"))
    with pytest.raises(sources.SourceError, match="empty source"):
        sources.open_source(d)
    with pytest.raises(sources.SourceError, match=r"split 'test'.*t10k-images-idx3-ubyte"):
        sources.open_source(d, split="test")
    (d / "train-images-idx3-ubyte").write_bytes(b"<html>")
    with pytest.raises(sources.SourceError, match="not an IDX file"):
        sources.open_source(d)


def test_other_arguments_refused_unless_overwrite(tmp_path: Path) -> None:
    good, _ = _make_image_folder(tmp_path / "src")
    bs.build_shards(tmp_path / "src", tmp_path / "out", shard_size=4, progress=False)
    with pytest.raises(bs.BuildError, match="--overwrite"):
        bs.build_shards(tmp_path / "src", tmp_path / "out", shard_size=5, progress=False)
    m = bs.build_shards(tmp_path / "src", tmp_path / "out", shard_size=5, progress=False, overwrite=True)
    assert m["num_samples"] == len(good)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [s["name"] for s in m["shards"]]


def test_unknown_dataset_location_explains_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.locate_dataset("Fashion_MNIST", search=[tmp_path / "a", tmp_path / "b"])
    message = str(info.value)
    assert str(tmp_path / "a") in message and "apt-get install dataset-fashion-mnist" in message


def test_cli_entry_point_runs(tmp_path: Path) -> None:
    _make_image_folder(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.build_shards",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert "3 skipped" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "data_pipelines.build_shards", str(tmp_path / "missing"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode == 2 and str(tmp_path / "missing") in bad.stderr


# ------------------------------------------------------------------------------------------------
# Tar header scanning


def test_scan_tar_handles_long_names_and_pax(tmp_path: Path) -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        long_dir = "d" * 60 + "/" + "e" * 60 if fmt == tarfile.USTAR_FORMAT else "x" * 150
        names = [f"{long_dir}/000001.png", f"{long_dir}/000001.cls", "000002.png", "dir/"]
        with tarfile.open(path, "w", format=fmt) as tf:
            for i, name in enumerate(names):
                if name.endswith("/"):
                    info = tarfile.TarInfo(name[:-1])
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                    continue
                data = bytes([i]) * (100 + 700 * i)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tf:
            expected = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
        assert [(m.name, m.offset, m.size) for m in scan_tar(path)] == expected
        samples = group_samples(scan_tar(path))
        assert [s.key for s in samples] == [f"{long_dir}/000001", "000002"]


# ------------------------------------------------------------------------------------------------
# Compatibility with the readers of other tools


@pytest.mark.parametrize(("image_format", "ext"), [("png", "png"), ("pnm", "pgm")])
def test_dali_reads_shards_with_our_index_files(
    fmnist_dir: Path, tmp_path: Path, image_format: str, ext: str
) -> None:
    dali = require_module("nvidia.dali", "pip install nvidia-dali-cuda120 (requirements.txt)")
    from nvidia.dali import fn, types

    out = tmp_path / "fm"
    manifest = bs.build_shards(
        fmnist_dir, out, limit=40, shard_size=20, image_format=image_format, progress=False
    )
    tars = [str(out / s["name"]) for s in manifest["shards"]]

    @dali.pipeline_def(batch_size=40, num_threads=1, device_id=None, seed=0)
    def pipe() -> tuple:
        image, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[: -len(".tar")] + ".idx" for t in tars],
            ext=[ext, "cls"],
            missing_component_behavior="error",
            random_shuffle=False,
        )
        return fn.decoders.image(image, device="cpu", output_type=types.GRAY), cls

    p = pipe()
    p.build()
    images, classes = p.run()
    order = bs.build_order(40, manifest["shuffle_seed"])  # the order the samples were written in
    expected = sources.read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")[order]
    labels = sources.read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz")[order]
    np.testing.assert_array_equal(images.as_array()[..., 0], expected)
    assert [int(bytes(np.asarray(classes[i]))) for i in range(40)] == labels.tolist()


def test_webdataset_library_reads_shards(tmp_path: Path) -> None:
    wds = require_module("webdataset", "pip install -r requirements.txt")
    good, _ = _make_image_folder(tmp_path / "src")
    manifest = bs.build_shards(tmp_path / "src", tmp_path / "out", shard_size=100, progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "out" / manifest["shards"][0]["name"]), shardshuffle=False))
    assert len(samples) == len(good)
    assert all({"png", "cls", "json"} <= set(s) for s in samples)
    assert sorted(json.loads(s["json"])["source"] for s in samples) == sorted(good)

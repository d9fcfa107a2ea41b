"""``python -m data_pipelines.verify_shards``: hashes, indexes and samples of a shard directory."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from data_pipelines import verify_shards as vs
from tests.conftest import run_cmd


@pytest.fixture
def copy(fmnist_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the 2,000 real Fashion-MNIST samples in 8 shards (250 each)."""
    out = tmp_path / "copy"
    shutil.copytree(fmnist_shards, out)
    return out


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = vs.main([*args, "--quiet"])
    return code, capsys.readouterr().out.splitlines()


def test_intact_shards_pass(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _verify(capsys, str(copy))
    assert code == vs.EXIT_OK
    assert lines == [
        f"checked files, hashes, indexes and samples of 8 shards (2000 samples) against {copy}/manifest.json: all good"
    ]


def test_damage_is_found_and_summarised_per_shard(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    # shard 1: cut to a third (what an interrupted copy leaves)
    cut = copy / "shard-000001.tar"
    size = cut.stat().st_size
    os.truncate(cut, size // 3)
    # shard 2: one label overwritten in place (same size; only the hash and the sample show it)
    tar2 = copy / "shard-000002.tar"
    index_line = (copy / "shard-000002.idx").read_text().splitlines()[5].split()
    cls_offset = int(index_line[index_line.index("cls") + 1])
    data = bytearray(tar2.read_bytes())
    data[cls_offset] = ord("x")
    tar2.write_bytes(bytes(data))
    # shard 4: index lost; shard 6: file lost
    (copy / "shard-000004.idx").unlink()
    (copy / "shard-000006.tar").unlink()

    code, lines = _verify(capsys, str(copy))
    assert code == vs.EXIT_PROBLEMS
    by_shard = {line.split(":")[0]: line for line in lines[:-1]}
    assert sorted(by_shard) == [
        "shard-000001.tar",
        "shard-000002.tar",
        "shard-000004.tar",
        "shard-000006.tar",
    ]
    one = by_shard["shard-000001.tar"]
    assert f"{size // 3} bytes, the manifest says {size}" in one and "SHA-256 differs" in one
    assert "does not end cleanly" in one and "index file shard-000001.idx does not match the tar" in one
    lost = 250 - int(one.split("holds ")[1].split()[0])  # samples whose headers are gone
    assert lost > 100 and "of 250 samples corrupt" in one
    # the corrupt samples of a shard: the first few with their reason, then a count
    assert one.count("is truncated") == vs.SHOW_SAMPLES and "more)" in one
    two = by_shard["shard-000002.tar"]
    assert "SHA-256 differs" in two and "1 of 250 samples corrupt" in two and "is not an ASCII integer" in two
    assert "bytes, the manifest says" not in two
    assert "index file shard-000004.idx is missing" in by_shard["shard-000004.tar"]
    assert "cannot read the file" in by_shard["shard-000006.tar"]
    assert lines[-1].endswith("4 shard(s) with problems, " + lines[-1].split("problems, ")[1])
    assert manifest["num_samples"] == 2000

    # Several processes give the same verdict; --no-decode checks files and indexes only.
    assert _verify(capsys, str(copy), "--workers", "2") == (code, lines)
    code, quick = _verify(capsys, str(copy), "--no-decode")
    assert code == vs.EXIT_PROBLEMS and "samples corrupt" not in by_shard_line(quick, "shard-000002.tar")


def by_shard_line(lines: list[str], name: str) -> str:
    return next(line for line in lines if line.startswith(name + ":"))


def test_bad_input_exits_2_and_help_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vs.main([str(tmp_path / "missing"), "--quiet"]) == vs.EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{not json")
    assert vs.main([str(tmp_path), "--quiet"]) == vs.EXIT_BAD_INPUT
    assert "cannot read shard manifest" in capsys.readouterr().err
    help_text = run_cmd([sys.executable, "-m", "data_pipelines.verify_shards", "--help"]).stdout
    assert "SHA-256" in help_text and "Exit code: 0 all good, 1 problems found, 2 bad input" in help_text

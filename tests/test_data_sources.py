"""Caption sources for build_shards (caption folders, CSV/TSV), img2dataset shards as they are, the tokenizer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import build_shards as bs
from data_pipelines import sources
from data_pipelines import tar_index as ti
from data_pipelines.augment import clip_views
from data_pipelines.loader import LoaderConfig, ShardSpecError, build_loader
from data_pipelines.tokenizer import EOT_TOKEN, SOT_TOKEN, tokenize
from tests.conftest import skip_or_fail

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _members(out: Path, manifest: dict) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all shards of a build."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _caption_folder(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A Tux-Paint-like tree with planted problems; returns (good rel path -> caption, bad rel path -> reason)."""
    rng = np.random.default_rng(0)
    good: dict[str, str] = {}
    for folder, n in (("animals/birds", 4), ("food", 3)):
        d = root / folder
        d.mkdir(parents=True)
        for i in range(n):
            name = f"{folder.split('/')[-1]}{i}"
            (d / f"{name}.png").write_bytes(_png(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)))
            (d / f"{name}.txt").write_text(f"A picture of {name}.\nfr.utf8=Une image.\n", encoding="utf-8")
            good[f"{folder}/{name}.png"] = f"A picture of {name}."
    # a cut-out with transparency (composited onto white), a JPEG, and a grey image
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = (200, 30, 30, 255)  # opaque red square; the rest is transparent garbage colour
    rgba[..., :3][rgba[..., 3] == 0] = (64, 62, 50)
    (root / "food" / "cutout.png").write_bytes(_png(rgba))
    (root / "food" / "cutout.txt").write_text("A red square.")
    good["food/cutout.png"] = "A red square."
    (root / "food" / "photo.jpg").write_bytes(_jpg(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))
    (root / "food" / "photo.txt").write_text("\ufeffA photo.\r\n")  # BOM and CRLF
    good["food/photo.jpg"] = "A photo."
    # mirrored variant beside its original: left out; a vector image with a caption: left out
    (root / "animals/birds/birds0_mirror.png").write_bytes(_png(np.zeros((8, 8), dtype=np.uint8)))
    (root / "food/drawing.svg").write_text("<svg/>")
    (root / "food/drawing.txt").write_text("A drawing.")
    bad = {
        "animals/birds/empty.png": "empty file (0 bytes)",
        "animals/birds/page.jpg": "not a recognised image",
        "food/truncated.png": "cannot decode image",
        "food/nocaption.png": "missing caption",
        "food/blank.png": "empty caption",
    }
    (root / "animals/birds/empty.png").write_bytes(b"")
    (root / "animals/birds/empty.txt").write_text("An empty file.")
    (root / "animals/birds/page.jpg").write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>")
    (root / "animals/birds/page.txt").write_text("A web page.")
    (root / "food/truncated.png").write_bytes(_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[:150])
    (root / "food/truncated.txt").write_text("Half a picture.")
    (root / "food/nocaption.png").write_bytes(_png(np.full((8, 8), 9, dtype=np.uint8)))
    (root / "food/blank.png").write_bytes(_png(np.full((8, 8), 7, dtype=np.uint8)))
    (root / "food/blank.txt").write_text("\n\n")
    return good, bad


def test_caption_folder_build_counts_planted_problems_and_resumes(tmp_path: Path) -> None:
    good, bad = _caption_folder(tmp_path / "src")
    out = tmp_path / "out"
    manifest = bs.build_shards(tmp_path / "src", out, shard_size=5, progress=False)

    assert manifest["source"]["kind"] == "captions" and manifest["classes"] is None
    assert manifest["source"]["ignored"] == {"mirrored_variants": 1, "vector_images": 1}
    assert manifest["members"] == ["png", "txt", "json"]
    assert manifest["num_samples"] == len(good) and manifest["num_source_items"] == len(good) + len(bad)
    skipped = {
        Path(s["path"]).relative_to(tmp_path / "src").as_posix(): s["reason"] for s in manifest["skipped"]
    }
    assert set(skipped) == set(bad)
    for rel, reason in bad.items():
        assert skipped[rel].startswith(reason), (rel, skipped[rel])

    stored = _members(out, manifest)
    captions = {json.loads(m["json"])["source"]: m["txt"].decode() for m in stored.values()}
    assert captions == good
    assert all("cls" not in m for m in stored.values())
    cutout = next(m for m in stored.values() if json.loads(m["json"])["source"] == "food/cutout.png")
    pixels = np.asarray(Image.open(io.BytesIO(cutout["png"])))
    assert pixels.shape == (16, 16, 3)  # alpha composited away: RGB
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[8, 8]) == (200, 30, 30)

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / manifest["shards"][0]["name"]).unlink()
    again = bs.build_shards(tmp_path / "src", out, shard_size=5, progress=False)
    assert again["shards"] == manifest["shards"]
    for shard in manifest["shards"][1:]:  # finished shards are kept as they are
        assert (out / shard["name"]).stat().st_mtime_ns == mtimes[shard["name"]]


def _stamps_expected(root: Path) -> tuple[set[str], set[str], int, int]:
    """What a build of a stamps tree must hold, read from the files present (not from sources.py).

    Returns (captioned images, images without a usable caption, mirrored variants, captioned vectors)
    as paths relative to ``root``. Whatever package provides which stamps on this machine, the test
    then checks the build against the tree it actually read.
    """
    raster = {".png", ".jpg", ".jpeg"}
    images = sorted(q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in raster)

    def variant(q: Path) -> bool:
        return any(
            q.stem.endswith(sfx) and any((q.parent / f"{q.stem[: -len(sfx)]}{e}").is_file() for e in raster)
            for sfx in ("_mirror", "_flip")
        )

    def captioned(q: Path) -> bool:
        txt = q.with_suffix(".txt")
        if not txt.is_file():
            return False
        lines = txt.read_text(encoding="utf-8-sig", errors="strict").splitlines()
        return bool(lines and lines[0].strip())

    kept = [q for q in images if not variant(q)]
    good = {q.relative_to(root).as_posix() for q in kept if captioned(q)}
    uncaptioned = {q.relative_to(root).as_posix() for q in kept if not captioned(q)}
    vectors = sum(1 for q in root.rglob("*.svg") if q.with_suffix(".txt").is_file())
    return good, uncaptioned, len(images) - len(kept), vectors


def test_real_tux_paint_stamps(tmp_path: Path) -> None:
    """Every stamp ``tuxpaint-stamps-default`` ships, built into shards: counts derived from the files.

    The planted-problem cases (empty, non-image, truncated, uncaptioned files) live in the synthetic
    tree of :func:`_caption_folder`; here the real tree must come out exactly as its files say,
    whether or not other packages (``tuxpaint`` itself adds ``cartoon/tux/``) put stamps beside it.
    """
    if not (TUXPAINT_STAMPS / "animals").is_dir():
        skip_or_fail("Tux Paint stamps not installed (apt-get install tuxpaint-stamps-default)")
    good, uncaptioned, variants, vectors = _stamps_expected(TUXPAINT_STAMPS)
    assert len(good) >= 700, "tuxpaint-stamps-default ships ~785 captioned raster stamps"
    manifest = bs.build_shards(TUXPAINT_STAMPS, tmp_path / "tux", shard_size=200, progress=False)
    assert manifest["source"]["kind"] == "captions"
    assert manifest["num_samples"] == len(good)
    skipped = {
        Path(s["path"]).relative_to(TUXPAINT_STAMPS).as_posix(): s["reason"] for s in manifest["skipped"]
    }
    assert set(skipped) == uncaptioned
    assert all(r.startswith(("missing caption", "empty caption")) for r in skipped.values())
    assert manifest["source"]["ignored"] == {"mirrored_variants": variants, "vector_images": vectors}
    assert variants >= 1 and vectors >= 1  # the package ships both kinds: the rules were exercised
    stored = _members(tmp_path / "tux", manifest)
    assert {json.loads(m["json"])["source"] for m in stored.values()} == good
    assert all(m["txt"] and b"utf8=" not in m["txt"] for m in stored.values())  # first line only


def test_csv_and_tsv_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_jpg(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)))
    absolute = tmp_path / "imgs" / "3.jpg"
    (tmp_path / "pairs.csv").write_text(
        "title,filepath\n"  # header naming the columns, in the other order
        'A red bus.,imgs/0.jpg\n"A cat, sleeping.",imgs/1.jpg\n'
        f"Absolute path.,{absolute}\n"
        "Missing file.,imgs/nope.jpg\n"
        ",imgs/2.jpg\n"  # empty caption
        "only-one-column\n"
        "\n"
    )
    manifest = bs.build_shards(tmp_path / "pairs.csv", tmp_path / "out", progress=False)
    assert manifest["source"]["kind"] == "csv" and manifest["num_samples"] == 3
    reasons = sorted(s["reason"].split(":")[0] for s in manifest["skipped"])
    assert reasons == ["cannot read", "malformed row 7", "missing caption"]
    captions = sorted(m["txt"].decode() for m in _members(tmp_path / "out", manifest).values())
    assert captions == ["A cat, sleeping.", "A red bus.", "Absolute path."]

    (tmp_path / "pairs.tsv").write_text(
        "imgs/0.jpg\tFirst.\nimgs/1.jpg\tSecond, with a comma.\n"
    )  # no header
    tsv = bs.build_shards(tmp_path / "pairs.tsv", tmp_path / "out_tsv", progress=False)
    got = sorted(m["txt"].decode() for m in _members(tmp_path / "out_tsv", tsv).values())
    assert got == ["First.", "Second, with a comma."]

    (tmp_path / "empty.csv").write_text("path,caption\n")
    with pytest.raises(sources.SourceError, match=r"empty source: .*empty.csv"):
        bs.build_shards(tmp_path / "empty.csv", tmp_path / "o2", progress=False)


def test_source_type_can_be_forced(tmp_path: Path) -> None:
    _caption_folder(tmp_path / "src")
    m = bs.build_shards(tmp_path / "src", tmp_path / "out", progress=False, source_type="imagefolder")
    assert m["source"]["kind"] == "imagefolder" and m["classes"] == ["animals", "food"]
    with pytest.raises(sources.SourceError, match="unknown source type 'parquet'"):
        sources.open_source(tmp_path / "src", kind="parquet")


# ------------------------------------------------------------------------------------------------
# Shards written by img2dataset, read as they are


def _img2dataset_shards(root: Path, num_shards: int = 4, per_shard: int = 6) -> dict[str, str]:
    """img2dataset's output layout: NNNNN.tar (jpg + txt + json per sample), parquet and stats beside, no .idx."""
    rng = np.random.default_rng(2)
    root.mkdir()
    captions = {}
    for s in range(num_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                caption = f"photo {s}-{j}"
                captions[f"{s:05d}/{key}"] = caption
                meta = {
                    "url": f"http://example.com/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": caption,
                }
                for ext, data in (
                    ("jpg", _jpg(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1")
        (root / f"{s:05d}_stats.json").write_text("{}")
    return captions


@pytest.mark.parametrize("writable", [True, False])
def test_img2dataset_shards_are_read_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writable: bool
) -> None:
    captions = _img2dataset_shards(tmp_path / "laion")
    if not writable:

        def refuse(path: object, samples: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(ti, "write_dali_index", refuse)
    cfg = LoaderConfig(shards=str(tmp_path / "laion"), num_workers=0, text_key="txt", return_keys=True)
    batches = [
        b
        for _, b in zip(
            range(2), build_loader(cfg, clip_views(32), batch_size=12, rank=0, world_size=1, seed=0)
        )
    ]
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(captions)  # 24 samples = one epoch
    for b in batches:
        assert b["text"].shape == (12, 77) and b["text"].dtype == torch.int64 and (b["label"] == -1).all()
        expected = tokenize([captions[k] for k in b["keys"]])
        assert torch.equal(b["text"], expected)
    idx_files = sorted(p.name for p in (tmp_path / "laion").glob("*.idx"))
    assert idx_files == ([f"{s:05d}.idx" for s in range(4)] if writable else [])
    if writable:  # the written index equals DALI's own wds2idx format for these tars
        assert ti.read_dali_index(tmp_path / "laion" / "00000.idx") == ti.group_samples(
            ti.scan_tar(tmp_path / "laion" / "00000.tar")
        )


def test_text_key_needs_caption_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        (tmp_path / "src" / cls / "x.png").write_bytes(_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    bs.build_shards(tmp_path / "src", tmp_path / "labelled", progress=False)
    with pytest.raises(
        ShardSpecError, match=r"data.text_key='txt' but the shards .* hold only png, cls, json"
    ):
        build_loader(
            LoaderConfig(shards=str(tmp_path / "labelled"), text_key="txt"),
            clip_views(16),
            batch_size=2,
            rank=0,
            world_size=1,
            seed=0,
        )


# ------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_ids_shape_and_truncation() -> None:
    tokens = tokenize(["a photo of a cat", "A photo of a CAT!"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int64
    # CLIP BPE: <start_of_text> a photo of a cat <end_of_text>, zero padding (lower-cased input)
    assert tokens[0, :7].tolist() == [SOT_TOKEN, 320, 1125, 539, 320, 2368, EOT_TOKEN]
    assert tokens[0, 7:].eq(0).all()
    assert tokens[1, :6].tolist() == tokens[0, :6].tolist()
    long = tokenize("word " * 200, context_length=77)
    assert long.shape == (1, 77) and long[0, 0] == SOT_TOKEN and long[0, -1] == EOT_TOKEN
    assert tokenize("x", context_length=5).shape == (1, 5)
    with pytest.raises(ValueError, match="context_length"):
        tokenize("x", context_length=1)


def test_truncated_img2dataset_tar_counts_its_cut_sample_and_keeps_no_index(tmp_path: Path) -> None:
    captions = _img2dataset_shards(tmp_path / "laion", num_shards=2, per_shard=10)
    tar = tmp_path / "laion" / "00001.tar"
    members = ti.scan_tar(tar)
    tar.write_bytes(tar.read_bytes()[: members[-3].offset + 100])  # inside the last sample's jpg
    cfg = LoaderConfig(shards=str(tmp_path / "laion"), num_workers=0, text_key="txt", return_keys=True)
    batch = next(build_loader(cfg, clip_views(16), batch_size=20, rank=0, world_size=1, seed=0))
    assert batch["num_corrupt"] == 1 and "00001/000010009" not in batch["keys"]
    assert set(batch["keys"]) <= set(captions)
    assert sorted(p.name for p in (tmp_path / "laion").glob("*.idx")) == [
        "00000.idx"
    ]  # the cut tar: in memory only

"""Image-text shards for CLIP: the emoji source on a package this test writes (the real one comes from npm,
never downloaded in tests), the Tux Paint stamps (Debian tuxpaint-stamps-default), the held-out split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.augment import clip_views
from data_pipelines.image_text import TUXPAINT_STAMPS, build_image_text, held_out
from data_pipelines.loader import LoaderConfig, build_loader
from tests.conftest import run_cmd, skip_or_fail

CATEGORIES = ["Smileys & Emotion", "Food & Drink", "Flags"]


def fake_emoji_package(root: Path, n: int = 60) -> Path:
    """``package/emoji.json`` + ``package/img/google/64/*.png`` in the npm package's layout."""
    pkg = root / "package"
    (pkg / "img" / "google" / "64").mkdir(parents=True)
    records = []
    rng = np.random.default_rng(0)
    for i in range(n):
        image = f"{0x1F600 + i:x}.png"
        rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(pkg / "img" / "google" / "64" / image)
        records.append(
            {
                "name": f"THING NUMBER {i}",
                "unified": f"{0x1F600 + i:X}",
                "image": image,
                "short_name": f"thing_{i}",
                "category": CATEGORIES[i % 3],
                "sort_order": i,
                "has_img_google": i != 7,  # no Google image: left out
            }
        )
    (pkg / "emoji.json").write_text(json.dumps(records))
    return root


def test_emoji_shards_have_captions_categories_and_a_disjoint_held_out_split(tmp_path: Path):
    pkg = fake_emoji_package(tmp_path / "npm")
    manifests = build_image_text("emoji", tmp_path / "out", pkg, shard_size=16, progress=False)
    train, test = manifests["train"], manifests["test"]
    assert train["classes"] == test["classes"] == ["flags", "food and drink", "smileys and emotion"]
    assert train["num_samples"] + test["num_samples"] == 59 and 4 <= test["num_samples"] <= 24
    loader = build_loader(
        LoaderConfig(shards=str(tmp_path / "out" / "test"), num_workers=0, text_key="txt", return_keys=True),
        clip_views(32),
        batch_size=4,
        rank=0,
        world_size=1,
        seed=0,
    )
    batch = next(iter(loader))
    assert batch["images"][0].shape == (4, 3, 32, 32) and batch["text"].shape == (4, 77)
    assert (batch["text"][:, 0] == 49406).all() and (batch["text"] == 49407).sum() == 4
    # the split is a fixed function of each emoji's code point, so it never depends on order or subsets
    ids = {f"{0x1F600 + i:X}" for i in range(60) if i != 7}
    assert sum(held_out(i, 0.2) for i in ids) == test["num_samples"]
    tar_names = []
    import tarfile

    for split in ("train", "test"):
        for shard in sorted((tmp_path / "out" / split).glob("*.tar")):
            with tarfile.open(shard) as tf:
                metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
                captions = [
                    tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")
                ]
            tar_names += [(split, m["id"]) for m in metas]
            assert all(c.startswith("thing number ") and c.endswith(")") for c in captions), captions[:3]
    train_ids = {i for s, i in tar_names if s == "train"}
    test_ids = {i for s, i in tar_names if s == "test"}
    assert not train_ids & test_ids and train_ids | test_ids == ids


def test_bad_source_and_caption_template_are_named(tmp_path: Path):
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "data_pipelines.image_text",
            "emoji",
            str(tmp_path / "o"),
            "--source",
            str(tmp_path),
        ],
        check=False,
    )
    assert proc.returncode == 2 and "emoji.json" in proc.stderr and "npm pack" in proc.stderr
    pkg = fake_emoji_package(tmp_path / "npm", n=6)
    proc = run_cmd(
        [sys.executable, "-m", "data_pipelines.image_text", "emoji", str(tmp_path / "o"), "--source", str(pkg),
         "--caption", "{name}"],
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--caption" in proc.stderr


def test_tuxpaint_shards_categories_from_folders(tmp_path: Path):
    if not TUXPAINT_STAMPS.is_dir():
        skip_or_fail(f"{TUXPAINT_STAMPS} missing: install the Debian package tuxpaint-stamps-default")
    manifests = build_image_text(
        "tuxpaint", tmp_path, shard_size=400, progress=False, caption_format="{caption}"
    )
    train, test = manifests["train"], manifests["test"]
    assert "animals" in train["classes"] and "natural forces" in train["classes"]
    assert 700 <= train["num_samples"] + test["num_samples"] <= 800  # 785 captioned raster stamps (2026-11)
    assert 0.15 <= test["num_samples"] / (train["num_samples"] + test["num_samples"]) <= 0.25

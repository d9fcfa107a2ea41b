"""Both backends (wds: torchvision on the CPU; dali: DALI's CPU operators here) on the same shards.

Batch contract, same samples and parameters, pixel and statistical parity of the MAE, DINO and CLIP
recipes, rank disjointness, exact resume, the world-size-change rule, corrupt data. DALI in CPU
mode must run in CI (``CI=true`` turns a missing DALI into a failure, not a skip).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import build_shards as bs
from data_pipelines.augment import (
    ViewSpec,
    clip_views,
    dino_views,
    mae_views,
    sample_views_params,
)
from data_pipelines.loader import CorruptDataError, LoaderConfig, ShardSpecError, build_loader
from data_pipelines.tar_index import group_samples, scan_tar, write_dali_index
from data_pipelines.wds import DEFAULT_MIX_SHARDS, ShardReader, SlotStream, resolve_shards
from tests.components import require_cuda, skip_or_fail

BACKENDS = ["wds", "dali"]


@pytest.fixture(scope="module", autouse=True)
def _dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"nvidia-dali not installed (pip install nvidia-dali-cuda120): {exc}")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _smooth_colour(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like image: a low-resolution colour field upsampled, half desaturated, a little noise."""
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.float64)
    big = 0.5 * big + 0.5 * big.mean(axis=-1, keepdims=True)
    return np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 colour JPEGs (60 x 80, two classes, with captions) in 8 shards, built by build_shards."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i in range(64):
        rel = f"img/{i:03d}.jpg"
        (root / "img").mkdir(exist_ok=True)
        (root / rel).write_bytes(_jpg(_smooth_colour(rng, 60, 80)))
        rows.append(f"{rel},picture number {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = root / "shards"
    bs.build_shards(root / "pairs.csv", out, shard_size=8, image_format="jpg", progress=False)
    return out


def _write_shards(
    root: Path, shards: list[list[tuple[str, bytes]]], manifest: dict[str, Any] | None = None
) -> None:
    """Tars with the given members, their DALI indexes, and a manifest."""
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
    (root / "manifest.json").write_text(
        json.dumps({"version": 1, "shards": entries, "classes": None, **(manifest or {})})
    )


def _take(backend: str, shards: Path, views: list[ViewSpec], n: int, **kw: Any) -> list[dict[str, Any]]:
    cfg_keys = {f.name for f in dataclasses.fields(LoaderConfig)}
    cfg = LoaderConfig(
        backend=backend,
        shards=str(shards),
        return_keys=True,
        **{"dali_device": "cpu", **{k: v for k, v in kw.items() if k in cfg_keys}},
    )
    args = {"batch_size": 8, "rank": 0, "world_size": 1, "seed": 0}
    args.update({k: v for k, v in kw.items() if k not in cfg_keys})
    it = build_loader(cfg, views, **args)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()


def _levels(a: torch.Tensor, b: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """|a - b| in 0-255 grey levels (undoing the normalization)."""
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (a - b).abs() * std * 255


def _pixels(view: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """Normalized views back to [0, 255]."""
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    return (view * std + mean) * 255


# ------------------------------------------------------------------------------------------------
# Contract and parity on photo-like JPEGs


def test_batch_contract_is_the_same_for_both_backends(photo_shards: Path) -> None:
    views = dino_views(32, 16, n_local=2)
    out = {be: _take(be, photo_shards, views, 2, num_workers=2, text_key="txt") for be in BACKENDS}
    captions = {}
    for tar in photo_shards.glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".txt"):
                    captions[f"{tar.stem}/{m.name[:-4]}"] = tf.extractfile(m).read().decode()
    for a, b in zip(out["wds"], out["dali"], strict=True):
        assert set(a) == set(b) == {"images", "label", "text", "num_corrupt", "keys"}
        assert (
            a["keys"] == b["keys"]
            and torch.equal(a["label"], b["label"])
            and torch.equal(a["text"], b["text"])
        )
        assert a["num_corrupt"] == b["num_corrupt"] == 0
        assert [tuple(t.shape) for t in b["images"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in b["images"])
        assert b["text"].shape == (8, 77) and b["text"].dtype == torch.int64
        assert b["label"].tolist() == [-1] * 8
        assert b["text"][:, 0].eq(49406).all()
        assert {k: captions[k] for k in b["keys"]} == {k: captions[k] for k in a["keys"]}
        for spec, view in zip(views, b["images"], strict=True):
            pixels = _pixels(view, spec)
            assert pixels.min() >= -0.5 and pixels.max() <= 255.5 and pixels.std() > 5


@pytest.mark.parametrize(
    ("recipe", "mean_levels", "p99_levels"),
    [
        (mae_views(32), 0.6, 3.0),
        (clip_views(32), 0.6, 3.0),
        # Hue: torchvision shifts hue in HSV, DALI rotates about the grey axis (see data_pipelines.dali);
        # without hue only rounding, resampling and the single final clamp differ. The clamp dominates
        # the 99th percentile: a view brightened by 1.3 (saturating) and then given contrast 0.8 differs by
        # ~20 levels in its bright pixels (torchvision clamps between the ops), so the bound depends on how
        # many such views the 48 samples draw.
        (dino_views(32, 16, n_local=2), 5.0, 30.0),
        (dino_views(32, 16, n_local=2, hue=0.0), 0.8, 15.0),
    ],
    ids=["mae", "clip", "dino", "dino-no-hue"],
)
def test_backends_render_the_same_pixels(
    photo_shards: Path, recipe: list[ViewSpec], mean_levels: float, p99_levels: float
) -> None:
    a, b = (_take(be, photo_shards, recipe, 3, num_workers=0, batch_size=16) for be in BACKENDS)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"]
        for spec, vx, vy in zip(recipe, x["images"], y["images"], strict=True):
            d = _levels(vx, vy, spec).flatten()
            assert d.mean() < mean_levels and d.quantile(0.99) < p99_levels, (
                spec.size,
                d.mean(),
                d.quantile(0.99),
            )


# ------------------------------------------------------------------------------------------------
# Statistical parity of the augmentations


def test_view_parameters_follow_the_papers_recipes() -> None:
    n = 3000
    dino = dino_views()
    params = [sample_views_params(375, 500, dino, torch.Generator().manual_seed(i)) for i in range(n)]
    rate = lambda view, f: sum(f(p[view]) for p in params) / n  # noqa: E731
    tol = 4 * math.sqrt(0.25 / n)
    for view, (blur, solarize) in enumerate([(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * 8):
        assert abs(rate(view, lambda p: p.flip) - 0.5) < tol
        assert abs(rate(view, lambda p: bool(p.jitter_order)) - 0.8) < tol
        assert abs(rate(view, lambda p: p.grayscale) - 0.2) < tol
        assert abs(rate(view, lambda p: p.blur_sigma > 0) - blur) < tol
        assert abs(rate(view, lambda p: p.solarize) - solarize) < tol
    jittered = [p[0] for p in params if p[0].jitter_order]
    assert all(sorted(p.jitter_order) == [0, 1, 2, 3] for p in jittered)
    for op in range(4):  # each op comes first a quarter of the time (random order)
        assert abs(sum(p.jitter_order[0] == op for p in jittered) / len(jittered) - 0.25) < 0.04
    b = np.array([p.brightness for p in jittered])
    h = np.array([p.hue for p in jittered])
    s = np.array([p.saturation for p in jittered])
    assert b.min() >= 0.6 and b.max() <= 1.4 and s.min() >= 0.8 and s.max() <= 1.2 and np.abs(h).max() <= 0.1
    sigmas = np.array([p[0].blur_sigma for p in params])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.05
    areas = {v: np.array([p[v].height * p[v].width / (375 * 500) for p in params]) for v in (0, 2)}
    assert areas[0].min() >= 0.4 - 0.02 and areas[2].max() <= 0.4 + 0.02 and areas[2].min() >= 0.05 - 0.01
    clip = [
        sample_views_params(375, 500, clip_views(), torch.Generator().manual_seed(i))[0] for i in range(500)
    ]
    assert not any(p.flip or p.jitter_order or p.grayscale or p.blur_sigma or p.solarize for p in clip)
    assert min(p.height * p.width for p in clip) >= 0.9 * 375 * 500 - 500


def _noise_shards(root: Path, num_shards: int = 4, per_shard: int = 16, side: int = 24) -> Path:
    rng = np.random.default_rng(5)
    shards = [
        [
            (f"{i}{j:03d}.png", _png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
            for j in range(per_shard)
        ]
        for i in range(num_shards)
    ]
    _write_shards(root, shards)
    return root


def _isolated(spec: ViewSpec, op: str) -> ViewSpec:
    """``spec`` on the full square image (fixed geometry) with only one photometric step left on."""
    off = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
    keep = {
        "jitter": "color_jitter_p",
        "grayscale": "grayscale_p",
        "blur": "blur_p",
        "solarize": "solarize_p",
    }
    kwargs = {**off, keep[op]: getattr(spec, keep[op])} if op != "none" else off
    if op == "blur":
        kwargs["blur_sigma"] = (1.0, 2.0)  # always visible on noise (the sigma range is checked above)
    return dataclasses.replace(spec, size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_photometric_ops_are_applied_at_their_probabilities(tmp_path: Path, backend: str) -> None:
    """DINO's per-view probabilities, measured on the rendered pixels of each backend."""
    shards = _noise_shards(tmp_path / "noise")
    dino = dino_views()
    kinds = {"global1": dino[0], "global2": dino[1], "local": dino[2]}
    expected = {
        ("global1", "jitter"): 0.8, ("global1", "grayscale"): 0.2, ("global1", "blur"): 1.0, ("global1", "solarize"): 0.0,
        ("global2", "jitter"): 0.8, ("global2", "grayscale"): 0.2, ("global2", "blur"): 0.1, ("global2", "solarize"): 0.2,
        ("local", "jitter"): 0.8, ("local", "grayscale"): 0.2, ("local", "blur"): 0.5, ("local", "solarize"): 0.0,
    }  # fmt: skip
    cases = list(expected)
    views = [_isolated(dino[0], "none")] + [_isolated(kinds[k], op) for k, op in cases]
    batches = _take(backend, shards, views, 6, num_workers=0, batch_size=50)  # 300 samples
    n = 300
    for c, case in enumerate(cases, start=1):
        changed = torch.cat(
            [_levels(b["images"][c], b["images"][0], views[0]).mean(dim=(1, 2, 3)) for b in batches]
        )
        rate = float((changed > 0.3).float().mean())
        p = expected[case]
        tol = (
            4 * math.sqrt(max(p * (1 - p), 0.01) / n) + 0.02
        )  # brightness factors within 0.3 % of 1 go unseen
        assert abs(rate - p) < tol, (backend, case, rate, p)
        if case[1] == "grayscale":  # the changed ones are grey: three equal channels
            grey = torch.cat([b["images"][c] for b in batches])[changed > 0.3]
            px = _pixels(grey, views[c])
            assert (px[:, 0] - px[:, 1]).abs().max() < 1.5 and (px[:, 1] - px[:, 2]).abs().max() < 1.5


def _ramp_shards(root: Path, h: int = 75, w: int = 100) -> Path:
    """R rises left to right and G top to bottom: the output's extremes reveal the crop box and the flip."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    image = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
    data = _png(image)
    _write_shards(root, [[(f"{i}{j:03d}.png", data) for j in range(16)] for i in range(4)])
    return root


def _crop_stats(
    views: torch.Tensor, spec: ViewSpec, h: int = 75, w: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """(crop area fraction, flipped) per sample, measured from ramp views."""
    px = _pixels(views, spec)
    r, g = px[:, 0], px[:, 1]
    left, right = r[:, :, 0].mean(1), r[:, :, -1].mean(1)
    top, bottom = g[:, 0, :].mean(1), g[:, -1, :].mean(1)
    s = spec.size
    # edge pixels sample the ramp half a source pixel... half an output pixel inside the box
    width = (right - left).abs() / 255 * (w - 1) * s / (s - 1)
    height = (bottom - top).abs() / 255 * (h - 1) * s / (s - 1)
    return (width * height / (h * w)).numpy(), (left > right).numpy()


def _implied_area_mean(scale: tuple[float, float], ratio: tuple[float, float], h: int, w: int) -> float:
    """Mean area fraction of torchvision's RandomResizedCrop sampling, simulated in NumPy."""
    rng = np.random.default_rng(0)
    n, area = 200_000, h * w
    result = np.full(n, np.nan)
    for _ in range(10):
        todo = np.isnan(result)
        target = area * rng.uniform(*scale, n)
        aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), n))
        cw, ch = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
        fits = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
        result[todo & fits] = (cw * ch / area)[todo & fits]
    return float(np.nan_to_num(result, nan=1.0).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_area_and_flip_distributions(tmp_path: Path, backend: str) -> None:
    shards = _ramp_shards(tmp_path / "ramp")
    dino = dino_views(48, 24, n_local=1)
    geometric = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
    views = [mae_views(48)[0], clip_views(48)[0]] + [dataclasses.replace(v, **geometric) for v in dino]
    batches = _take(backend, shards, views, 4, num_workers=0, batch_size=64)  # 256 samples
    for v, spec in enumerate(views):
        areas, flips = _crop_stats(torch.cat([b["images"][v] for b in batches]), spec)
        expected = _implied_area_mean(spec.scale, spec.ratio, 75, 100)
        assert abs(areas.mean() - expected) < 0.03, (backend, v, areas.mean(), expected)
        assert areas.min() > spec.scale[0] - 0.05 and areas.max() < spec.scale[1] + 0.05
        assert abs(flips.mean() - spec.hflip_p) < 4 * math.sqrt(0.25 / len(flips)) + 1e-9, (
            backend,
            v,
            flips.mean(),
        )


# ------------------------------------------------------------------------------------------------
# Ranks, resume, world size


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_two_workers_disjoint_and_exact_resume(photo_shards: Path, backend: str) -> None:
    views = dino_views(24, 12, n_local=1)
    per_rank = [_take(backend, photo_shards, views, 6, num_workers=2, rank=r, world_size=2) for r in range(2)]
    for step in range(6):
        assert not set(per_rank[0][step]["keys"]) & set(per_rank[1][step]["keys"]), step
    owned = [{int(k.split("/")[0][-6:]) % 4 for b in per_rank[r] for k in b["keys"]} for r in range(2)]
    assert owned == [{0, 1}, {2, 3}]  # slot s = rank * 2 + worker owns shards k % 4 == s
    for start in (3, 4):  # a restart mid-epoch (16 samples per slot, 8 per batch)
        resumed = _take(
            backend, photo_shards, views, 6 - start, num_workers=2, rank=1, world_size=2, start_batch=start
        )
        for full, res in zip(per_rank[1][start:], resumed, strict=True):
            assert full["keys"] == res["keys"]
            assert all(torch.equal(x, y) for x, y in zip(full["images"], res["images"], strict=True))


def test_resume_with_a_different_world_size(photo_shards: Path) -> None:
    """The documented rule (data_pipelines.wds): continue at the same step with the new slot split.

    Run on the DALI backend (one process plays every slot of a rank); the rule lives in the shared
    slot stream, the ``wds`` backend reads the same samples (checked above).
    """
    views = mae_views(16)
    global_batch, step, total = 16, 5, 64
    epoch_at_step = step * global_batch // total  # passes over the data completed by step 5: 1
    shard_set = resolve_shards(photo_shards)
    for new_world in (1, 4):
        micro = global_batch // new_world
        step_keys = []
        for rank in range(new_world):
            kw = {"num_workers": 2, "rank": rank, "world_size": new_world, "batch_size": micro}
            resumed = _take("dali", photo_shards, views, 1, start_batch=step, **kw)[0]
            fresh = _take("dali", photo_shards, views, step + 1, **kw)[step]
            assert resumed["keys"] == fresh["keys"]  # exactly what a fresh run of that size reads
            assert all(torch.equal(x, y) for x, y in zip(resumed["images"], fresh["images"], strict=True))
            slot = rank * 2 + step % 2  # the new split: this rank's own shards only
            assert {int(k.split("/")[0][-6:]) % (2 * new_world) for k in resumed["keys"]} == {slot}
            # the slot is at the epoch an uninterrupted run of any size reaches at this step
            owned = list(range(slot, 8, 2 * new_world))
            stream = SlotStream(ShardReader(shard_set.shards), owned, 0, slot, mix_shards=DEFAULT_MIX_SHARDS)
            assert (step // 2) * micro // stream.epoch_size == epoch_at_step
            step_keys += resumed["keys"]
        assert len(step_keys) == len(set(step_keys)) == global_batch  # no sample twice within the step


# ------------------------------------------------------------------------------------------------
# Corrupt data and bad configuration


def _bad_png_that_passes_the_header_check(rng: np.random.Generator) -> bytes:
    """Valid header and IEND, broken IDAT: only a full decode finds out (PIL raises, DALI's decoder fails)."""
    data = bytearray(_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    i = data.find(b"IDAT")
    data[i + 30 : i + 60] = bytes(30)
    return bytes(data)


def _corrupt_caption_set(root: Path) -> set[str]:
    """4 shards x 25 samples (png + txt) with every kind of planted corruption; returns the keys logged.

    Key ``2000`` is logged for its second, duplicate occurrence; the first one is a good sample.
    """
    rng = np.random.default_rng(7)

    def good(key: str) -> list[tuple[str, bytes]]:
        return [
            (f"{key}.png", _png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))),
            (f"{key}.txt", f"caption {key}".encode()),
        ]

    shards = [[m for j in range(25) for m in good(f"{i}{j:03d}")] for i in range(4)]
    s1, s2 = shards[1], shards[2]  # sample j's members are at 2j (png) and 2j + 1 (txt)
    s1[0] = ("1000.png", b"")  # 0-byte image
    s1[2] = ("1001.png", b"<html><body>Not Found</body></html>")  # HTML saved as an image
    s1[5] = ("1002.json", b"{}")  # no caption member
    s1[6] = ("1003.png", _bad_png_that_passes_the_header_check(rng))  # DALI fails at decode time
    s2[6] = ("2003.png", _png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))[:120])  # truncated file
    s2[10:12] = [("2000.png", s2[10][1]), ("2000.txt", b"again")]  # key 2000 again (sample 2005's slot)
    _write_shards(root, shards)
    # a truncated tar: cut the last shard inside its last sample's image
    last = root / "shard-000003.tar"
    entry = (root / "shard-000003.idx").read_text().splitlines()[-1].split()
    last.write_bytes(last.read_bytes()[: int(entry[1]) + 10])
    return {"1000", "1001", "1002", "1003", "2003", "2000", "3024"}


def test_corrupt_samples_are_skipped_the_same_way_by_both_backends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    planted = _corrupt_caption_set(tmp_path / "c")
    kw = {"num_workers": 0, "batch_size": 25, "text_key": "txt", "max_corrupt_fraction": 0.2}
    with caplog.at_level(logging.WARNING):
        runs = {
            be: _take(be, tmp_path / "c", clip_views(16), 8, **kw) for be in BACKENDS
        }  # two epochs of 100
    for a, b in zip(runs["wds"], runs["dali"], strict=True):
        assert (
            a["keys"] == b["keys"]
            and a["num_corrupt"] == b["num_corrupt"]
            and torch.equal(a["text"], b["text"])
        )
        assert not {k.split("/")[1] for k in b["keys"]} & (planted - {"2000"})
        assert len([k for k in b["keys"] if k.endswith("/2000")]) <= 1 + b["num_corrupt"]
    for be in BACKENDS:
        assert sum(b["num_corrupt"] for b in runs[be][:4]) == len(planted)  # each epoch
        assert sum(b["num_corrupt"] for b in runs[be][4:]) == len(planted)
    logged = {
        r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("corrupt sample")
    }
    assert logged == planted
    assert any("DALI" in r.getMessage() and "1003" in r.getMessage() for r in caplog.records)


def test_dali_stops_above_the_corrupt_fraction(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    shards = [
        [(f"{i}{j:03d}.png", _png(rng.integers(0, 256, (8, 8), dtype=np.uint8))) for j in range(60)]
        for i in range(2)
    ]
    for j in range(0, 60, 5):
        shards[1][j] = (f"1{j:03d}.png", b"")
    _write_shards(tmp_path / "bad", shards)
    with pytest.raises(CorruptDataError, match=r"\d+ of \d+ samples .*corrupt.*shard-000001: \d+"):
        _take(
            "dali",
            tmp_path / "bad",
            mae_views(8),
            40,
            num_workers=0,
            batch_size=10,
            max_corrupt_fraction=0.01,
        )


def test_dali_configuration_errors(photo_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardSpecError, match=r"8 shards .* fewer than the 9 loader slots"):
        _take("dali", photo_shards, mae_views(8), 1, num_workers=3, world_size=3)
    with pytest.raises(ShardSpecError, match="does not exist"):
        _take("dali", tmp_path / "missing.tar", mae_views(8), 1)
    with pytest.raises(ValueError, match=r"data.dali_device 'tpu' is not valid"):
        _take("dali", photo_shards, mae_views(8), 1, dali_device="tpu")
    if not torch.cuda.is_available():
        from data_pipelines.dali import DaliUnavailableError

        with pytest.raises(DaliUnavailableError, match="CUDA is not available"):
            build_loader(
                LoaderConfig(backend="dali", shards=str(photo_shards), dali_device="gpu"),
                mae_views(8),
                batch_size=2,
                rank=0,
                world_size=1,
                seed=0,
            )


@pytest.mark.gpu
def test_dali_gpu_matches_dali_cpu(photo_shards: Path) -> None:
    require_cuda()
    views = dino_views(32, 16, n_local=2)
    cpu = _take("dali", photo_shards, views, 2, num_workers=0, dali_device="cpu")
    gpu = _take("dali", photo_shards, views, 2, num_workers=0, dali_device="gpu")
    for a, b in zip(cpu, gpu, strict=True):
        assert a["keys"] == b["keys"]
        for spec, x, y in zip(views, a["images"], b["images"], strict=True):
            assert y.device.type == "cuda"
            assert _levels(x, y.cpu(), spec).mean() < 1.5


# ------------------------------------------------------------------------------------------------
# Host-side pieces of the DALI backend


def test_probe_reads_sizes_from_headers_and_rejects_damage() -> None:
    from data_pipelines.dali import probe_image
    from data_pipelines.wds import CorruptSample

    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    for mode in ("L", "RGB", "CMYK"):
        for progressive in (False, True):
            buf = io.BytesIO()
            Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", progressive=progressive)
            assert probe_image(buf.getvalue(), "jpg")[:2] == (13, 17), (mode, progressive)
    for mode in ("L", "RGB", "RGBA", "P"):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, format="PNG")
        assert probe_image(buf.getvalue(), "png") == (13, 17, buf.getvalue())
    gif = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(gif, format="GIF")
    h, w, data = probe_image(gif.getvalue(), "png")  # a format DALI cannot read: transcoded
    assert (h, w) == (13, 17) and Image.open(io.BytesIO(data)).format == "PNG"
    jpeg = _jpg(rgb)
    for bad, reason in (
        (b"", "empty"),
        (b"<html>Not Found</html>", "cannot decode"),
        (jpeg[: len(jpeg) // 2], "cannot decode"),  # truncated: no end-of-image marker
        (_png(rgb)[:60], "cannot decode"),  # truncated PNG
    ):
        with pytest.raises(CorruptSample, match=reason):
            probe_image(bad, "jpg")


def test_colour_affine_equals_torchvision_ops_in_the_same_order() -> None:
    """Brightness, contrast, saturation and grayscale composed into one affine map are exact (no clamping)."""
    import torchvision.transforms.v2.functional as F

    from data_pipelines.augment import ViewParams
    from data_pipelines.dali import color_transform

    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.uniform(0.35, 0.65, (3, 9, 11)).astype(np.float64))  # mid-range: no clamping
    ops = {0: F.adjust_brightness, 1: F.adjust_contrast, 2: F.adjust_saturation}
    for order in itertools.permutations(range(3)):
        for grayscale in (False, True):
            p = ViewParams(
                0,
                0,
                9,
                11,
                jitter_order=order,
                brightness=1.2,
                contrast=0.7,
                saturation=1.15,
                grayscale=grayscale,
            )
            ref = x
            for op in order:
                ref = ops[op](ref, (p.brightness, p.contrast, p.saturation)[op])
            if grayscale:
                ref = F.rgb_to_grayscale(ref, num_output_channels=3)
            a, u, v = (t.astype(np.float64) for t in color_transform(p))
            m = x.mean(dim=(1, 2)).numpy()
            got = np.einsum("ij,jhw->ihw", a, x.numpy()) + (v @ m) * u[:, None, None]
            np.testing.assert_allclose(got, ref.numpy(), atol=2e-6)

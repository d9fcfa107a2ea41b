"""The CPU loader's fast paths: batched crop-resize, PGM/PPM shards, counter-based draws, synthetic bank.

Each fast path is checked against the slow reference it replaces: torchvision's per-sample
``resized_crop``, PIL's decoder, per-sample parameter drawing, and the per-index noise generator.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from data_pipelines import build_shards as bs
from data_pipelines import datasets
from data_pipelines.augment import (
    DRAWS_PER_VIEW,
    ViewParams,
    ViewSpec,
    dino_views,
    mae_views,
    render_batch,
    render_view,
    sample_crop_box,
    sample_views_params,
    views_params,
)
from data_pipelines.loader import LoaderConfig, build_loader
from data_pipelines.pnm import decode_pnm, parse_header
from data_pipelines.resample import fits_batched, resized_crops
from data_pipelines.synthetic import BANK_SIZE, synthetic_batches
from data_pipelines.wds import CorruptSample, counter_uniforms, decode_pixels, resolve_shards
from tests.conftest import skip_or_fail

_MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Noise with hard black/white bands: edges are where resampling implementations part ways."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, c, h, w, generator=g) * 255).round().to(torch.uint8)
    x[:, :, : h // 3] = 0
    x[:, :, h // 3 : h // 3 + 3] = 255
    return x


def _boxes(
    n: int, h: int, w: int, scale: tuple[float, float], seed: int = 1
) -> list[tuple[int, int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [sample_crop_box(h, w, scale, (3 / 4, 4 / 3), g) for _ in range(n)]


def _torchvision(images: torch.Tensor, boxes: list, flips: list, size: int, mode: str) -> torch.Tensor:
    out = []
    for img, (t, left, h, w), flip in zip(images, boxes, flips, strict=True):
        r = F.resized_crop(img, t, left, h, w, [size, size], interpolation=_MODES[mode], antialias=True)
        out.append(F.horizontal_flip(r) if flip else r)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# Batched crop + resize


@pytest.mark.parametrize(
    ("c", "h", "w", "size", "mode", "scale"),
    [
        (1, 28, 28, 28, "bicubic", (0.2, 1.0)),  # MAE on Fashion-MNIST: upsampling crops
        (3, 32, 32, 16, "bicubic", (0.05, 1.0)),  # downsampling: the antialiased filter widens
        (3, 32, 40, 56, "bicubic", (0.5, 1.0)),  # non-square input, output larger than the input
        (1, 28, 28, 20, "bilinear", (0.05, 1.0)),
    ],
)
def test_batched_crops_match_torchvision_per_sample(
    c: int, h: int, w: int, size: int, mode: str, scale: tuple[float, float]
) -> None:
    n = 200
    images, boxes = _images(n, c, h, w), _boxes(n, h, w, scale)
    flips = [i % 3 == 0 for i in range(n)]
    ours = resized_crops(images, boxes, flips, size, mode).int()
    ref = _torchvision(images, boxes, flips, size, mode).int()
    diff = (ours - ref).abs()
    # torchvision's uint8 kernel rounds its weights to fixed point; ours are float: a level or two, rarely.
    assert diff.max() <= 2
    assert (diff > 0).float().mean() < (0.01 if mode == "bicubic" else 0.05)
    # A flip is exactly the mirror image of the unflipped crop.
    plain = resized_crops(images, boxes, [False] * n, size, mode)
    mirrored = resized_crops(images, boxes, [True] * n, size, mode)
    assert torch.equal(mirrored, plain.flip(-1))


def test_identity_crop_returns_the_image() -> None:
    images = _images(4, 3, 30, 30)
    out = resized_crops(images, [(0, 0, 30, 30)] * 4, [False] * 4, 30, "bicubic")
    assert torch.equal(out, images)


def test_batched_path_is_limited_to_small_images() -> None:
    assert fits_batched(28, 28, "bicubic") and fits_batched(64, 48, "bilinear")
    assert not fits_batched(65, 28, "bicubic") and not fits_batched(28, 28, "nearest")
    with pytest.raises(ValueError, match="one by one"):
        resized_crops(_images(1, 1, 100, 100), [(0, 0, 50, 50)], [False], 28, "bicubic")


def test_render_batch_equals_per_sample_rendering_on_every_path() -> None:
    spec = dino_views(24, 12, n_local=1)[1]  # jitter, grayscale, blur, solarize all possible
    g = torch.Generator().manual_seed(3)
    # One size, small: the matrix path; mixed sizes or large images: torchvision one by one.
    for sizes in ([(28, 28)] * 12, [(28, 28), (30, 26)] * 6, [(80, 70)] * 4):
        pixels = [_images(1, 3 if i % 2 else 1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
        params = [sample_views_params(h, w, [spec], g)[0] for h, w in sizes]
        batch = render_batch(pixels, spec, params)
        assert batch.shape == (len(sizes), 3, 24, 24) and batch.dtype == torch.float32
        one_by_one = torch.stack([render_view(p, spec, q) for p, q in zip(pixels, params, strict=True)])
        # Matrix products of different batch sizes may sum in a different order: a value that lands on
        # .5 of a grey level can round the other way: one level, rarely, which contrast and saturation
        # factors (<= 1.4 each) can stretch to two or three.
        level = 1 / (255 * min(spec.std))
        diff = (batch - one_by_one).abs()
        assert diff.max() <= 3 * level and (diff > 1e-5).float().mean() < 0.01


def test_photometric_ops_apply_only_where_drawn() -> None:
    spec = ViewSpec(16, color_jitter_p=1.0, brightness=0.4, solarize_p=1.0)
    pixels = [_images(1, 3, 20, 20, seed=i)[0] for i in range(2)]
    box = ViewParams(0, 0, 20, 20)
    plain = ViewParams(0, 0, 20, 20, jitter_order=(), solarize=False)
    solar = ViewParams(0, 0, 20, 20, solarize=True)
    out = render_batch(pixels, spec, [plain, solar])
    torch.testing.assert_close(out[0], render_batch(pixels[:1], ViewSpec(16), [box])[0])
    assert not torch.allclose(out[1], render_batch(pixels[1:], ViewSpec(16), [box])[0])


# ------------------------------------------------------------------------------------------------
# PGM / PPM


def _pil_bytes(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(28, 28), (20, 31, 3)])
def test_pnm_decoding_matches_pil(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = _pil_bytes(array, "PPM")
    assert data[:2] == (b"P5" if len(shape) == 2 else b"P6")
    expected = torch.from_numpy(array).reshape(shape[0], shape[1], -1).permute(2, 0, 1)
    assert torch.equal(decode_pnm(data), expected)
    assert torch.equal(decode_pixels(data, "pgm" if len(shape) == 2 else "ppm"), expected)
    # Comments and other whitespace are legal in the header.
    raster = data[parse_header(data).offset :]
    kind = data[:2]
    commented = kind + b" # made by hand\n%d\t%d\n# maxval next\n255\n" % (shape[1], shape[0]) + raster
    assert torch.equal(decode_pnm(commented), expected)


def test_pnm_problems_are_corrupt_samples_or_fall_back_to_pil() -> None:
    array = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    data = _pil_bytes(array, "PPM")
    with pytest.raises(CorruptSample, match="truncated"):
        decode_pixels(data[:-5], "pgm")
    with pytest.raises(CorruptSample, match="zero size"):
        decode_pixels(b"P5\n0 4\n255\n", "pgm")
    with pytest.raises(CorruptSample, match="cannot decode"):
        decode_pixels(b"not an image at all", "pgm")
    # maxval 15 (4-bit): PIL scales it, the fast path declines.
    low = b"P5\n3 1\n15\n" + bytes([0, 7, 15])
    assert decode_pnm(low) is None
    assert (
        decode_pixels(low, "pgm").flatten().tolist()
        == np.asarray(Image.open(io.BytesIO(low))).flatten().tolist()
    )


def test_pnm_shards_hold_the_same_pixels_as_png_shards(tmp_path) -> None:
    try:
        source = datasets.locate_dataset("fashion-mnist")
    except datasets.DatasetNotFoundError as exc:
        skip_or_fail(f"Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): {exc}")
    shards = {}
    for fmt in ("png", "pnm"):
        manifest = bs.build_shards(
            source, tmp_path / fmt, limit=60, shard_size=20, image_format=fmt, progress=False
        )
        assert manifest["image_format"] == fmt
        shards[fmt] = resolve_shards(tmp_path / fmt)
    assert resolve_shards(tmp_path / "pnm").manifest["members"][:2] == ["pgm", "ppm"]
    from data_pipelines.wds import ShardReader, parse_sample

    readers = {fmt: ShardReader(s.shards) for fmt, s in shards.items()}
    for i, j in itertools.product(range(3), range(20)):
        decoded = {}
        for fmt, reader in readers.items():
            key, members = reader.read(i, j)
            ext, data, label, _ = parse_sample(members, require_label=True)
            assert ext == {"png": "png", "pnm": "pgm"}[fmt]
            decoded[fmt] = (key, label, decode_pixels(data, ext))
        assert decoded["png"][:2] == decoded["pnm"][:2]
        assert torch.equal(decoded["png"][2], decoded["pnm"][2])
    # Colour images become PPM members.
    rgb = tmp_path / "folder" / "cls"
    rgb.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((9, 7, 3), 40 * k, dtype=np.uint8)).save(rgb / f"{k}.png")
    bs.build_shards(tmp_path / "folder", tmp_path / "rgb", image_format="pnm", progress=False)
    key, members = ShardReader(resolve_shards(tmp_path / "rgb").shards).read(0, 2)
    assert "ppm" in members and decode_pixels(members["ppm"], "ppm").shape == (3, 9, 7)


# ------------------------------------------------------------------------------------------------
# Counter-based draws and batched parameters


def test_counter_uniforms_are_a_pure_function_of_seed_counter_and_column() -> None:
    u = counter_uniforms(123, range(1000), 40)
    assert u.shape == (1000, 40) and u.dtype == np.float64 and u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(u[500:510], counter_uniforms(123, range(500, 510), 40))
    np.testing.assert_array_equal(u[:, :7], counter_uniforms(123, range(1000), 7))
    assert not np.array_equal(u, counter_uniforms(124, range(1000), 40))
    # Moments of U(0, 1), no correlation between neighbouring columns or counters.
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.02
    assert len(np.unique(u)) == u.size


def test_batched_view_parameters_equal_one_sample_at_a_time() -> None:
    specs = dino_views(32, 16, n_local=2) + mae_views(28)
    heights, widths = [28, 375, 10, 300, 32] * 40, [28, 500, 300, 10, 40] * 40
    u = counter_uniforms(7, range(200), DRAWS_PER_VIEW * len(specs))
    batch = views_params(heights, widths, specs, u)
    for i in range(200):
        assert batch[i] == views_params(heights[i : i + 1], widths[i : i + 1], specs, u[i : i + 1])[0]
    with pytest.raises(ValueError, match="shape"):
        views_params(heights, widths, specs, u[:, :-1])


# ------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_stream_is_split_invariant_and_banked() -> None:
    views = [ViewSpec(8), ViewSpec(4)]
    one = synthetic_batches(views, batch_size=8, rank=0, world_size=1, seed=3)
    two = [synthetic_batches(views, batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        whole, parts = next(one), [next(it) for it in two]
        for v in range(2):
            assert torch.equal(whole["images"][v], torch.cat([p["images"][v] for p in parts]))
        assert torch.equal(whole["label"], torch.cat([p["label"] for p in parts]))
    first = next(synthetic_batches(views, batch_size=BANK_SIZE + 2, rank=0, world_size=1, seed=3))
    assert torch.equal(first["images"][0][:2], first["images"][0][BANK_SIZE:])
    assert not torch.equal(first["images"][0][0], first["images"][0][1])
    assert first["images"][0].std() == pytest.approx(1.0, abs=0.05)


def test_synthetic_backend_through_the_loader_with_text() -> None:
    cfg = LoaderConfig(backend="synthetic", text_key="txt", context_length=16)
    batch = next(build_loader(cfg, mae_views(8), batch_size=4, rank=0, world_size=1, seed=0))
    assert batch["images"][0].shape == (4, 3, 8, 8)
    assert batch["text"].shape == (4, 16) and batch["text"][:, 0].eq(49406).all()


def test_workers_ship_uint8_and_the_loader_normalizes(fmnist_shards) -> None:
    from data_pipelines.augment import normalize_view
    from data_pipelines.wds import WdsBatches

    spec = mae_views(28)[0]
    ds = WdsBatches(
        resolve_shards(fmnist_shards), [spec], batch_size=8, rank=0, world_size=1, num_workers=0, seed=0
    )
    raw = next(iter(ds))
    # Grey images without photometric steps stay one channel on the wire: 1/12 of the float32 bytes.
    assert raw["images"][0].dtype == torch.uint8 and raw["images"][0].shape == (8, 1, 28, 28)
    assert isinstance(raw["label"], np.ndarray)
    cfg = LoaderConfig(shards=str(fmnist_shards), num_workers=0)
    batch = next(build_loader(cfg, [spec], batch_size=8, rank=0, world_size=1, seed=0))
    assert batch["images"][0].dtype == torch.float32 and batch["images"][0].shape == (8, 3, 28, 28)
    assert torch.equal(batch["images"][0], normalize_view(raw["images"][0], spec))
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == raw["label"].tolist()
    # Pixels back from the normalization are the uint8 levels (x / 255 - mean) / std came from.
    levels = (
        batch["images"][0] * torch.tensor(spec.std).view(1, 3, 1, 1)
        + torch.tensor(spec.mean).view(1, 3, 1, 1)
    ) * 255
    torch.testing.assert_close(levels, raw["images"][0].expand(-1, 3, -1, -1).float(), atol=1e-3, rtol=0)


def test_normalize_view_in_chunks_equals_one_op() -> None:
    from data_pipelines.augment import normalize_view

    spec = mae_views(28)[0]
    for c, n in ((1, 128), (3, 37), (3, 1)):
        x = _images(n, c, 28, 28)
        mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
        expected = (x.float() / 255 - mean) / std
        out = normalize_view(x, spec)
        assert out.shape == (n, 3, 28, 28) and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)

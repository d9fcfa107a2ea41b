"""What only a CUDA device can check: bf16 training with MFU, one precision policy in both engines (bf16), the pinned-memory asynchronous checkpoint,
FSDP2 (NCCL) in one process, the loader's normalization on the rank's GPU, and nvJPEG (the decoder
behind DALI's GPU decode) on the JPEGs ``build_shards`` writes. Skipped without CUDA.

Run on a GPU machine: ``python -m pytest -m gpu tests/test_gpu.py`` (``benchmarks/gpu_suite.sh`` runs it
with the GPU benchmarks).
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import build_shards as bs
from data_pipelines.augment import mae_views, normalize_view
from data_pipelines.loader import LoaderConfig, build_loader
from pretrain.distributed import DistEnv
from pretrain.metrics import device_peak_flops
from tests.conftest import run_cmd, train_cmd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in _records(run_dir) if "train/loss" in r}


def _common(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        f"run.root={tmp_path}",
        f"run.name={name}",
        "data.backend=synthetic",
        "train.log_every=1",
        "train.global_batch_size=16",
        "optim.warmup_steps=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 colour JPEGs (48 x 64, smooth colour fields with a little noise) in 4 shards."""
    root = tmp_path_factory.mktemp("gpu_photos")
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    (root / "img").mkdir()
    for i in range(32):
        small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        big = np.asarray(Image.fromarray(small).resize((64, 48), Image.BICUBIC)).astype(np.int16)
        img = np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img" / f"{i:03d}.jpg", quality=90)
        rows.append(f"img/{i:03d}.jpg,picture {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = root / "shards"
    bs.build_shards(root / "pairs.csv", out, shard_size=8, image_format="jpg", progress=False)
    return out


def test_shard_jpegs_decode_on_the_gpu_like_on_the_cpu(jpeg_shards: Path) -> None:
    from torchvision.io import decode_jpeg

    blobs = []
    for tar in sorted(jpeg_shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            blobs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    assert len(blobs) == 32
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    on_gpu = decode_jpeg(data, device="cuda")
    for raw, gpu in zip(data, on_gpu, strict=True):
        cpu = decode_jpeg(raw)
        assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (3, 48, 64)
        diff = (gpu.cpu().int() - cpu.int()).abs().float()
        assert diff.mean() < 1.5 and diff.max() <= 24, (diff.mean(), diff.max())


def test_wds_loader_normalizes_on_the_rank_gpu(jpeg_shards: Path) -> None:
    views = mae_views(32)
    cfg = LoaderConfig(backend="wds", shards=str(jpeg_shards), num_workers=1)
    it = iter(build_loader(cfg, views, batch_size=4, rank=0, world_size=1, seed=0))
    batch = next(it)
    x = batch["images"][0]
    assert x.device.type == "cuda" and x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    assert torch.isfinite(x).all() and -3 < x.mean().item() < 3
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(normalize_view(u8.cuda(), views[0]).cpu(), normalize_view(u8, views[0]))
    close = getattr(it, "close", None)
    if close is not None:
        close()


def test_mae_trains_in_bf16_with_background_checkpoints_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "gpu"
    run_cmd(train_cmd(1, *_common(tmp_path, "gpu", "train.steps=6", "train.ckpt_every=2")))
    records = _records(run_dir)
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    if device_peak_flops(torch.device("cuda")) is not None:  # H100, H200, A100, ...: MFU on every log line
        assert all(0 < r["perf/mfu"] < 1 for r in records if "train/loss" in r)
    saves = {r["step"]: r for r in records if r.get("event") == "checkpoint"}
    assert saves[2]["background"] and saves[4]["background"] and not saves[6]["background"]
    assert (run_dir / "checkpoints" / "step_00000006" / "COMPLETE").is_file()

    run_cmd(train_cmd(1, *_common(tmp_path, "gpu", "train.steps=8", "train.ckpt_every=2")))
    start = [r for r in _records(run_dir) if r.get("event") == "start"][-1]
    assert start["resumed"] and start["step"] == 6 and start["resume_s"] >= 0
    assert sorted(_losses(run_dir)) == list(range(1, 9))


def test_async_checkpoint_stages_to_pinned_memory_and_holds_the_state_of_its_step(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.staging import DefaultStager

    from pretrain.engines.dcp_state import _reusable_stager
    from tests.test_checkpoint_async import check_async_saves_hold_the_state_of_their_step

    stager = _reusable_stager(torch.device("cuda"))
    assert isinstance(stager, DefaultStager)
    stager.close()
    cuda = DistEnv(
        rank=0, world_size=1, local_rank=0, device=torch.device("cuda", torch.cuda.current_device())
    )
    check_async_saves_hold_the_state_of_their_step(tmp_path, cuda)


def test_fsdp2_in_one_process_on_cuda_equals_the_single_engine(tmp_path: Path) -> None:
    # ckpt_every=1: background saves of DTensor shards through the pinned stager at every step
    args = ["train.steps=3", "train.precision=fp32", "train.ckpt_every=1"]
    run_cmd(train_cmd(1, *_common(tmp_path, "single", *args, "engine.name=single")))
    run_cmd(train_cmd(1, *_common(tmp_path, "fsdp", *args, "engine.name=fsdp2")))
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    saves = [r for r in _records(tmp_path / "fsdp") if r.get("event") == "checkpoint"]
    assert [(r["step"], r["background"]) for r in saves] == [(1, True), (2, True), (3, False)]


RECIPES = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("config", "extra"),
    [("mae/tiny_fmnist.yaml", ()), ("dino/tiny_fmnist.yaml", ("train.steps_per_epoch=10",))],
)
def test_bf16_single_engine_and_fsdp2_follow_one_precision_policy(
    tmp_path: Path, config: str, extra: tuple[str, ...]
) -> None:
    """One precision policy across engines (pretrain/precision.py): the single engine and one-rank FSDP2 in
    bf16 give the same losses to bf16 accuracy (~3 significant digits), the losses computed in fp32 in both."""
    args = ["train.steps=3", "train.precision=bf16", *extra]
    for engine in ("single", "fsdp2"):
        run_cmd(
            train_cmd(1, *_common(tmp_path, engine, *args, f"engine.name={engine}"), config=RECIPES / config)
        )
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp2")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(math.isfinite(a[s]) and abs(a[s] - b[s]) <= 2e-2 * abs(a[s]) for s in a), (a, b)

"""DINO as real training processes: FSDP2 on 2 ranks with gradient accumulation equals one process on
the same global batch (loss, center, teacher and student), kill -9 and resume continue bit for bit, and
a resume from a checkpoint taken while the last layer is frozen."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cmd
from tests.conftest import train_cmd as _train_cmd
from tests.test_train_distributed import common, export_weights, kill9_after_save, losses

pytestmark = pytest.mark.multiproc

TINY_DINO = ROOT / "configs" / "dino" / "tiny_fmnist.yaml"
DUMP = str(ROOT / "tests" / "helpers" / "dump_loaded_state.py")
# A smaller head and 3 local crops keep the processes fast; every schedule is active within a few steps:
# 2 steps per epoch, the last layer frozen for the first epoch, the teacher temperature warmed up over 2.
SMALL = [
    "method.out_dim=512",
    "method.hidden_dim=64",
    "method.bottleneck_dim=32",
    "method.local_crops=3",
    "model.drop_path_rate=0",  # drop path draws per rank: 2 ranks could not equal 1 process
    "train.steps_per_epoch=2",
    "method.freeze_last_layer_epochs=1",
    "method.warmup_teacher_temp=0.02",
    "method.warmup_teacher_temp_epochs=2",
]


def train_cmd(nproc: int, *overrides: str) -> list[str]:
    return _train_cmd(nproc, *overrides, config=TINY_DINO)


def _dump(tmp_path: Path, run: str, step: int, *overrides: str) -> dict[str, torch.Tensor]:
    """The model state of ``run``'s checkpoint at ``step``, loaded in one process."""
    out = tmp_path / f"{run}.pt"
    ckpt = tmp_path / run / "checkpoints" / f"step_{step:08d}"
    run_cmd([sys.executable, DUMP, str(TINY_DINO), str(ckpt), str(out), *common(tmp_path, run, *overrides),
             "engine.name=single"])  # fmt: skip
    return torch.load(out, weights_only=True)["model"]


def test_fsdp2_two_ranks_with_accumulation_equal_one_process(tmp_path: Path):
    args = [
        *SMALL,
        "data.backend=synthetic",
        "train.steps=4",
        "train.global_batch_size=16",
        "optim.warmup_steps=1",
        "train.ckpt_every=4",
        "train.visualize_every=2",  # the attention maps run like forward under FSDP2 (every rank)
        "train.visualize_samples=2",
    ]
    run_cmd(train_cmd(1, *common(tmp_path, "single", *args, "engine.name=single")))
    run_cmd(train_cmd(2, *common(tmp_path, "fsdp", *args, "engine.name=fsdp2", "train.accum_steps=2")))
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])

    one = _dump(tmp_path, "single", 4, *args)
    two = _dump(tmp_path, "fsdp", 4, *args)
    assert one.keys() == two.keys() and "center" in one
    assert one["center"].abs().sum() > 0  # updated from the teacher's outputs
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)  # center, teacher, student
    wa, wb = export_weights(tmp_path / "single", 4), export_weights(tmp_path / "fsdp", 4)
    teacher = {
        k.removeprefix("teacher.backbone."): v for k, v in one.items() if k.startswith("teacher.backbone.")
    }
    assert wa.keys() == wb.keys() == teacher.keys()
    for k in wa:
        assert torch.equal(wa[k], teacher[k]), k  # the export is the teacher
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "fsdp" / "tb"), size_guidance={"images": 0, "scalars": 0})
    tb.Reload()
    assert [e.step for e in tb.Images("dino/attention_heads")] == [2, 4]
    temps = [e.value for e in tb.Scalars("train/teacher_temp")]
    assert temps == pytest.approx([0.02, 0.02, 0.04, 0.04])  # per epoch of 2 steps, as DINOLoss


def test_kill9_and_resume_is_bitwise_identical(tmp_path: Path, fmnist_shards: Path):
    args = [
        *SMALL,
        f"data.shards={fmnist_shards}",
        "train.steps=12",
        "train.global_batch_size=32",
        "train.ckpt_every=4",
        "optim.warmup_steps=2",
        "run.deterministic=true",
        "data.num_workers=2",
    ]
    run_cmd(train_cmd(2, *common(tmp_path, "straight", *args)), timeout=600)

    cmd = train_cmd(2, *common(tmp_path, "killed", *args))
    kill9_after_save(cmd, tmp_path / "killed", tmp_path / "killed.log", reach=9, save=8, timeout=400)
    run_cmd(cmd, timeout=600)  # the same command again resumes from step 8

    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(ref) == sorted(got) == list(range(1, 13))
    assert all(ref[s] == got[s] for s in ref), {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
    wa, wb = export_weights(tmp_path / "straight", 12), export_weights(tmp_path / "killed", 12)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_a_checkpoint_taken_while_the_last_layer_is_frozen(tmp_path: Path):
    """The last layer has no AdamW state before its first update (cancel_gradients_last_layer sets its
    gradient to None): a checkpoint of the first epoch lacks it, and the resume must start it fresh there,
    exactly as the uninterrupted run does (pretrain/checkpoint.py _drop_state_never_saved)."""
    args = [
        *SMALL,
        "data.backend=synthetic",
        "train.steps=4",
        "train.global_batch_size=8",
        "train.ckpt_every=1",
        "train.keep_last=5",
        "optim.warmup_steps=1",
        "run.deterministic=true",
    ]
    run_cmd(train_cmd(1, *common(tmp_path, "straight", *args)))
    run_cmd(train_cmd(1, *common(tmp_path, "resumed", *args)))
    for step in (2, 3, 4):  # back to step 1: inside the first epoch, the last layer never updated yet
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / f"step_{step:08d}")
    run_cmd(train_cmd(1, *common(tmp_path, "resumed", *args)))
    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert all(ref[s] == got[s] for s in ref), {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}

"""The method contract every method builds on: step context, hooks around the update, per-group
multipliers owned by the method, one precision policy across engines, per-parameter clipping,
float metrics, frozen sub-modules, parameter operations."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config, peak_lr
from pretrain.distributed import DistEnv
from pretrain.engines.single import SingleEngine
from pretrain.methods import build_method
from pretrain.methods.context import Collectives, EpochsUnknownError, LocalParamOps, RunInfo, ema_update_
from pretrain.schedules import warmup_cosine
from tests.conftest import ROOT, TINY_MAE, python_env, run_cmd

PROBE = str(ROOT / "tests" / "helpers" / "train_probe.py")
FAST = ["method.name=mae_probe", "data.backend=synthetic", "train.global_batch_size=8", "train.log_every=1"]


def _probe(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    args = [f"run.root={tmp_path}", f"run.name={name}", *FAST, *overrides]
    run_cmd(
        [sys.executable, PROBE, "--config", str(TINY_MAE), *args],
        env=python_env(PROBE_OUT=str(out)),
        timeout=240,
    )
    return [json.loads(x) for x in (out / "probe.0.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine", ["single", "fsdp2"])
def test_one_precision_policy_and_the_step_context(tmp_path: Path, engine: str):
    """bf16 on the CPU: inputs stay fp32, matmuls run in bf16, loss regions in fp32 -- under both engines."""
    records = _probe(
        tmp_path,
        engine,
        "train.steps=2",
        "train.precision=bf16",
        f"engine.name={engine}",
        "train.accum_steps=2",
        "train.steps_per_epoch=5",
    )
    forwards = [r for r in records if r["kind"] == "forward"]
    assert [(r["step"], r["micro"], r["num_micro"]) for r in forwards] == [
        (0, 0, 2),
        (0, 1, 2),
        (1, 0, 2),
        (1, 1, 2),
    ]
    for r in forwards:
        assert r["input_dtype"] == "torch.float32", r  # FSDP2 no longer casts the root's inputs
        assert r["matmul_dtype"] == "torch.bfloat16", r
        assert r["full_precision_dtype"] == "torch.float32" and r["loss_dtype"] == "torch.float32", r
        assert r["frozen_training"] is False  # frozen sub-modules stay in eval mode while the method trains
        assert r["steps_per_epoch"] == 5 and r["total_steps"] == 2
    hooks = [(r["kind"], r.get("step")) for r in records if r["kind"] != "forward"]
    assert hooks == [
        ("before_update", 0),
        ("update", None),
        ("after_update", 0),
        ("before_update", 1),
        ("update", None),
        ("after_update", 1),
    ]
    assert all(r["has_grad"] for r in records if r["kind"] == "before_update")
    assert not any(r["has_grad"] for r in records if r["kind"] == "after_update")
    metrics = [json.loads(x) for x in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/probe_float"] for m in metrics if "train/probe_float" in m] == [0.25, 0.25]


def test_group_multipliers_are_the_methods_and_survive_a_resume(tmp_path: Path):
    args = ["train.steps=4", "train.ckpt_every=2", "optim.warmup_steps=1", "run.deterministic=true"]
    first = _updates(_probe(tmp_path, "g", *args))
    cfg = load_config(TINY_MAE, ["run.name=g", *FAST, *args, "method.name=mae"])  # same optim section
    peak = peak_lr(cfg)
    lr = [warmup_cosine(s, 4, 1, peak, float(cfg.optim.min_lr)) for s in range(4)]
    expected = [[lr[s] * (1.0 if s < 2 else 0.5), lr[s] * 0.1] for s in range(4)]
    torch.testing.assert_close(
        torch.tensor(first, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    # Take the run back to its step-2 checkpoint and run the same command: steps 2 and 3 again.
    shutil.rmtree(tmp_path / "g" / "checkpoints" / "step_00000004")
    again = _updates(_probe(tmp_path, "g", *args))[len(first) :]
    torch.testing.assert_close(
        torch.tensor(again, dtype=torch.float64),
        torch.tensor(expected[2:], dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )


def _updates(records: list[dict]) -> list[list[float]]:
    """The lrs of the training updates (DCP's load makes one optimizer step at lr 0 to create state:
    only the updates that follow the method's before_update hook are the trainer's)."""
    return [
        r["lrs"]
        for prev, r in itertools.pairwise(records)
        if r["kind"] == "update" and prev["kind"] == "before_update"
    ]


def _single_engine(*overrides: str) -> SingleEngine:
    cfg = load_config(TINY_MAE, ["run.name=x", "data.backend=synthetic", *overrides])
    torch.manual_seed(0)
    engine = SingleEngine(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    engine.setup(build_method(cfg))
    return engine


def test_per_parameter_clipping_equals_dinos_formula():
    engine = _single_engine()
    params = [p for p in engine.model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g) * (0.001 if i % 2 else 10.0)  # some above, some below
    original = [p.grad.clone() for p in params]
    seen = {}
    total = engine.step(0.5, "per_param", lambda: seen.update(grads=[p.grad.clone() for p in params]))
    for before, after in zip(original, seen["grads"]):
        norm = before.norm(2)
        coef = 0.5 / (norm + 1e-6)
        expected = before * coef if coef < 1 else before  # facebookresearch/dino utils.clip_gradients
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=0)
    assert total == pytest.approx(torch.cat([o.flatten() for o in original]).norm().item(), rel=1e-5)
    assert any(o.norm() > 0.5 for o in original) and any(o.norm() < 0.5 for o in original)


def test_static_scales_are_kept_by_the_engine_not_the_optimizer():
    engine = _single_engine()
    assert engine.static_scales == [(1.0, 1.0), (1.0, 0.0)]  # decay / no-decay groups of the base method
    for group in engine.optimizer.param_groups:
        group.pop("wd_scale", None)  # what a load could leave: the trainer never reads them back


def test_ema_and_collectives_in_one_process():
    teacher = [torch.ones(3), torch.zeros(2)]
    student = [torch.full((3,), 3.0), torch.ones(2)]
    LocalParamOps().ema_(teacher, student, 0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.9 + 0.1 * 3.0))
    torch.testing.assert_close(teacher[1], torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="same shapes"):
        ema_update_([torch.ones(3)], [torch.ones(4)], 0.5)
    c = Collectives(1)
    x = torch.arange(4.0, requires_grad=True)
    assert torch.equal(c.all_reduce_sum(x), x.detach()) and torch.equal(c.all_gather(x), x.detach())
    assert c.all_gather_with_grad(x) is x


def test_epochs_convert_once_or_say_what_is_missing():
    run = RunInfo(1000, 250, 64, 1, 1, 0, 0)
    assert run.epochs_to_steps(1, "method.freeze_last_layer_epochs") == 250
    assert run.epochs_to_steps(0.5, "x") == 125
    unknown = RunInfo(1000, None, 64, 1, 1, 0, 0)
    with pytest.raises(
        EpochsUnknownError, match=r"method.warmup_teacher_temp_epochs=30 is in epochs.*train.steps_per_epoch"
    ):
        unknown.epochs_to_steps(30, "method.warmup_teacher_temp_epochs")
    assert unknown.epochs_to_steps(0, "x") == 0

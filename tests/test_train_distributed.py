"""End-to-end training runs as real processes: FSDP2 (2 ranks, gloo) against one process, kill -9 and
resume bit for bit, kill during checkpoint saves, resharding 2 ranks -> 1, a malicious checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.components import require_module
from tests.conftest import ROOT, TINY_MAE, _free_port, python_env, run_cmd, train_cmd

pytestmark = pytest.mark.multiproc


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses from metrics.jsonl; a step logged twice (replayed after a restart) keeps the last."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def export_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "exports" / f"step_{step:08d}" / "backbone.safetensors"))


def common(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"run.root={tmp_path}", f"run.name={name}", "train.log_every=1", *extra]


def test_fsdp2_two_ranks_equals_one_process(tmp_path: Path):
    args = [
        "data.backend=synthetic",
        "train.steps=4",
        "train.global_batch_size=16",
        "optim.warmup_steps=1",
        "train.ckpt_every=100",
        "engine.fsdp2.reshard_after_forward=true",
        "train.visualize_every=2",  # the method's pictures run like forward under FSDP2 (every rank)
    ]
    run_cmd(train_cmd(1, *common(tmp_path, "single", *args, "engine.name=single")))
    run_cmd(train_cmd(2, *common(tmp_path, "fsdp", *args, "engine.name=fsdp2")))
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "fsdp" / "tb"), size_guidance={"images": 0})
    tb.Reload()
    assert [e.step for e in tb.Images("mae/reconstruction")] == [2, 4]
    wa, wb = export_weights(tmp_path / "single", 4), export_weights(tmp_path / "fsdp", 4)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_fsdp2_engine_runs_in_one_process_without_a_launcher(tmp_path: Path):
    # Recipes such as vit_l16_in1k.yaml name engine.name=fsdp2; `python -m pretrain.train` on one device
    # (no torchrun, no rendezvous variables) creates a one-rank group and trains like the single engine.
    args = ["data.backend=synthetic", "train.steps=3", "train.global_batch_size=8", "optim.warmup_steps=1"]
    run_cmd(train_cmd(1, *common(tmp_path, "single", *args, "engine.name=single")))
    run_cmd(train_cmd(1, *common(tmp_path, "fsdp1", *args, "engine.name=fsdp2")))
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp1")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)


@pytest.mark.timeout(1200)  # a cold torch.compile of both block types takes minutes on 2 cores
def test_compiled_blocks_train_like_eager_on_two_ranks(tmp_path: Path):
    # train.compile=true: torch.compile per block, then fully_shard (the order the engine documents).
    args = [
        "data.backend=synthetic",
        "train.steps=3",
        "train.global_batch_size=8",
        "optim.warmup_steps=1",
        "train.ckpt_every=2",
    ]
    run_cmd(train_cmd(2, *common(tmp_path, "eager", *args)))
    run_cmd(train_cmd(2, *common(tmp_path, "compiled", *args, "train.compile=true")), timeout=600)
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=python_env(),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir) or {0: 0}) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill9_after_save(
    cmd: list[str], run_dir: Path, log: Path, *, reach: int, save: int, timeout: float = 240
) -> None:
    """Start ``cmd``, wait until it logged step ``reach`` and checkpoint ``save`` is COMPLETE (saves are
    written in the background and marked at a later step boundary), then SIGKILL every rank and the
    launcher while the job still runs."""
    proc = _start(cmd, log)
    _wait_for_step(run_dir, proc, reach, timeout=timeout)
    marker = run_dir / "checkpoints" / f"step_{save:08d}" / "COMPLETE"
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert marker.exists() and proc.poll() is None, f"step {save} was not completed while the job ran"
    _kill_group(proc)


def test_kill9_and_resume_is_bitwise_identical(tmp_path: Path, fmnist_shards: Path):
    args = [
        f"data.shards={fmnist_shards}",
        "train.steps=24",
        "train.global_batch_size=32",
        "train.ckpt_every=5",
        "run.deterministic=true",
        "data.num_workers=2",
    ]
    run_cmd(train_cmd(2, *common(tmp_path, "straight", *args)), timeout=600)

    cmd = train_cmd(2, *common(tmp_path, "killed", *args))
    kill9_after_save(cmd, tmp_path / "killed", tmp_path / "killed.log", reach=13, save=10)
    run_cmd(cmd, timeout=600)  # the same command again resumes

    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(ref) == sorted(got) == list(range(1, 25))
    assert all(ref[s] == got[s] for s in ref), {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
    wa, wb = export_weights(tmp_path / "straight", 24), export_weights(tmp_path / "killed", 24)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _saving(ckpts: Path) -> bool:
    return any(not (d / "COMPLETE").exists() for d in ckpts.glob("step_*"))


def _newest_complete(ckpts: Path) -> int:
    return max((int(d.name[5:]) for d in ckpts.glob("step_*") if (d / "COMPLETE").exists()), default=0)


@pytest.mark.parametrize("async_checkpoint", ["true", "false"])
def test_kill_during_save_resumes_from_previous_complete(tmp_path: Path, async_checkpoint: str):
    # Checkpoint every step; watch for a save in progress (a step directory without COMPLETE) and
    # SIGKILL the job right then: inside the background write, or inside the blocking DCP save.
    # Three such kills, then the same command runs to the end.
    args = [
        "data.backend=synthetic",
        "train.steps=12",
        "train.global_batch_size=8",
        "train.ckpt_every=1",
        "run.deterministic=true",
        "train.keep_last=2",
        f"train.async_checkpoint={async_checkpoint}",
    ]
    run_cmd(train_cmd(1, *common(tmp_path, "straight", *args)))
    cmd = train_cmd(1, *common(tmp_path, "killed", *args))
    run_dir, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    kills_in_save = 0
    for attempt in range(10):
        before = _newest_complete(ckpts)
        proc = _start(cmd, tmp_path / f"attempt{attempt}.log")
        deadline = time.time() + 120
        # let at least one more save complete, then kill inside the next one
        while proc.poll() is None and time.time() < deadline:
            if _newest_complete(ckpts) > before and _saving(ckpts):
                break
            time.sleep(0.001)
        if proc.poll() is not None:
            break
        _kill_group(proc)
        kills_in_save += _saving(ckpts)
        if kills_in_save >= 3:
            break
    assert kills_in_save >= 3, f"only {kills_in_save} kills landed inside a save"
    assert 3 <= _newest_complete(ckpts) < 12
    run_cmd(cmd)
    ref, got = losses(tmp_path / "straight"), losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    assert all(ref[s] == got[s] for s in ref)
    wa, wb = export_weights(tmp_path / "straight", 12), export_weights(run_dir, 12)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    complete = sorted(d.name for d in ckpts.glob("step_*") if (d / "COMPLETE").exists())
    assert complete == ["step_00000011", "step_00000012"]  # keep_last=2
    assert not _saving(ckpts)  # the partial saves were replaced or pruned


def test_save_two_ranks_resume_one_rank_equal_state(tmp_path: Path):
    args = ["data.backend=synthetic", "train.steps=3", "train.global_batch_size=8", "train.ckpt_every=3"]
    run_cmd(train_cmd(2, *common(tmp_path, "r", *args)))
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000003"
    script = str(ROOT / "tests" / "helpers" / "dump_loaded_state.py")
    over = common(tmp_path, "r", *args)
    port = ["--master_port", str(_free_port())]
    run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            *port,
            script,
            str(TINY_MAE),
            str(ckpt),
            str(tmp_path / "two.pt"),
            *over,
        ]
    )
    run_cmd(
        [
            sys.executable,
            script,
            str(TINY_MAE),
            str(ckpt),
            str(tmp_path / "one.pt"),
            *over,
            "engine.name=single",
        ]
    )
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert two["model"].keys() == one["model"].keys() and len(one["model"]) > 10
    for k in one["model"]:
        assert torch.equal(one["model"][k], two["model"][k]), k
    assert one["optim"]["state"].keys() == two["optim"]["state"].keys() and one["optim"]["state"]
    for k, st in one["optim"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[name], two["optim"]["state"][k][name]), (k, name)
            assert name != "exp_avg" or st[name].abs().sum() > 0  # really trained state, not zeros
    assert one["optim"]["param_groups"] == two["optim"]["param_groups"]


def test_malicious_checkpoint_is_refused(tmp_path: Path):
    args = ["data.backend=synthetic", "train.steps=2", "train.global_batch_size=8", "train.ckpt_every=2"]
    run_cmd(train_cmd(1, *common(tmp_path, "m", *args)))
    ckpt = tmp_path / "m" / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    extend = ["train.steps=4", "resume.allow_config_change=true"]  # a resume that must read the checkpoint
    proc = run_cmd(train_cmd(1, *common(tmp_path, "m", *args, *extend)), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to unpickle 'posix.system'" in proc.stdout + proc.stderr
    assert not marker.exists(), "the pickled payload ran"


def test_nan_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path: Path):
    args = common(
        tmp_path,
        "nan",
        "method.name=mae_nan_test",
        "data.backend=synthetic",
        "train.steps=20",
        "train.global_batch_size=8",
        "train.ckpt_every=4",
        "train.log_every=3",
    )
    script = str(ROOT / "tests" / "helpers" / "train_with_nan.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), script, "1", "9", "--config", str(TINY_MAE), *args]
    t0 = time.time()
    proc = run_cmd(cmd, check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert time.time() - t0 < 120  # no rank hangs waiting for the other
    # both ranks report the same step (9, the first bad one) and the last good checkpoint (step 8)
    assert out.count("non-finite loss or gradient norm at step 9") == 2, out[-3000:]
    assert "step_00000008" in out
    ckpts = tmp_path / "nan" / "checkpoints"
    complete = sorted(d.name for d in ckpts.glob("step_*") if (d / "COMPLETE").exists())
    assert complete == ["step_00000004", "step_00000008"]  # nothing saved after the bad step


def test_export_loads_strict_into_timm_with_same_features(tmp_path: Path):
    timm = require_module("timm", "pip install -r requirements.txt")
    args = ["data.backend=synthetic", "train.steps=2", "train.global_batch_size=8", "train.ckpt_every=2"]
    run_cmd(train_cmd(1, *common(tmp_path, "e", *args)))
    export = tmp_path / "e" / "exports" / "step_00000002"
    meta = json.loads((export / "backbone.json").read_text())
    assert (export / "COMPLETE").exists() and meta["arch"] == "vit_tiny_patch16" and meta["step"] == 2
    weights = load_file(str(export / "backbone.safetensors"))
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=meta["img_size"],
        patch_size=meta["patch_size"],
        embed_dim=meta["embed_dim"],
        depth=meta["depth"],
        num_heads=meta["num_heads"],
        num_classes=0,
    )
    ref.load_state_dict(weights, strict=True)
    from pretrain.models import create_vit

    ours = create_vit(
        meta["arch"],
        img_size=meta["img_size"],
        patch_size=meta["patch_size"],
        embed_dim=meta["embed_dim"],
        depth=meta["depth"],
        num_heads=meta["num_heads"],
        pos_embed=meta["pos_embed"],
    )
    ours.load_state_dict(weights, strict=True)
    x = torch.randn(2, 3, meta["img_size"], meta["img_size"])
    torch.testing.assert_close(
        ref.eval().forward_features(x), ours.eval().forward_features(x), atol=1e-5, rtol=1e-5
    )


def _child_with_rank(parent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's child process whose environment says RANK=<rank>."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if ppid == parent_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.parametrize("fault", ["stall", "kill"])
def test_a_stalled_or_dead_rank_ends_the_job_with_one_line(tmp_path: Path, fault: str):
    """SIGSTOP (or SIGKILL) on rank 1: rank 0's next collective times out after engine.timeout_s (or
    loses its peer) and rank 0 says so in one line naming the step and the last complete checkpoint."""
    args = common(
        tmp_path,
        fault,
        "data.backend=synthetic",
        "train.steps=100000",
        "train.global_batch_size=8",
        "train.ckpt_every=2",
        "engine.timeout_s=10",
    )
    proc = subprocess.Popen(
        train_cmd(2, *args),
        env=python_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    victim = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (len(losses_or_empty(tmp_path / fault)) >= 4):
            time.sleep(0.2)
        victim, rank0 = _child_with_rank(proc.pid, 1), _child_with_rank(proc.pid, 0)
        assert victim is not None and rank0 is not None, "the ranks' processes were not found"
        os.kill(victim, signal.SIGSTOP if fault == "stall" else signal.SIGKILL)
        t0 = time.time()
        while Path(f"/proc/{rank0}").exists() and time.time() - t0 < 120:
            time.sleep(0.2)
        assert time.time() - t0 < 10 + 30, "rank 0 did not end within the timeout (+ its clean-up)"
        with contextlib.suppress(ProcessLookupError):  # torchrun would wait 30 s for a stopped process
            os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if victim is not None:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, sig)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    if fault == "stall":
        line = next((x for x in out.splitlines() if "a collective operation timed out" in x), None)
        assert line is not None, out[-4000:]
        assert "engine.timeout_s=10 s during step" in line
    else:  # torchrun also sends SIGTERM to rank 0: it ends on the lost peer or on the stop request
        line = next(
            (x for x in out.splitlines() if "a collective operation" in x or "stop requested" in x), None
        )
        assert line is not None, out[-4000:]
    if "a collective operation" in line:
        assert "step_000000" in line and "run the same command" in line, line
    assert str(ROOT / "pretrain") not in out and "Timed out waiting" not in out, out[
        -4000:
    ]  # no traceback of ours


def losses_or_empty(run_dir: Path) -> dict[int, float]:
    return losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}

"""What protects a run directory from its operators: config checks before anything is written, one
owner at a time, the schedule horizon on resume, interrupted saves named, TensorBoard on resume, and
exports never written from non-finite weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import run_lock
from pretrain.run_lock import Owner, RunLock, RunOwnedError, dead_reason
from tests.conftest import ROOT, TINY_MAE, python_env, run_cmd, train_cmd

FAST = ["data.backend=synthetic", "train.global_batch_size=8", "train.log_every=2", "train.ckpt_every=2"]


def _args(root: Path, name: str, *extra: str) -> list[str]:
    return [f"run.root={root}", f"run.name={name}", *FAST, *extra]


def _tb_points(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


# ---- config typos never lock a run name -------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name=vit_gigantic", "model.name='vit_gigantic' is not valid; did you mean"),
        ("data.backend=foo", "data.backend='foo' is not valid; did you mean 'wds'?"),
        ("model.num_heads=5", "model.num_heads=5 must divide model.embed_dim=96"),
        ("data.worker_priority=low", "data.worker_priority='low' is not valid; did you mean 'idle'?"),
    ],
)
def test_config_typo_exits_2_naming_the_key_and_writes_nothing(tmp_path: Path, override: str, message: str):
    proc = run_cmd(
        train_cmd(1, *_args(tmp_path, "typo", "train.steps=2", override)), check=False, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "typo").exists(), "a refused config must not create the run directory"


def test_a_config_that_fails_while_building_does_not_lock_the_run_name(tmp_path: Path, fmnist_shards: Path):
    data = [f"data.shards={fmnist_shards}", "data.num_workers=1"]
    bad = run_cmd(
        train_cmd(
            1, *_args(tmp_path, "built", "train.steps=2", *data, "data.backend=dali", "data.dali_device=gpu")
        ),
        check=False,
        timeout=180,
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
    assert not (tmp_path / "built" / "config.yaml").exists()
    assert not (tmp_path / "built" / "owner.json").exists(), "the run directory is given back"
    good = run_cmd(
        train_cmd(1, *_args(tmp_path, "built", "train.steps=2", *data, "data.backend=wds")), timeout=180
    )
    assert "finished: 2 steps" in good.stdout
    assert "backend: wds" in (tmp_path / "built" / "config.yaml").read_text()


# ---- one trainer per run directory --------------------------------------------------------------
def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_second_trainer_is_refused_and_a_killed_owner_never_blocks_its_restart(tmp_path: Path):
    cmd = train_cmd(1, *_args(tmp_path, "owned", "train.steps=100000", "train.ckpt_every=1000000"))
    first = subprocess.Popen(
        cmd, env=python_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        owner_file = tmp_path / "owned" / "owner.json"
        _wait_for(lambda: (tmp_path / "owned" / "metrics.jsonl").exists(), 120, "the first trainer to start")
        owner = json.loads(owner_file.read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()

        second = run_cmd(cmd, check=False, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        out = second.stdout + second.stderr
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in out
        assert f"kill -TERM {first.pid}" in out and "Traceback" not in out
        starts = [json.loads(x) for x in (tmp_path / "owned" / "metrics.jsonl").read_text().splitlines()]
        assert sum(1 for r in starts if r.get("event") == "start") == 1

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        restart = run_cmd(train_cmd(1, *_args(tmp_path, "owned", "train.steps=2")), check=False, timeout=180)
        out = restart.stdout + restart.stderr
        assert restart.returncode == 2 and "train.steps" in out  # refused for its config, not for its owner
        assert f"process {first.pid} no longer exists" in out
    finally:
        if first.poll() is None:
            first.kill()
    assert not owner_file.exists(), "a refused start gives the directory back"


def _plant(run_dir: Path, owner: Owner, age_s: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / run_lock.OWNER_FILE
    path.write_text(json.dumps(owner.__dict__))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_owner_on_another_host_is_alive_until_its_heartbeat_is_stale(tmp_path: Path):
    other = Owner("node-that-died", 4242, 1, None, 0, time.time() - 3600)
    _plant(tmp_path / "r", other, age_s=10)
    with pytest.raises(RunOwnedError, match="in use by pid 4242 on host node-that-died"):
        RunLock(tmp_path / "r").acquire()
    _plant(tmp_path / "r", other, age_s=run_lock.STALE_AFTER_S + 60)
    lock = RunLock(tmp_path / "r")
    lock.acquire()
    assert json.loads((tmp_path / "r" / run_lock.OWNER_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "r" / run_lock.OWNER_FILE).exists()


def test_requeued_slurm_job_takes_over_from_its_earlier_attempt_on_any_node():
    me = Owner("node7", 100, 5, "1234", 1, time.time())
    earlier = Owner("node3", 200, 9, "1234", 0, time.time() - 60)
    other_job = Owner("node3", 200, 9, "999", 0, time.time() - 60)
    assert "requeued" in (dead_reason(earlier, heartbeat_age_s=5, me=me) or "")
    assert dead_reason(other_job, heartbeat_age_s=5, me=me) is None


def test_reused_pid_on_the_same_host_is_not_the_owner():
    me = Owner.of_this_process()
    if me.pid_start is None:
        pytest.fail("/proc/<pid>/stat is unreadable on Linux")
    reused = Owner(me.host, me.pid, me.pid_start - 1, None, 0, time.time())
    assert "now belongs to another process" in (dead_reason(reused, 0.0, me=me) or "")
    assert dead_reason(me, 0.0, me=me) is None


# ---- resume: the schedule horizon, interrupted saves, TensorBoard ------------------------------------
def test_raising_train_steps_on_resume_needs_allow_config_change(tmp_path: Path):
    """train.steps sets the cosine horizon: raising it re-plans the remaining lr, so it is not free."""
    run_cmd(train_cmd(1, *_args(tmp_path, "h", "train.steps=4", "optim.warmup_steps=1")), timeout=180)
    refused = run_cmd(
        train_cmd(1, *_args(tmp_path, "h", "train.steps=8", "optim.warmup_steps=1")), check=False, timeout=120
    )
    assert refused.returncode == 2
    assert "train.steps: saved 4 -> now 8" in refused.stdout and "horizon" in refused.stdout
    # A save interrupted before COMPLETE, newer than the last checkpoint: named and ignored.
    (tmp_path / "h" / "checkpoints" / "step_00000006").mkdir()
    allowed = run_cmd(
        train_cmd(
            1,
            *_args(tmp_path, "h", "train.steps=8", "optim.warmup_steps=1", "resume.allow_config_change=true"),
        ),
        timeout=180,
    )
    assert "step_00000006: interrupted save without a COMPLETE marker" in allowed.stdout
    assert "resuming from" in allowed.stdout and "step_00000004" in allowed.stdout
    lrs = {}
    for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/lr" in rec:
            lrs[rec["step"]] = rec["train/lr"]
    from pretrain.config import load_config, peak_lr
    from pretrain.schedules import warmup_cosine

    peak = peak_lr(load_config(TINY_MAE, _args(tmp_path, "h", "train.steps=8")))
    # the step that completes as 8 ran at lr(7) of the re-planned 8-step schedule, not of the old 4-step one
    assert lrs[8] == pytest.approx(warmup_cosine(7, 8, 1, peak, 0.0), rel=1e-6)
    assert lrs[4] == pytest.approx(warmup_cosine(3, 4, 1, peak, 0.0), rel=1e-6)  # steps taken keep theirs
    # The stop step's points survive the resume (purge only what came after the checkpoint).
    assert _tb_points(tmp_path / "h", "train/loss") == [2, 4, 6, 8]


# ---- exports ----------------------------------------------------------------------------------------
def test_no_export_is_written_from_non_finite_weights(tmp_path: Path):
    """export_every not a multiple of log_every/ckpt_every: the check runs before the export itself."""
    args = _args(
        tmp_path,
        "nanexp",
        "method.name=mae_nan_test",
        "train.steps=12",
        "train.log_every=5",
        "train.ckpt_every=5",
    )
    args.append("train.export_every=3")
    script = str(ROOT / "tests" / "helpers" / "train_with_nan.py")
    proc = run_cmd(
        [sys.executable, script, "0", "1", "--config", str(TINY_MAE), *args], check=False, timeout=180
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "non-finite loss or gradient norm at step 1" in proc.stdout
    assert not list((tmp_path / "nanexp" / "exports").glob("step_*")), "nothing exported after the bad step"


# ---- data/corrupt ---------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_corrupt_samples_of_every_rank_reach_tensorboard(tmp_path: Path):
    """All planted corrupt samples sit in rank 1's shards: rank 0 alone writes TensorBoard, so the
    count must be summed over ranks (it showed 0 when only rank 0's own count was logged)."""
    from tests.test_data_loader import _corrupt_set

    planted = _corrupt_set(tmp_path / "c")  # 4 shards x 100 samples; corrupt ones in shards 1 and 3
    args = [
        f"run.root={tmp_path}",
        "run.name=corrupt",
        f"data.shards={tmp_path / 'c'}",
        "data.num_workers=1",  # 2 slots: rank 0 owns shards 0 and 2, rank 1 shards 1 and 3
        "data.max_corrupt_fraction=0.05",
        "train.global_batch_size=8",
        "train.steps=50",  # exactly one pass over each rank's 200 samples
        "train.log_every=25",
        "train.ckpt_every=1000",
    ]
    run_cmd(train_cmd(2, *args), timeout=300)
    counts = [
        json.loads(x)["data/corrupt"]
        for x in (tmp_path / "corrupt" / "metrics.jsonl").read_text().splitlines()
        if "data/corrupt" in x
    ]
    assert len(counts) == 2 and sum(counts) == len(planted), counts

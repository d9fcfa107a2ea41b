"""``evals.watch`` following a training run that writes and purges exports, and its failure paths.

The trainer keeps the last ``train.keep_last`` checkpoints but (for now) every export; the test adds
a purger that keeps only the newest two exports, deleting older ones at any moment (also while the
watcher's evaluation reads them), the way an export retention policy or an impatient user would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from evals import run as evals_run
from evals import watch
from evals.errors import EvalInputError
from evals.export import list_complete_exports
from evals.results import list_results
from evals.submit import eval_job_parameters, load_cluster_profile
from tests.conftest import ROOT, python_env, run_cmd, skip_or_fail, train_cmd
from tests.test_evals_units import tiny_export, write_shards

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _purge_loop(exports: Path, stop: threading.Event, purged: list[str]) -> None:
    while not stop.is_set():
        for old in list_complete_exports(exports)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
            purged.append(old.name)
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.multiproc
def test_watcher_follows_a_run_that_writes_and_purges(tmp_path: Path, fmnist_shards: Path) -> None:
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        skip_or_fail("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    memory, test = tmp_path / "memory", tmp_path / "test"
    for out, split in ((memory, "train"), (test, "test")):
        run_cmd([sys.executable, "-m", "data_pipelines.build_shards", "fashion-mnist", str(out), "--split", split,
                 "--limit", "300", "--shard-size", "300"])  # fmt: skip
    runs = tmp_path / "runs"
    trainer = subprocess.Popen(
        train_cmd(1, f"run.root={runs}", "run.name=w", f"data.shards={fmnist_shards}", "train.steps=40",
                  "train.export_every=10", "train.ckpt_every=10", "train.keep_last=2", "train.log_every=10",
                  "train.global_batch_size=32", "data.num_workers=1"),
        cwd=ROOT, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    stop, purged = threading.Event(), []
    purger = threading.Thread(target=_purge_loop, args=(runs / "w" / "exports", stop, purged), daemon=True)
    purger.start()
    try:
        for _ in range(600):  # the watcher starts once the run directory exists
            if (runs / "w" / "config.yaml").is_file() or trainer.poll() is not None:
                break
            time.sleep(0.1)
        watcher = run_cmd(
            [sys.executable, "-m", "evals.watch", str(runs / "w"), "--protocol", "knn", "--train-data",
             str(memory), "--test-data", str(test), "--interval", "0.2", "--max-idle", "300",
             "knn.k=[5,20]", "data.num_workers=0"],
            timeout=600,
        )  # fmt: skip
        train_out, _ = trainer.communicate(timeout=600)
    finally:
        stop.set()
        purger.join()
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 0, train_out[-3000:]
    summary = json.loads(watcher.stdout.strip().splitlines()[-1])
    evaluated = summary["evaluated"]
    assert summary["failed"] == [] and len(evaluated) == len(set(evaluated))  # each export at most once
    assert any(e.startswith("step_00000040/knn-") for e in evaluated)  # the final export
    results = sorted((runs / "w" / "evals").glob("step_*/knn-*.json"))
    assert [f"{p.parent.name}/{p.stem}" for p in results] == sorted(evaluated)
    for path in results:
        res = json.loads(path.read_text())
        assert res["checkpoint"]["step"] == int(path.parent.name.split("_")[1])
        export = runs / "w" / "exports" / path.parent.name
        if export.is_dir():  # still there: the evaluated weights are exactly the complete export's
            assert (
                res["checkpoint"]["sha256"]
                == hashlib.sha256((export / "backbone.safetensors").read_bytes()).hexdigest()
            )
    assert purged  # the purger did delete exports while the run and the watcher were going
    print(f"evaluated {evaluated}, skipped {summary['skipped']}, purged {sorted(set(purged))}")
    # Restarting the watcher evaluates nothing twice.
    again = run_cmd([sys.executable, "-m", "evals.watch", str(runs / "w"), "--protocol", "knn", "--train-data",
                     str(memory), "--test-data", str(test), "--once", "knn.k=[5,20]"])  # fmt: skip
    assert json.loads(again.stdout.strip().splitlines()[-1])["evaluated"] == []


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 px shards (train/ and test/) for the tiny exports of tests.test_evals_units."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("watch_data")
    for split, n in (("train", 24), ("test", 12)):
        samples = [(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8), i % 2, None) for i in range(n)]
        write_shards(root / split, samples, shard_size=n, classes=["a", "b"])
    return root


def _args(run_dir: Path, data: Path, *extra: str, **kw: object) -> argparse.Namespace:
    args = watch.parser().parse_intermixed_args(
        [
            str(run_dir),
            "--protocol",
            "knn",
            "--data",
            str(data),
            "--once",
            *extra,
            "knn.k=[3]",
            "data.num_workers=0",
        ]
    )
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _real_evals_run(cmd: list[str], **kw: object) -> SimpleNamespace:
    """What the watcher's subprocess does, in this process: the real evals.run on the command's arguments."""
    i = cmd.index("evals.run")
    return SimpleNamespace(returncode=evals_run.main(cmd[i + 1 :]))


def test_watcher_skips_an_export_purged_while_evaluating(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    first, second = (
        tiny_export(run / "exports" / "step_00000010", 10),
        tiny_export(run / "exports" / "step_00000020", 20),
    )
    tiny_export(run / "exports" / "step_00000030", 30)
    (run / "exports" / "step_00000030" / "COMPLETE").unlink()  # being written: must not be touched
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: object) -> SimpleNamespace:
        calls.append(cmd)
        export = Path(cmd[cmd.index("--checkpoint") + 1])
        if export == first:
            shutil.rmtree(first)  # purged while evals.run reads it
            return SimpleNamespace(returncode=4)
        return _real_evals_run(cmd)

    monkeypatch.setattr(watch.subprocess, "run", fake_run)
    w = watch.Watcher(_args(run, tiny_data))
    assert w.loop() == 0
    assert [t.export.name for t in w.skipped] == ["step_00000010"]
    assert [t.export.name for t in w.evaluated] == ["step_00000020"] and not w.failed
    assert len(calls) == 2 and all("step_00000030" not in " ".join(c) for c in calls)
    assert not list((run / "evals" / "step_00000010").glob("*.failed.json"))
    # The watcher named the result before running it: evals.run wrote exactly that file.
    assert w.evaluated[0].result.is_file() and w.evaluated[0].stem.startswith("knn-")
    w2 = watch.Watcher(_args(run, tiny_data))  # a second pass: nothing left to do
    assert w2.loop() == 0 and not w2.evaluated and len(calls) == 2
    assert second.is_dir()
    # Other settings are another recipe: evaluated again, into a new file beside the first.
    w3 = watch.Watcher(_args(run, tiny_data, "knn.temperature=0.1"))
    assert w3.loop() == 0 and [t.export.name for t in w3.evaluated] == ["step_00000020"] and len(calls) == 3
    assert len(list((run / "evals" / "step_00000020").glob("knn-*.json"))) == 2


def test_watcher_counts_a_result_of_the_previous_format_as_done(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result written before recipe ids (``knn.json``) is not evaluated again when its settings are the
    watcher's recipe; with other settings it is, into a keyed file."""
    run = tmp_path / "run"
    tiny_export(run / "exports" / "step_00000010", 10)
    monkeypatch.setattr(watch.subprocess, "run", _real_evals_run)
    w = watch.Watcher(_args(run, tiny_data))
    assert w.loop() == 0 and len(w.evaluated) == 1
    keyed = w.evaluated[0].result
    legacy = json.loads(keyed.read_text())
    for k in ("recipe", "name"):
        legacy.pop(k)
    legacy["format"] = 1
    (keyed.parent / "knn.json").write_text(json.dumps(legacy))
    keyed.unlink()
    again = watch.Watcher(_args(run, tiny_data))
    assert again.loop() == 0 and not again.evaluated
    other = watch.Watcher(_args(run, tiny_data, "knn.temperature=0.1"))
    assert other.loop() == 0 and len(other.evaluated) == 1


def test_watcher_records_failures_and_stops_on_bad_input(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    tiny_export(run / "exports" / "step_00000010", 10)
    monkeypatch.setattr(watch.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=1))
    w = watch.Watcher(_args(run, tiny_data))
    assert w.loop() == 0 and len(w.failed) == 1
    (marker,) = (run / "evals" / "step_00000010").glob("knn-*.failed.json")
    failed = json.loads(marker.read_text())
    assert failed["exit_code"] == 1 and "evals.run" in " ".join(failed["command"])
    tiny_export(run / "exports" / "step_00000020", 20)
    monkeypatch.setattr(watch.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=2))
    assert watch.main([str(run), "--protocol", "knn", "--data", str(tiny_data), "--once"]) == 2


def test_watcher_submit_path_submits_each_export_once(tmp_path: Path, tiny_data: Path) -> None:
    run = tmp_path / "run"
    tiny_export(run / "exports" / "step_00000010", 10)
    submitted: list[object] = []

    class FakeExecutor:
        def submit(self, fn: object) -> SimpleNamespace:
            submitted.append(fn)
            return SimpleNamespace(job_id=str(1000 + len(submitted)))

    args = _args(run, tiny_data, submit=True, gpus=2)
    assert watch.Watcher(args, executor_factory=lambda a, r: (FakeExecutor(), "")).loop() == 0
    tiny_export(run / "exports" / "step_00000020", 20)
    assert watch.Watcher(args, executor_factory=lambda a, r: (FakeExecutor(), "")).loop() == 0
    assert len(submitted) == 2
    (path,) = (run / "evals" / "step_00000010").glob("knn-*.submitted.json")
    marker = json.loads(path.read_text())
    assert (
        marker["job_id"] == "1001" and "torch.distributed.run" in marker["command"]
    )  # 2 GPUs: torchrun in the job
    assert submitted[0].command == marker["command"]
    (entry,) = [e for e in list_results(run) if e.step == 10]
    assert entry.state == "submitted" and entry.job_id == "1001" and entry.protocol == "knn"


# ------------------------------------------------------------------------------- SLURM parameters
def test_eval_jobs_follow_the_cluster_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CLUSTER", raising=False)
    local, _ = load_cluster_profile("local")
    p = eval_job_parameters(local, "r-eval")
    assert (p["partition"], p["cpus_per_task"], p["time"], p["nodes"], p["ntasks_per_node"]) == (
        "debug",
        1,
        10,
        1,
        1,
    )
    assert "gpus_per_node" not in p and "mem" not in p  # CPU-only nodes; the site's default memory
    assert "export OMP_NUM_THREADS=1" in p["setup"] and any("PYTHONPATH" in line for line in p["setup"])
    gpu, _ = load_cluster_profile("example_h100")
    p = eval_job_parameters(gpu, "r-eval")
    assert (p["partition"], p["gpus_per_node"], p["cpus_per_task"], p["time"]) == ("gpu", 1, 12, 240)
    assert "mem" not in p  # the profile's mem "0" (the whole node) is for exclusive training jobs
    p = eval_job_parameters(
        gpu, "r-eval", gpus=2, time="30", cpus_per_task=4, mem="32G", dependency="afterok:7"
    )
    assert (p["gpus_per_node"], p["cpus_per_task"], p["time"], p["mem"]) == (2, 8, 30, "32G")
    assert p["dependency"] == "afterok:7" and p["additional_parameters"]["kill-on-invalid-dep"] == "yes"
    monkeypatch.setenv("SSL_CLUSTER", "local")  # like launch/slurm.py
    assert load_cluster_profile(None)[0].partition == "debug"
    with pytest.raises(EvalInputError, match="did you mean 'local'"):
        load_cluster_profile("locl")
    with pytest.raises(EvalInputError, match="--mem '64x': use SLURM's form"):
        eval_job_parameters(local, "r", mem="64x")


def _fake_slurm(bin_dir: Path, stderr: str) -> None:
    """An ``sbatch`` that refuses every job with ``stderr`` (what SLURM's prints), exit 1 (and an ``srun``,
    which submitit looks for first). The real cluster's refusal: test_watch_submits_to_the_real_cluster."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", f"echo '{stderr}' >&2\nexit 1"), ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize(
    ("sbatch_says", "code", "expected"),
    [
        (
            "sbatch: error: Batch job submission failed: Requested node configuration is not available",
            2,
            "sbatch refused the evaluation job (partition debug, 1 CPU(s), no GPU, 10 min; cluster profile",
        ),
        (
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
            1,
            "no SLURM controller answered sbatch: Batch job submission failed: Unable to contact slurm controller",
        ),
        (None, 2, "SLURM is not installed here (no sbatch or srun on PATH): drop --submit"),
    ],
)
def test_submit_failures_are_one_line(
    tmp_path: Path,
    tiny_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    sbatch_says: str | None,
    code: int,
    expected: str,
) -> None:
    run = tmp_path / "run"
    tiny_export(run / "exports" / "step_00000010", 10)
    bin_dir = tmp_path / "bin"
    if sbatch_says is not None:
        _fake_slurm(bin_dir, sbatch_says)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}")
    assert watch.main([str(run), "--protocol", "knn", "--data", str(tiny_data), "--once", "--submit",
                       "--cluster", "local"]) == code  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not list(
        (run / "evals" / "step_00000010").glob("*.submitted.json")
    )  # nothing recorded as handed over


def test_watcher_rejects_unknown_protocol(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    assert watch.main([str(tmp_path / "run"), "--protocol", "knn,lineer", "--once"]) == 2
    assert "did you mean 'linear'" in capsys.readouterr().err


@pytest.mark.slurm
@pytest.mark.multiproc
def test_watch_submits_to_the_real_cluster(
    slurm_cluster: object, tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--submit --cluster local`` on the real single-machine cluster: a request it cannot satisfy is one
    line (exit 2), the profile's request runs and writes the result the watcher named, and a second pass
    submits nothing."""
    run = tmp_path / "run"
    tiny_export(run / "exports" / "step_00000010", 10)
    argv = [str(run), "--protocol", "knn", "--data", str(tiny_data), "--once", "--submit", "--cluster", "local",
            "knn.k=[3]", "data.num_workers=0"]  # fmt: skip
    step_dir = run / "evals" / "step_00000010"
    assert watch.main([*argv, "--partition", "nosuch"]) == 2  # a partition the cluster does not have
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "sbatch refused the evaluation job (partition nosuch, 1 CPU(s)" in lines[0], (
        err
    )
    assert "invalid partition" in lines[0].lower(), err  # SLURM's own reason
    assert "Traceback" not in err and not list(step_dir.glob("*.submitted.json"))

    assert watch.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (marker,) = step_dir.glob("knn-*.submitted.json")
    job_id = json.loads(marker.read_text())["job_id"]
    try:
        slurm_cluster.wait_state(job_id, "COMPLETED", timeout=300)  # type: ignore[attr-defined]
    finally:
        slurm_cluster.run(["scancel", job_id], check=False, timeout=30)  # type: ignore[attr-defined]
    stem = marker.name.removesuffix(".submitted.json")
    assert summary["evaluated"] == [f"step_00000010/{stem}"]
    result = json.loads((step_dir / f"{stem}.json").read_text())  # the file the watcher named
    assert result["settings"]["knn"]["k"] == [3] and result["checkpoint"]["step"] == 10
    script = (run / "slurm" / "evals" / job_id / f"{job_id}_submission.sh").read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --cpus-per-task=1", "#SBATCH --time=10",
                 "export OMP_NUM_THREADS=1"):  # fmt: skip
        assert line in script, script
    assert "--mem" not in script and "--gpus" not in script
    (entry,) = list_results(run)
    assert entry.state == "done" and entry.name == stem  # the result replaces the submitted record
    assert watch.main(argv) == 0  # handled: nothing submitted again
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["evaluated"] == []

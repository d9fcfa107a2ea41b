"""``evals.watch`` following a training run that writes and purges exports, and its failure paths.

The trainer keeps the last ``train.keep_last`` checkpoints but (for now) every export; the test adds
a purger that keeps only the newest two exports, deleting older ones at any moment (also while the
watcher's evaluation reads them), the way an export retention policy or an impatient user would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from evals import watch
from evals.export import list_complete_exports
from tests.conftest import ROOT, python_env, run_cmd, skip_or_fail, train_cmd
from tests.test_evals_units import tiny_export

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
    assert "step_00000040/knn" in evaluated  # the final export
    results = sorted((runs / "w" / "evals").glob("step_*/knn.json"))
    assert [f"{p.parent.name}/knn" for p in results] == sorted(evaluated)
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


def _args(run_dir: Path, **kw: object) -> object:
    args = watch.parser().parse_args(
        [str(run_dir), "--protocol", "knn", "--test-data", "x", "--train-data", "y", "--once"]
    )
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_watcher_skips_an_export_purged_while_evaluating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
        out = tmp_path / "run" / "evals" / export.name / "knn.json"
        out.write_text(json.dumps({"metrics": {"top1": 1.0}}))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(watch.subprocess, "run", fake_run)
    w = watch.Watcher(_args(run))
    assert w.loop() == 0
    assert [t.export.name for t in w.skipped] == ["step_00000010"]
    assert [t.export.name for t in w.evaluated] == ["step_00000020"] and not w.failed
    assert len(calls) == 2 and all("step_00000030" not in " ".join(c) for c in calls)
    assert not (run / "evals" / "step_00000010" / "knn.failed.json").exists()
    w2 = watch.Watcher(_args(run))  # a second pass: nothing left to do
    assert w2.loop() == 0 and not w2.evaluated and len(calls) == 2
    assert second.is_dir()


def test_watcher_records_failures_and_stops_on_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    tiny_export(run / "exports" / "step_00000010", 10)
    monkeypatch.setattr(watch.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=1))
    w = watch.Watcher(_args(run))
    assert w.loop() == 0 and len(w.failed) == 1
    failed = json.loads((run / "evals" / "step_00000010" / "knn.failed.json").read_text())
    assert failed["exit_code"] == 1 and "evals.run" in " ".join(failed["command"])
    tiny_export(run / "exports" / "step_00000020", 20)
    monkeypatch.setattr(watch.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=2))
    assert watch.main([str(run), "--protocol", "knn", "--test-data", "x", "--once"]) == 2


def test_watcher_submit_path_submits_each_export_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny_export(run / "exports" / "step_00000010", 10)
    submitted: list[object] = []

    class FakeExecutor:
        def submit(self, fn: object) -> SimpleNamespace:
            submitted.append(fn)
            return SimpleNamespace(job_id=str(1000 + len(submitted)))

    args = _args(run, submit=True, gpus=2)
    assert watch.Watcher(args, executor_factory=lambda a, r: FakeExecutor()).loop() == 0
    tiny_export(run / "exports" / "step_00000020", 20)
    assert watch.Watcher(args, executor_factory=lambda a, r: FakeExecutor()).loop() == 0
    assert len(submitted) == 2
    marker = json.loads((run / "evals" / "step_00000010" / "knn.submitted.json").read_text())
    assert (
        marker["job_id"] == "1001" and "torch.distributed.run" in marker["command"]
    )  # 2 GPUs: torchrun in the job
    assert submitted[0].command == marker["command"]


def test_watcher_rejects_unknown_protocol(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    assert watch.main([str(tmp_path / "run"), "--protocol", "knn,lineer", "--once"]) == 2
    assert "did you mean 'linear'" in capsys.readouterr().err

"""launch/slurm.py on the real single-machine SLURM cluster, and --local: tiny MAE, 2 ranks (gloo, CPU).

Every run here trains the same thing (40 steps, real Fashion-MNIST shards, run.deterministic=true)
as the `--local --nproc 2` reference, so each interrupted SLURM run must end with the reference's
weights bit for bit: submitted 2-node run, USR2 preemption + requeue, plain `scancel` (save and stop,
then the same command resumes), `scontrol requeue`, a rank killed with SIGKILL. The time-limit test
runs until SLURM's limit ends it. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import slurm as cli
from launch.jobs import ephemeral_port_range, master_port
from tests.conftest import TINY_MAE

pytestmark = pytest.mark.multiproc

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
STEPS = 40


def common(shards: Path) -> list[str]:
    return [
        f"data.shards={shards}",
        f"train.steps={STEPS}",
        "train.global_batch_size=32",
        "train.ckpt_every=5",
        "train.log_every=1",
        "run.deterministic=true",
        "data.num_workers=2",
        "engine.timeout_s=60",  # generous: up to 4 ranks + 8 loader workers share 2 cores here
    ]


def launch(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def submit(root: Path, name: str, shards: Path, *extra: str, nodes: int = 2) -> str:
    code, out, err = launch(
        "--cluster",
        "local",
        "--config",
        str(TINY_MAE),
        "--nodes",
        str(nodes),
        "--name",
        name,
        f"run.root={root}",
        *common(shards),
        *extra,
    )
    assert code == 0, out + err
    m = re.search(r"^submitted job (\d+): run '" + name, out, flags=re.MULTILINE)
    assert m, out
    assert f"run dir:  {root / name}" in out and f"tail -f {root / name}/slurm/{m.group(1)}_0_log.out" in out
    return m.group(1)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") == kind]


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in records(run_dir) if "train/loss" in r), default=0)


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(
        int(d.name.split("_")[1])
        for d in (run_dir / "checkpoints").glob("step_*")
        if (d / "COMPLETE").exists()
    )


def final_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "exports" / f"step_{step:08d}" / "backbone.safetensors"))


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss; a step logged twice (replayed after a restart) keeps the last."""
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def assert_bitwise_equal(run_dir: Path, reference: Path) -> None:
    ref, got = losses(reference), losses(run_dir)
    diverged = [s for s in sorted(ref) if got.get(s) != ref[s]]
    corrupt = sum(r.get("data/corrupt", 0) for r in records(run_dir) if "train/loss" in r)
    detail = (
        f"first steps whose loss differs from the uninterrupted run: "
        f"{[(s, ref[s], got.get(s)) for s in diverged[:3]]}; starts {events(run_dir, 'start')}; "
        f"corrupt samples {corrupt}"
    )
    assert not diverged, detail
    a, b = final_weights(reference), final_weights(run_dir)
    assert a.keys() == b.keys() and len(a) > 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"final weights differ from the uninterrupted run in {different[:5]}; {detail}"


def wait_step(cluster, job_id: str, run_dir: Path, step: int, timeout: float = 150) -> int:
    def reached() -> int:
        state = cluster.sacct_state(job_id)
        assert state not in FINAL_STATES - {"COMPLETED"}, (
            f"job {job_id} ended {state}\n{logs(run_dir, job_id)}"
        )
        s = last_step(run_dir)
        return s if s >= step else 0

    return cluster.wait_for(reached, timeout=timeout, what=f"job {job_id} at step {step}", interval=0.2)


def attempts(cluster, job_id: str) -> list[str]:
    out = cluster.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"]).stdout.split("\n")
    return [line.split()[0] for line in out if line.strip()]


def sacct_times(cluster, job_id: str) -> tuple[str, str]:
    out = (
        cluster.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "Start,End"]).stdout.strip().splitlines()
    )
    start, end = out[-1].split("|")
    return start, end


def logs(run_dir: Path, job_id: str) -> str:
    parts = []
    for f in sorted((run_dir / "slurm").glob(f"{job_id}_*_log.*")):
        parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


def job_processes(job_id: str) -> list[dict]:
    """Processes of a job on this machine (their environment has SLURM_JOB_ID=<job_id>)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(
                e.split("=", 1)
                for e in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in e
            )
            if env.get("SLURM_JOB_ID") != job_id:
                continue
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parent = (Path("/proc") / str(ppid) / "comm").read_text().strip()
            comm = (d / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        found.append({"pid": int(d.name), "comm": comm, "parent": parent, "procid": env.get("SLURM_PROCID")})
    return found


@contextlib.contextmanager
def cancel_on_exit(cluster, *job_ids: str):
    try:
        yield
    finally:
        for jid in job_ids:
            cluster.run(["scancel", jid], check=False, timeout=30)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fmnist_shards) -> Path:
    """The uninterrupted run, as 2 local processes (`launch/slurm.py --local`)."""
    root = tmp_path_factory.mktemp("launch-ref")
    code, out, err = launch(
        "--local",
        "--nproc",
        "2",
        "--config",
        str(TINY_MAE),
        "--name",
        "reference",
        f"run.root={root}",
        *common(fmnist_shards),
    )
    assert code == 0, out + err
    return root / "reference"


@pytest.fixture(scope="module")
def time_limit_job(slurm_cluster, tmp_path_factory, fmnist_shards):
    """A run that only SLURM's time limit ends, submitted as early as the first SLURM test.

    1-minute limit, USR2 5 s before it (slurmctld checks limits every 30 s, so the signal comes
    25-55 s into an attempt), at most 1 time-limit requeue. Its attempts last as long as SLURM's
    clock says, so it runs beside the other tests; test_time_limit_... checks it at the end.
    """
    root = tmp_path_factory.mktemp("time-limit")
    jid = submit(
        root,
        "timeouts",
        fmnist_shards,
        "--time",
        "1",
        "--signal-delay",
        "5",
        "--max-timeouts",
        "1",
        "train.steps=100000",
        "train.ckpt_every=100000",
        "train.log_every=10",
    )
    yield jid, root / "timeouts"
    slurm_cluster.run(["scancel", jid], check=False, timeout=30)


@pytest.mark.slurm
def test_two_node_run_completes_submits_evals_and_resumes(
    slurm_cluster, time_limit_job, reference, tmp_path, fmnist_shards, capsys
):
    # (time_limit_job: only to submit it now, see its docstring)
    from launch import status

    run_dir = tmp_path / "plain"
    jid = submit(
        tmp_path, "plain", fmnist_shards, "--eval", "knn,linear", "--eval-args", "--data data/fmnist"
    )
    jobs = [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    evals = {j["protocol"]: j for j in jobs if j["kind"] == "eval"}
    with cancel_on_exit(slurm_cluster, jid, *(j["job_id"] for j in evals.values())):
        assert [j["job_id"] for j in jobs if j["kind"] == "pretrain"] == [jid] and sorted(evals) == [
            "knn",
            "linear",
        ]
        for protocol, job in evals.items():
            info = slurm_cluster.job_info(job["job_id"])
            assert info["Dependency"].startswith(f"afterok:{jid}"), info
            assert info["JobName"] == f"plain-eval-{protocol}"
            expected = [
                "-m",
                "evals.run",
                "--checkpoint",
                f"{run_dir}/exports/latest",
                "--protocol",
                protocol,
                "--data",
                "data/fmnist",
            ]
            assert job["command"][1:] == expected
            from submitit.core.utils import DelayedSubmission

            pickled = DelayedSubmission.load(run_dir / "slurm" / f"{job['job_id']}_submitted.pkl")
            assert pickled.function.command == job["command"]
        # A second job on the same run directory while the first is queued or running: refused.
        code, _, err = launch(
            "--cluster",
            "local",
            "--config",
            str(TINY_MAE),
            "--nodes",
            "2",
            "--name",
            "plain",
            f"run.root={tmp_path}",
            *common(fmnist_shards),
        )
        assert code == 2 and f"job {jid}" in err and "already training" in err

        slurm_cluster.wait_state(jid, "COMPLETED", timeout=240)
        assert attempts(slurm_cluster, jid) == ["COMPLETED"]
        assert [(e["step"], e["world_size"]) for e in events(run_dir, "start")] == [(0, 2)]
        assert (run_dir / "slurm" / f"{jid}_1_log.out").exists()  # rank 1 ran as its own task
        assert_bitwise_equal(run_dir, reference)  # a SLURM job trains what the local processes train
        # The rendezvous port: the launcher's choice, outside this machine's ephemeral port range.
        m = re.search(r"\(master (\S+):(\d+)\)", (run_dir / "slurm" / f"{jid}_0_log.out").read_text())
        assert m and int(m.group(2)) == master_port(jid, 0), m
        if (ephemeral := ephemeral_port_range()) is not None:
            assert not ephemeral[0] <= int(m.group(2)) <= ephemeral[1]

        capsys.readouterr()
        assert status.main([str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert f"job        {jid} COMPLETED, restarts 0" in out and f"checkpoint step {STEPS}/{STEPS}" in out
        assert re.search(rf"last log   step {STEPS}/{STEPS}: loss \d\.\d+, [\d.]+ img/s", out), out

        # The evals start only after pretraining succeeded (what they do then is issue 5's business).
        _, pretrain_end = sacct_times(slurm_cluster, jid)
        for job in evals.values():
            eid = job["job_id"]
            slurm_cluster.wait_for(
                lambda e=eid: sacct_times(slurm_cluster, e)[0] not in ("", "None", "Unknown"),
                timeout=120,
                what=f"eval job {eid} to start",
            )
            eval_start, _ = sacct_times(slurm_cluster, eid)
            assert eval_start >= pretrain_end, (eval_start, pretrain_end)
            slurm_cluster.run(["scancel", eid], check=False)

    # --eval on the finished run: only the eval job, on the final export, no dependency.
    code, out, err = launch(
        "--cluster",
        "local",
        "--config",
        str(TINY_MAE),
        "--nodes",
        "2",
        "--name",
        "plain",
        f"run.root={tmp_path}",
        *common(fmnist_shards),
        "--eval",
        "knn",
        "--eval-args",
        f"--train-data {fmnist_shards} --test-data {fmnist_shards}",
    )
    assert code == 0, out + err
    assert (
        f"run 'plain' is finished (export step {STEPS} >= train.steps={STEPS}): submitting its evals only"
        in out
    )
    jobs = [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [j["job_id"] for j in jobs if j["kind"] == "pretrain"] == [jid]  # no second training job
    knn = jobs[-1]
    assert knn["kind"] == "eval" and knn["after"] is None and f"job {knn['job_id']} (knn) submitted" in out
    assert knn["command"][3:5] == ["--checkpoint", f"{run_dir}/exports/step_{STEPS:08d}"]
    with cancel_on_exit(slurm_cluster, knn["job_id"]):
        assert slurm_cluster.job_info(knn["job_id"]).get("Dependency", "(null)") == "(null)"
        slurm_cluster.wait_state(knn["job_id"], "COMPLETED", timeout=180)
    capsys.readouterr()
    assert status.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"  evals      step {STEPS}: knn\S*: top1 \d+\.\d\d", out), out
    assert f"  eval job   {knn['job_id']} knn: COMPLETED" in out, out

    # Its checkpoints resume: the same name with more steps (a schedule change, allowed explicitly)
    # continues at step 40.
    jid2 = submit(tmp_path, "plain", fmnist_shards, "train.steps=45", "resume.allow_config_change=true")
    with cancel_on_exit(slurm_cluster, jid2):
        slurm_cluster.wait_state(jid2, "COMPLETED", timeout=180)
    starts = events(run_dir, "start")
    assert [(e["step"], e["resumed"]) for e in starts] == [(0, False), (STEPS, True)], starts
    assert complete_steps(run_dir)[-1] == 45 and (run_dir / "exports" / "step_00000045" / "COMPLETE").exists()


def test_local_two_processes(reference):
    starts = events(reference, "start")
    assert [(e["step"], e["world_size"]) for e in starts] == [(0, 2)]
    assert events(reference, "finished")[0]["step"] == STEPS
    ckpt = reference / "checkpoints" / f"step_{STEPS:08d}"
    assert (
        (ckpt / "COMPLETE").exists() and (ckpt / "__0_0.distcp").exists() and (ckpt / "__1_0.distcp").exists()
    )
    assert (reference / "exports" / "latest" / "backbone.safetensors").exists()


def preempt_with_usr2(cluster, job_id: str, run_dir: Path) -> int:
    """Past step 12, send USR2 to the job; return the step at which the ranks stopped, once its
    checkpoint is COMPLETE."""
    wait_step(cluster, job_id, run_dir, 12)
    cluster.run(["scancel", "--signal=USR2", job_id])
    stopped = cluster.wait_for(lambda: events(run_dir, "stopped"), timeout=60, what="the stop at a step")
    step = stopped[0]["step"]
    assert stopped[0]["reason"] == "SIGUSR2" and 12 <= step < STEPS
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists(), logs(run_dir, job_id)
    return step


@pytest.mark.slurm
def test_usr2_preemption_saves_on_all_ranks_requeues_once_and_resumes_bitwise(
    slurm_cluster, tmp_path, fmnist_shards, reference
):
    run_dir = tmp_path / "preempted"
    jid = submit(tmp_path, "preempted", fmnist_shards)
    with cancel_on_exit(slurm_cluster, jid):
        step = preempt_with_usr2(slurm_cluster, jid, run_dir)
        # All ranks saved that one step: a complete checkpoint with both ranks' shards.
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        assert (ckpt / "__0_0.distcp").exists() and (ckpt / "__1_0.distcp").exists()
        assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
        slurm_cluster.wait_state(jid, "COMPLETED", timeout=240)
    text = {r: (run_dir / "slurm" / f"{jid}_{r}_log.out").read_text() for r in (0, 1)}
    for r in (0, 1):
        assert f"stop requested (SIGUSR2): checkpoint saved at step {step}" in text[r], text[r]
    assert "rank 0 requeues the job" in text[1] and "handing over to submitit to requeue" in text[0]
    # Exactly one requeue, same job id, the next attempt resumed from the agreed step.
    assert attempts(slurm_cluster, jid) == ["REQUEUED", "COMPLETED"]
    assert slurm_cluster.job_info(jid).get("Restarts") == "1"
    assert [(e["step"], e["resumed"]) for e in events(run_dir, "start")] == [(0, False), (step, True)]
    assert len(events(run_dir, "stopped")) == 1
    assert_bitwise_equal(run_dir, reference)


@pytest.mark.slurm
def test_deepspeed_zero2_run_is_preempted_requeued_and_resumed_with_fsdp2s_losses(
    slurm_cluster, tmp_path, fmnist_shards, reference
):
    """The same launcher, requeue and resume path with engine.name=deepspeed: USR2 mid-run, DeepSpeed's
    files saved by both ranks into the agreed step, one requeue, the next attempt resumes there; every
    step's loss equals the FSDP2 reference run's (same maths: tests/test_engine_deepspeed.py)."""
    run_dir = tmp_path / "zero2"
    jid = submit(tmp_path, "zero2", fmnist_shards, "engine.name=deepspeed", "engine.deepspeed.zero_stage=2")
    with cancel_on_exit(slurm_cluster, jid):
        step = preempt_with_usr2(slurm_cluster, jid, run_dir)
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        assert all((ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").exists() for r in (0, 1))
        slurm_cluster.wait_state(jid, "COMPLETED", timeout=240)
    assert attempts(slurm_cluster, jid) == ["REQUEUED", "COMPLETED"]
    assert [(e["step"], e["resumed"]) for e in events(run_dir, "start")] == [(0, False), (step, True)]
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert all(abs(got[s] - ref[s]) < 1e-5 for s in ref), {s: (ref[s], got[s]) for s in ref}


def wait_gone_from_queue(cluster, job_id: str, timeout: float = 60) -> None:
    """Until squeue no longer lists the job (COMPLETING counts: the launcher refuses a second job then)."""

    def gone() -> bool:
        out = cluster.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], check=False).stdout
        return not any(line.split()[:1] == [job_id] for line in out.splitlines())

    cluster.wait_for(gone, timeout=timeout, what=f"job {job_id} to leave the queue")


def step_exit_codes(cluster, job_id: str) -> dict[str, str]:
    """ExitCode of each step of the job's last attempt (e.g. {'12.0': '3:0'})."""
    out = cluster.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,ExitCode"]).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if re.fullmatch(rf"{job_id}\.\d+\|.*", line))


@pytest.mark.slurm
def test_scancel_saves_on_all_ranks_stops_without_requeue_and_the_same_command_resumes_bitwise(
    slurm_cluster, tmp_path, fmnist_shards, reference, capsys
):
    """Plain `scancel` (SIGTERM to every process, SIGKILL KillWait=5 s later): save and stop."""
    from launch import status

    run_dir = tmp_path / "cancelled"
    jid = submit(tmp_path, "cancelled", fmnist_shards)
    with cancel_on_exit(slurm_cluster, jid):
        wait_step(slurm_cluster, jid, run_dir, 12)
        slurm_cluster.run(["scancel", jid])
        stopped = slurm_cluster.wait_for(
            lambda: events(run_dir, "stopped"), timeout=30, what="the stop at a step"
        )
        step = stopped[0]["step"]
        assert stopped[0]["reason"] == "SIGTERM" and 12 <= step < STEPS, stopped
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        assert (ckpt / "COMPLETE").exists(), logs(run_dir, jid)
        assert (ckpt / "__0_0.distcp").exists() and (ckpt / "__1_0.distcp").exists()
        slurm_cluster.wait_state(jid, "CANCELLED", timeout=60)
        wait_gone_from_queue(slurm_cluster, jid)
    slurm_cluster.wait_for(lambda: not job_processes(jid), timeout=15, what="no process of the job left")
    assert attempts(slurm_cluster, jid) == ["CANCELLED"]  # not requeued
    assert slurm_cluster.job_info(jid).get("Restarts") == "0"
    assert set(step_exit_codes(slurm_cluster, jid).values()) == {"3:0"}  # the ranks exited 3, not killed
    assert complete_steps(run_dir)[-1] == step and len(events(run_dir, "stopped")) == 1
    text = {f.name: f.read_text(errors="replace") for f in (run_dir / "slurm").glob(f"{jid}_*_log.*")}
    for r in (0, 1):
        assert f"stop requested (SIGTERM): checkpoint saved at step {step}" in text[f"{jid}_{r}_log.out"]
    assert (
        "stopped by SIGTERM" in text[f"{jid}_0_log.out"]
        and "does not requeue itself" in text[f"{jid}_0_log.out"]
    )
    for name, t in text.items():
        assert "Traceback" not in t and "is killed by signal" not in t, f"{name}:\n{t[-3000:]}"
    capsys.readouterr()
    assert status.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^  why        CANCELLED, exit code \S+: .*(JOB|STEP) \S+ ON \S+ CANCELLED AT", out, re.M
    ), out
    assert "1 stop(s) on request" in out and f"checkpoint step {step}/{STEPS}" in out, out

    # The same launch command continues the run from the saved step, to the uninterrupted result.
    jid2 = submit(tmp_path, "cancelled", fmnist_shards)
    with cancel_on_exit(slurm_cluster, jid2):
        slurm_cluster.wait_state(jid2, "COMPLETED", timeout=240)
    assert [(e["step"], e["resumed"]) for e in events(run_dir, "start")] == [(0, False), (step, True)]
    assert_bitwise_equal(run_dir, reference)


@pytest.mark.slurm
def test_scontrol_requeue_saves_then_sigkilled_rank_resumes_from_periodic_checkpoint(
    slurm_cluster, tmp_path, fmnist_shards, reference, capsys
):
    """One job, three attempts: `scontrol requeue` (SIGTERM), then one rank SIGKILLed, then completion."""
    from launch import status

    timeout_s = 30  # collective timeout of this job (resume-safe key; the maths do not depend on it)
    run_dir = tmp_path / "requeued"
    jid = submit(tmp_path, "requeued", fmnist_shards, f"engine.timeout_s={timeout_s}")
    with cancel_on_exit(slurm_cluster, jid):
        # 1. scontrol requeue: SLURM sends SIGTERM (SIGKILL KillWait later), as for scancel: the ranks
        #    save the next step and exit; SLURM restarts the job (same id), which resumes there.
        wait_step(slurm_cluster, jid, run_dir, 8)
        slurm_cluster.run(["scontrol", "requeue", jid])
        stopped = slurm_cluster.wait_for(
            lambda: events(run_dir, "stopped"), timeout=30, what="the stop at a step"
        )
        saved = stopped[0]["step"]
        assert stopped[0]["reason"] == "SIGTERM" and saved >= 8, stopped
        slurm_cluster.wait_for(
            lambda: slurm_cluster.job_info(jid).get("JobState") != "RUNNING",
            timeout=30,
            what="the attempt to end",
        )
        assert complete_steps(run_dir)[-1] == saved
        # 2. One rank SIGKILLed in the next attempt: the job ends within the collective timeout + a
        #    margin (srun --kill-on-bad-exit ends it at once), and no process of it is left. Nothing
        #    is saved on the way out: the next attempt resumes from the last periodic checkpoint.
        wait_step(slurm_cluster, jid, run_dir, saved + 12)
        ranks = [p for p in job_processes(jid) if p["procid"] == "1" and p["parent"] == "slurmstepd"]
        assert len(ranks) == 1, job_processes(jid)
        t0 = time.monotonic()
        os.kill(ranks[0]["pid"], signal.SIGKILL)
        state = slurm_cluster.wait_for(
            lambda: (s := slurm_cluster.sacct_state(jid)) in FINAL_STATES and s,
            timeout=timeout_s + 30,
            what="the job to end after a rank was killed",
        )
        ended = time.monotonic() - t0
        assert state == "FAILED" and ended < timeout_s + 15, (state, ended)
        slurm_cluster.wait_for(lambda: not job_processes(jid), timeout=15, what="no process of the job left")
        periodic = complete_steps(run_dir)[-1]
        assert periodic > saved and periodic % 5 == 0
        # status says why the job failed: sacct's state and exit code, and the error line of its logs.
        capsys.readouterr()
        assert status.main([str(run_dir)]) == 0
        out = capsys.readouterr().out
        # (the rank that was killed, not what the other rank said after it)
        assert re.search(
            r"^  why        FAILED, exit code \d+:\d+: srun: error: \S+: task 1: Killed", out, re.M
        ), out
        # 3. The next attempt of the same job (same id, same run directory) resumes and finishes.
        slurm_cluster.run(["scontrol", "requeue", jid])
        slurm_cluster.wait_state(jid, "COMPLETED", timeout=240)
    assert attempts(slurm_cluster, jid) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    starts = [(e["step"], e["resumed"]) for e in events(run_dir, "start")]
    assert starts == [(0, False), (saved, True), (periodic, True)], starts
    assert len(events(run_dir, "stopped")) == 1
    logs_out = sorted(p.name for p in (run_dir / "slurm").glob(f"{jid}_*_log.out"))
    assert logs_out == [f"{jid}_0_log.out", f"{jid}_1_log.out"]  # every attempt appends to the same logs
    assert_bitwise_equal(run_dir, reference)


@pytest.mark.slurm
def test_time_limit_requeues_at_most_max_timeouts_then_fails_with_checkpoint(slurm_cluster, time_limit_job):
    jid, run_dir = time_limit_job
    slurm_cluster.wait_state(jid, "FAILED", timeout=300)
    history = attempts(slurm_cluster, jid)
    assert history == ["REQUEUED", "FAILED"], history  # max_timeouts=1: one requeue, then the end
    stops = events(run_dir, "stopped")
    # Each attempt saves on the signal. (An attempt whose signal came before its trainer took over the
    # signal -- a very slow start -- ends in submitit's own handler without training: no stop event.)
    assert 1 <= len(stops) <= 2 and {s["reason"] for s in stops} == {"SIGUSR2"}, stops
    assert [s["step"] for s in events(run_dir, "start")][: len(stops)] == [0, stops[0]["step"]][: len(stops)]
    assert sorted(s["step"] for s in stops) == [s["step"] for s in stops]
    last = stops[-1]["step"]
    assert complete_steps(run_dir)[-1] == last  # the newest checkpoint is the last save on a signal
    ckpt = run_dir / "checkpoints" / f"step_{last:08d}"
    assert (
        (ckpt / "COMPLETE").exists() and (ckpt / "__0_0.distcp").exists() and (ckpt / "__1_0.distcp").exists()
    )
    err = (run_dir / "slurm" / f"{jid}_0_log.err").read_text()
    assert "timed-out too many times" in err

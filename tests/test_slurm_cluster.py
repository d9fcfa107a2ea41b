"""Tests on the real single-machine SLURM cluster (fixture `slurm_cluster`, tests/slurm_cluster.py).

Every wait is bounded; the whole file takes well under a minute or two on 2 cores.
"""

from __future__ import annotations

import time

import pytest

from tests.components import require_module

pytestmark = pytest.mark.slurm


def test_cluster_is_healthy_and_start_is_idempotent(slurm_cluster):
    status = slurm_cluster.run(["bash", str(slurm_cluster.script), "status"], timeout=60)
    assert "healthy" in status.stdout
    env = slurm_cluster.run(["bash", str(slurm_cluster.script), "env"], timeout=30).stdout
    assert f"export SLURM_CONF={slurm_cluster.conf}" in env
    assert len(slurm_cluster.nodes) >= 2, "the tests need at least 2 nodes"
    if slurm_cluster.started_here:  # we are root: starting again must be a no-op
        t0 = time.monotonic()
        again = slurm_cluster.run(["bash", str(slurm_cluster.script), "start"], timeout=60)
        assert "already running and healthy" in again.stdout
        assert time.monotonic() - t0 < 30


def test_srun_spans_two_nodes(slurm_cluster):
    proc = slurm_cluster.run(
        [
            "srun",
            "-p",
            slurm_cluster.partition,
            "-N2",
            "--ntasks-per-node=1",
            "-t",
            "1",
            "--label",
            "bash",
            "-c",
            'echo "$SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS"',
        ],
        timeout=60,
    )
    rows = sorted(line.split(":", 1)[1].split() for line in proc.stdout.strip().splitlines())
    assert [r[1:] for r in rows] == [["0", "2"], ["1", "2"]], proc.stdout
    nodes = {r[0] for r in rows}
    assert len(nodes) == 2 and nodes <= set(slurm_cluster.nodes), proc.stdout


def test_sbatch_job_is_completed_in_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch(
        "-p",
        slurm_cluster.partition,
        "-N1",
        "-t",
        "1",
        "-J",
        "sacct-check",
        "-o",
        str(out),
        "--wrap",
        'echo "hello from $SLURMD_NODENAME job $SLURM_JOB_ID"',
    )
    assert slurm_cluster.wait_state(job_id, "COMPLETED", timeout=60) == "COMPLETED"
    expected = [job_id, "sacct-check", slurm_cluster.partition, "COMPLETED", "0:0"]

    def complete_sacct_row() -> list[str]:
        out = slurm_cluster.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,JobName,Partition,State,ExitCode,NodeList"]
        ).stdout.strip()
        row = out.splitlines()[-1].split("|") if out else []
        return row if row[:5] == expected else []

    # slurmctld sends the job's records to slurmdbd asynchronously: for a moment after the job
    # ends, sacct can show a partial row (JobName 'allocation', no partition).
    row = slurm_cluster.wait_for(complete_sacct_row, timeout=30, what=f"a complete sacct row {expected}")
    assert row[5] in slurm_cluster.nodes, row
    assert slurm_cluster.wait_for(out.exists, timeout=10, what=f"{out}")
    assert f"job {job_id}" in out.read_text() and "hello from node" in out.read_text()


def test_submitit_two_node_job_reports_ranks(slurm_cluster, tmp_path):
    submitit = require_module("submitit", "pip install -r requirements.txt")

    def report() -> dict:  # a local function: cloudpickle ships it by value
        import os

        import submitit

        env = submitit.JobEnvironment()
        return {
            "global_rank": env.global_rank,
            "world_size": env.num_tasks,
            "local_rank": env.local_rank,
            "node": env.node,
            "nodename": os.environ.get("SLURMD_NODENAME"),
            "job_id": env.job_id,
        }

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5, slurm_partition=slurm_cluster.partition
    )
    job = executor.submit(report)
    try:
        slurm_cluster.wait_for(job.done, timeout=120, what=f"submitit job {job.job_id}", interval=1)
    except AssertionError:
        job.cancel(check=False)
        raise AssertionError(f"{job.job_id}: {job.stdout()}\n{job.stderr()}") from None
    results = job.results()
    assert sorted(r["global_rank"] for r in results) == [0, 1], results
    assert {r["world_size"] for r in results} == {2}, results
    assert {r["local_rank"] for r in results} == {0}, results
    assert sorted(r["node"] for r in results) == [0, 1], results
    assert len({r["nodename"] for r in results}) == 2, results
    assert {r["job_id"] for r in results} == {job.job_id}, results
    assert slurm_cluster.wait_state(job.job_id, "COMPLETED", timeout=30) == "COMPLETED"


REQUEUE_SCRIPT = """#!/bin/bash
echo "start restart=${SLURM_RESTART_COUNT:-0} node=$SLURMD_NODENAME"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo resumed; exit 0; fi
sleep 300
"""


def test_scontrol_requeue_restarts_running_job(slurm_cluster, tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_SCRIPT)
    out = tmp_path / "requeue.out"
    job_id = slurm_cluster.sbatch(
        "-p",
        slurm_cluster.partition,
        "-N1",
        "-t",
        "5",
        "-J",
        "requeue-check",
        "--requeue",
        "--open-mode=append",
        "-o",
        str(out),
        str(script),
    )
    try:
        slurm_cluster.wait_for(
            lambda: out.exists() and "restart=0" in out.read_text(), timeout=60, what=f"job {job_id} running"
        )
        assert slurm_cluster.job_info(job_id).get("JobState") == "RUNNING"
        slurm_cluster.run(["scontrol", "requeue", job_id], timeout=30)
        slurm_cluster.wait_state(job_id, "COMPLETED", timeout=120)
        info = slurm_cluster.job_info(job_id)
        assert info.get("Restarts") == "1", info
        text = out.read_text()
        assert "restart=0" in text and "restart=1" in text and "resumed" in text, text
        history = slurm_cluster.run(
            ["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"]
        ).stdout.split()
        assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    finally:
        slurm_cluster.run(["scancel", job_id], check=False, timeout=30)

"""launch/: flags -> SLURM parameters, cluster profiles, --dry-run, bad input (exit 2, nothing submitted).

No cluster needed, except the unknown-partition case (marked slurm: it asks the real sinfo).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals.submit import eval_job_parameters
from launch import slurm as cli
from launch.cluster_profile import ClusterProfile, LaunchError, load_profile, parse_time_minutes
from launch.local import combine_exit_codes, rank_env
from launch.plan import (
    estimate,
    eval_protocols,
    recipe_for_method,
    sbatch_preview,
)
from tests.conftest import ROOT, TINY_MAE

PAPER_MAE = ROOT / "configs" / "mae" / "vit_l16_in1k.yaml"


def plan_for(*argv: str):
    args = cli.parser().parse_intermixed_args(list(argv))
    plan, _ = cli.build_plan(args)
    return plan


@pytest.fixture
def no_submit(monkeypatch):
    """Fail the test if anything tries to submit."""

    def boom(plan, argv):
        raise AssertionError("submitted although the input was bad")

    monkeypatch.setattr(cli, "submit", boom)


@pytest.fixture
def no_slurm(monkeypatch, tmp_path_factory):
    """A PATH without SLURM's commands (the interpreter is called by absolute path)."""
    empty = tmp_path_factory.mktemp("empty-bin")
    monkeypatch.setenv("PATH", str(empty))


# ---------------------------------------------------------------- flags -> SLURM parameters
def test_paper_recipe_on_builtin_profile_one_task_per_gpu(no_slurm):
    plan = plan_for("--method", "mae", "--nodes", "8")
    assert plan.recipe == PAPER_MAE
    assert plan.world_size == 64 and plan.cfg.model.name == "vit_large_patch16"
    p = plan.slurm
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"]) == (8, 8, 8)
    assert p["job_name"] == "mae_vit_l16_in1k"  # the run name
    assert p["time"] == 3 * 24 * 60 and p["signal_delay_s"] == 120
    assert p["additional_parameters"]["requeue"] is True
    assert p["srun_args"] == ["--kill-on-bad-exit=1"]
    assert any(line.startswith(f"export PYTHONPATH={ROOT}") for line in p["setup"])
    assert "partition" not in p  # the cluster's default
    assert plan.run_dir == Path("runs") / "mae_vit_l16_in1k"


def test_flags_override_profile():
    plan = plan_for(
        "--cluster",
        "local",
        "--config",
        str(TINY_MAE),
        "--nodes",
        "4",
        "--gpus-per-node",
        "4",
        "--cpus-per-task",
        "6",
        "--mem",
        "100G",
        "--time",
        "2-00:00:00",
        "--partition",
        "p1",
        "--account",
        "acc",
        "--qos",
        "high",
        "--constraint",
        "h100",
        "--signal-delay",
        "200",
        "--max-timeouts",
        "7",
        "--max-requeues",
        "9",
        "--name",
        "r1",
        "train.global_batch_size=64",
    )
    p = plan.slurm
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (4, 4, 4, 6)
    assert (p["mem"], p["time"], p["partition"], p["account"], p["qos"], p["constraint"]) == (
        "100G",
        2880,
        "p1",
        "acc",
        "high",
        "h100",
    )
    assert p["signal_delay_s"] == 200 and p["job_name"] == "r1"
    assert (plan.profile.max_timeouts, plan.profile.max_requeues) == (7, 9)
    assert plan.world_size == 16 and plan.cfg.run.name == "r1"
    assert "export OMP_NUM_THREADS=1" in p["setup"]  # from the profile's env


def test_local_profile_cpu_nodes():
    plan = plan_for("--cluster", "local", "--config", str(TINY_MAE), "--nodes", "2")
    p = plan.slurm
    assert (p["nodes"], p["ntasks_per_node"], p["cpus_per_task"], p["partition"]) == (2, 1, 1, "debug")
    assert "gpus_per_node" not in p and plan.world_size == 2
    plan = plan_for("--cluster", "local", "--config", str(TINY_MAE), "--nodes", "2", "--tasks-per-node", "2")
    assert plan.slurm["ntasks_per_node"] == 2 and plan.world_size == 4
    lines = sbatch_preview(plan.slurm, Path("/r/slurm"))
    for expected in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --signal=USR2@30",
        "#SBATCH --requeue",
        "#SBATCH --partition=debug",
        "#SBATCH --output=/r/slurm/%j_0_log.out",
    ):
        assert expected in lines, lines
    assert any("srun" in line and "--kill-on-bad-exit=1" in line for line in lines)


def test_eval_parameters_depend_on_pretraining():
    profile = ClusterProfile(partition="gpu", gpus_per_node=8)
    p = eval_job_parameters(profile, "run-eval-knn", dependency="afterok:123")
    assert p["dependency"] == "afterok:123" and p["additional_parameters"]["kill-on-invalid-dep"] == "yes"
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["partition"]) == (1, 1, 1, "gpu")
    assert eval_protocols("knn, linear") == ["knn", "linear"]
    with pytest.raises(LaunchError, match="named twice"):
        eval_protocols("knn,knn")


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("1:30", 2), ("01:30:00", 90), ("2-00:00:00", 2880), ("1-12", 2160), ("0-00:00:30", 1)],
)
def test_time_parsing(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["0", "abc", "1h", "", "-5"])
def test_bad_time(text):
    with pytest.raises(LaunchError, match="time"):
        parse_time_minutes(text)


def test_profile_unknown_key_and_bad_value(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("partiton: gpu\n")
    with pytest.raises(LaunchError, match="unknown key 'partiton'; did you mean 'partition'"):
        load_profile(str(bad))
    bad.write_text("gpus_per_node: eight\n")
    with pytest.raises(LaunchError, match="'gpus_per_node' must be an integer"):
        load_profile(str(bad))
    with pytest.raises(LaunchError, match="did you mean 'local'"):
        load_profile("locall")
    profile, source = load_profile("example_h100")
    assert profile.gpus_per_node == 8 and source.endswith("example_h100.yaml")


def test_method_index_is_data():
    assert recipe_for_method("mae") == PAPER_MAE
    with pytest.raises(LaunchError, match="did you mean 'mae'"):
        recipe_for_method("maee")


def test_gpu_hours_estimate():
    est = estimate(
        flops_per_sample=1e9, steps=1000, global_batch=100, world_size=10, peak_tflops=100, mfu=0.5
    )
    assert est.total_flops == 1e14
    assert est.wall_hours == pytest.approx(1e14 / (10 * 100e12 * 0.5) / 3600)
    assert est.gpu_hours == pytest.approx(est.wall_hours * 10)


def test_local_env_contract_and_exit_codes():
    env = rank_env(1, 2, 12345, base={})
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "12345",
    }
    assert (
        combine_exit_codes([0, 0]) == 0
        and combine_exit_codes([3, 3]) == 3
        and combine_exit_codes([0, 3]) == 3
    )
    assert combine_exit_codes([2, 1]) == 2 and combine_exit_codes([0, -9]) == 1


# ---------------------------------------------------------------- --dry-run
def test_dry_run_prints_plan_and_submits_nothing(tmp_path, no_slurm, no_submit, capsys):
    from pretrain.config import load_config
    from pretrain.methods import build_method

    code = cli.main(["--method", "mae", "--nodes", "8", f"run.root={tmp_path}", "--mfu", "0.5", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "model:\n  name: vit_large_patch16" in out  # the resolved config
    for line in (
        "#SBATCH --nodes=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=4320",
        "#SBATCH --requeue",
    ):
        assert line in out
    assert re.search(r"world size:\s+64 rank\(s\) = 8 node\(s\) x 8 task\(s\)", out)
    assert re.search(r"global batch:\s+4096 \(64 per rank", out)
    assert re.search(r"steps:\s+249600", out)
    assert "50% MFU of 989 TFLOP/s" in out
    cfg = load_config(PAPER_MAE, [f"run.root={tmp_path}"], world_size=64)
    import torch

    with torch.device("meta"):
        fps = build_method(cfg).flops_per_sample()
    gpu_hours = 249600 * 4096 * fps / (989e12 * 0.5) / 3600
    assert f"GPU-hours:    {gpu_hours:,.4g}" in out, out[-600:]
    assert "nothing submitted" in out
    assert list(tmp_path.iterdir()) == []  # no run directory, no submitit folder


def test_dry_run_as_a_script(tmp_path):
    """`python launch/slurm.py` (not -m) imports the repository, prints, exits 0."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "slurm.py"),
            "--cluster",
            "local",
            "--config",
            str(TINY_MAE),
            "--nodes",
            "2",
            "--name",
            "dry",
            f"run.root={tmp_path}",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --job-name=dry" in proc.stdout and "world size:   2 rank(s)" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_help_explains_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--method mae --nodes 8",
        "--dry-run",
        "--local",
        "--eval",
        "--cluster",
        "--max-timeouts",
        "scancel --signal=USR2",
        "key=value",
    ):
        assert text in out


# ---------------------------------------------------------------- bad input: exit 2, nothing submitted
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "mae", "--nodes", "0"], "--nodes 0: need at least 1 node"),
        (["--method", "maee", "--nodes", "1"], "unknown method; did you mean 'mae'"),
        (["--config", str(TINY_MAE), "train.stpes=5"], "did you mean 'train.steps'"),
        (
            ["--config", str(TINY_MAE), "--cluster", "local", "--nodes", "3", "train.global_batch_size=32"],
            r"global_batch_size=32 must be a positive multiple of world_size \(3\)",
        ),
        (["--config", "configs/mae/nope.yaml"], "config file not found"),
        (["--config", str(TINY_MAE), "--cluster", "nosuchsite"], "no profile"),
        (["--config", str(TINY_MAE), "--time", "soon"], "time 'soon'"),
        (
            ["--config", str(TINY_MAE), "--local", "--nproc", "2", "--eval", "knn"],
            "--eval submits SLURM jobs",
        ),
        (["--nodes", "1"], "--method NAME"),
    ],
)
def test_bad_input_exit_2(argv, message, tmp_path, no_submit, capsys):
    code = cli.main([*argv, f"run.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_slurm_not_installed_suggests_local_and_dry_run(tmp_path, no_slurm, no_submit, capsys):
    code = cli.main(["--config", str(TINY_MAE), "--nodes", "2", f"run.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "SLURM is not installed" in err and "--local" in err and "--dry-run" in err
    assert list(tmp_path.iterdir()) == []


def test_conflicting_run_config_refused_before_submitting(tmp_path, no_slurm, no_submit, capsys):
    from pretrain.config import load_config, write_or_check_run_config

    cfg = load_config(TINY_MAE, ["run.name=r", f"run.root={tmp_path}"])
    write_or_check_run_config(cfg, tmp_path / "r", None)
    code = cli.main(
        [
            "--config",
            str(TINY_MAE),
            "--name",
            "r",
            f"run.root={tmp_path}",
            "method.mask_ratio=0.5",
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "started with a different config" in err and "method.mask_ratio" in err


@pytest.mark.slurm
def test_unknown_partition_exit_2(slurm_cluster, tmp_path, no_submit, capsys):
    code = cli.main(
        [
            "--cluster",
            "local",
            "--config",
            str(TINY_MAE),
            "--nodes",
            "2",
            "--partition",
            "debugg",
            "--name",
            "badpart",
            f"run.root={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "sinfo does not know this partition; did you mean 'debug'" in err
    assert list(tmp_path.iterdir()) == []
    queued = slurm_cluster.run(["squeue", "-h", "-n", "badpart", "-o", "%i"]).stdout.strip()
    assert queued == ""


def test_status_of_a_local_run_directory(tmp_path, capsys):
    from launch import status

    run = tmp_path / "r"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "COMPLETE").write_text("{}")
    (run / "checkpoints" / "step_00000015").mkdir()  # partial: not counted
    (run / "config.yaml").write_text("train:\n  steps: 20\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"event": "start", "step": 0, "time": 1.0})
        + "\n"
        + json.dumps({"step": 12, "time": 2.0, "train/loss": 0.5, "perf/images_per_s": 100.0})
        + "\n"
        + '{"step": 13, "tra'  # a half-written line
    )
    assert status.main([str(run), "--no-slurm"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 10/20" in out and "step 12/20: loss 0.5000, 100.0 img/s" in out
    assert status.main(["--root", str(tmp_path), "missing"]) == 2


@pytest.mark.parametrize(
    ("visible", "local_rank", "expected"),
    [
        (None, 3, "3"),
        ("", 1, "1"),
        ("2", 0, "2"),
        ("4,5,6,7", 2, "6"),
        ("0,1,2,3,4,5,6,7", 7, "7"),
        ("0,1", 3, None),
    ],
)
def test_gpu_binding_per_task(visible, local_rank, expected):
    from launch.jobs import gpu_for_rank

    assert (
        gpu_for_rank(visible, local_rank, 4 if expected is not None and visible == "4,5,6,7" else 8)
        == expected
    )


# ---------------------------------------------------------------- MASTER_PORT of a SLURM job
@pytest.mark.parametrize("ephemeral", [(32768, 60999), (49152, 65535), (1024, 65000), (40000, 45000)])
def test_master_port_is_outside_the_ephemeral_range_and_new_per_attempt(ephemeral):
    from launch.jobs import master_port

    ports = {(j, r): master_port(str(j), r, ephemeral) for j in range(1, 301) for r in range(3)}
    low, high = ephemeral
    assert all(not low <= p <= high and 20000 <= p <= 65535 for p in ports.values()), ephemeral
    # A pure function of what every rank knows: the same job and attempt give the same port.
    assert all(master_port(str(j), r, ephemeral) == p for (j, r), p in list(ports.items())[:20])
    # Jobs spread over the allowed ports (as a uniform draw would); a requeued attempt does not reuse
    # its predecessor's port.
    allowed = max(0, low - 20000) + (65535 - max(high, 19999))
    uniform = allowed * (1 - (1 - 1 / allowed) ** 300)  # expected distinct ports of 300 uniform draws
    assert len({p for (j, r), p in ports.items() if r == 0}) >= 0.9 * uniform
    assert sum(ports[(j, 0)] != ports[(j, 1)] for j in range(1, 301)) >= 295


def test_master_port_range_read_from_proc_with_fallback(tmp_path):
    import random

    from launch.jobs import MASTER_PORT_FALLBACK, ephemeral_port_range, master_port

    f = tmp_path / "ip_local_port_range"
    f.write_text("32768\t60999\n")
    assert ephemeral_port_range(f) == (32768, 60999)
    for bad in ("", "60999 32768", "a b"):
        f.write_text(bad)
        assert ephemeral_port_range(f) is None
    assert ephemeral_port_range(tmp_path / "missing") is None
    low, high = MASTER_PORT_FALLBACK
    assert all(low <= master_port(str(j), 0, (1024, 65535)) <= high for j in range(100))  # no room
    if (system := ephemeral_port_range()) is not None:  # this machine's own range
        assert not system[0] <= master_port("12345", 0) <= system[1]
    # Why: submitit's own choice, Random(job id).randint(20000, 60000), falls into Linux's default
    # ephemeral range for most job ids, where an outgoing connection may already hold the port.
    inside = sum(32768 <= random.Random(str(j)).randint(20000, 60000) <= 60999 for j in range(1, 301))
    assert inside > 200


# ---------------------------------------------------------------- config typos: exit 2 on every path
CONFIG_TYPOS = [
    ("model.name=vit_gigantic", "model.name"),
    ("data.backend=foo", "data.backend"),
    ("model.num_heads=5", "model.num_heads"),
    ("data.worker_priority=low", "data.worker_priority"),
]
LAUNCH_PATHS = {
    "dry-run": ["--cluster", "local", "--nodes", "2", "--dry-run"],
    "submit": ["--cluster", "local", "--nodes", "2"],
    "local": ["--local", "--nproc", "2"],
    "eval": ["--cluster", "local", "--nodes", "2", "--eval", "knn"],
}


@pytest.mark.parametrize("path", list(LAUNCH_PATHS))
@pytest.mark.parametrize(("typo", "key"), CONFIG_TYPOS)
def test_config_typo_exit_2_on_every_launch_path(typo, key, path, tmp_path, no_submit, monkeypatch, capsys):
    import launch.local

    def no_local_run(*args, **kwargs):
        raise AssertionError("started a local run although the config was bad")

    monkeypatch.setattr(launch.local, "run_local", no_local_run)
    code = cli.main(
        ["--config", str(TINY_MAE), *LAUNCH_PATHS[path], "--name", "typo", f"run.root={tmp_path}", typo]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and key in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- --eval on a finished run
def _finished_run(root: Path, name: str, step: int) -> Path:
    run = root / name
    export = run / "exports" / f"step_{step:08d}"
    export.mkdir(parents=True)
    (export / "COMPLETE").write_text("{}")
    (run / "exports" / f"step_{step + 5:08d}").mkdir()  # a cut-short export (no COMPLETE): not counted
    return run


def test_finished_run_is_the_newest_complete_export_at_train_steps(tmp_path):
    from launch.plan import complete_steps, finished_step

    run = _finished_run(tmp_path, "r", 40)
    (run / "exports" / "step_00000020").mkdir()
    (run / "exports" / "step_00000020" / "COMPLETE").write_text("{}")
    assert complete_steps(run / "exports") == [20, 40]
    assert finished_step(run, 40) == 40 and finished_step(run, 30) == 40
    assert finished_step(run, 41) is None and finished_step(tmp_path / "none", 1) is None


def test_eval_on_a_finished_run_plans_only_the_eval_jobs(tmp_path, no_slurm, no_submit, capsys):
    _finished_run(tmp_path, "fin", 40)
    base = ["--cluster", "local", "--config", str(TINY_MAE), "--nodes", "2", "--name", "fin"]
    code = cli.main([*base, f"run.root={tmp_path}", "train.steps=40", "--eval", "knn,linear", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "is finished (export step 40 >= train.steps=40): no training job; eval jobs only" in out
    assert f"knn, linear on {tmp_path}/fin/exports/step_00000040" in out
    assert "#SBATCH --nodes=2" not in out and "GPU-hours" not in out
    # More steps than the export: training first, the evals after it.
    code = cli.main([*base, f"run.root={tmp_path}", "train.steps=50", "--eval", "knn", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "#SBATCH --nodes=2" in out and "knn (after pretraining succeeds)" in out
    assert "eval jobs only" not in out


def test_eval_job_without_a_training_job_has_no_dependency():
    p = eval_job_parameters(ClusterProfile(partition="gpu", gpus_per_node=8), "run-eval-knn")
    assert "dependency" not in p and "kill-on-invalid-dep" not in p["additional_parameters"]
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"]) == (1, 1, 1)


# ---------------------------------------------------------------- status: eval results, why a job failed
def test_status_shows_evaluations_of_the_newest_step(tmp_path, capsys):
    from launch import status

    run = tmp_path / "r"
    knn = {"protocol": "knn", "implementation": "knn", "settings": {"knn": {"temperature": 0.07}}}
    for step, top1 in ((20, 50.0), (40, 66.5)):
        d = run / "evals" / f"step_{step:08d}"
        d.mkdir(parents=True)
        payload = {**knn, "checkpoint": {"step": step, "encoder": "pretrained"}, "details": {"report_k": 20}}
        (d / "knn-0a1b2c3d.json").write_text(json.dumps({**payload, "metrics": {"top1": top1, "top5": 98.0}}))
    d = run / "evals" / "step_00000040"
    (d / "broken.json").write_text('{"metr')  # half-written: not a result
    (d / "linear-1b2c3d4e.failed.json").write_text(
        json.dumps({"exit_code": 2, "log_tail": "loading\nerror: --data: no test/ shards"})
    )
    assert status.main([str(run), "--no-slurm"]) == 0
    out = capsys.readouterr().out
    assert "  evals      step 40: knn-0a1b2c3d: top1 66.50, top5 98.00  (k=20, T=0.07)" in out, out
    assert "step 40: linear-1b2c3d4e: failed (exit code 2: error: --data: no test/ shards)" in out, out
    assert "evaluations at 1 earlier step(s)" in out and "50.00" not in out
    assert status.main([str(run), "--no-slurm", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["evals"]
    assert [(r["step"], r["name"], r["state"], r["value"]) for r in listed] == [
        (20, "knn-0a1b2c3d", "done", 50.0),
        (40, "knn-0a1b2c3d", "done", 66.5),
        (40, "linear-1b2c3d4e", "failed", None),
    ]


SUBMITIT_ERR_LOG = """\
launch: job 12 attempt 1 rank 0 started
Traceback (most recent call last):
RuntimeError: an error of the first attempt
launch: job 12 attempt 2 rank 0 started
submitit WARNING (2026-01-01 10:00:00,000) - Bypassing signal SIGCONT
10:00:05 [rank0] ERROR pretrain.train: an earlier logged error
submitit ERROR (2026-01-01 10:00:09,000) - Submitted job triggered an exception
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
    raise JobFailed(f"{type(e).__name__}: {e}") from None
launch.jobs.JobFailed: ConfigError: data.shards=/nope: no shards found
srun: error: node1: task 0: Exited with exit code 1
"""
SRUN_ERR_LOG = """\
launch: job 12 attempt 1 rank 0 started
srun: error: node2: task 1: Exited with exit code 3
launch: job 12 attempt 2 rank 0 started
srun: error: node2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=12.0
slurmstepd-node1: error: *** STEP 12.0 ON node1 CANCELLED AT 2026-01-01T10:00:10 ***
srun: error: node1: task 0: Killed
srun: Force Terminated StepId=12.0
"""


def test_last_error_line_of_a_jobs_last_attempt(tmp_path):
    from launch.status import last_error_line

    err0, out0, err1 = tmp_path / "12_0_log.err", tmp_path / "12_0_log.out", tmp_path / "12_1_log.err"
    err0.write_text(SUBMITIT_ERR_LOG)
    out0.write_text("10:00:01 [rank0] INFO launch: job 12 attempt 2: rank 0/2 on node1\n")
    err1.write_text("slurmstepd: error: *** STEP 12.0 ON node2 CANCELLED AT 2026-01-01T10:00:10 ***\n")
    assert (
        last_error_line([err0, out0, err1])
        == "launch.jobs.JobFailed: ConfigError: data.shards=/nope: no shards found"
    )
    err0.write_text("\n".join(SUBMITIT_ERR_LOG.splitlines()[:6]))  # no traceback: the logged ERROR
    assert (
        last_error_line([err0, out0, err1])
        == "10:00:05 [rank0] ERROR pretrain.train: an earlier logged error"
    )
    err0.write_text(SRUN_ERR_LOG)  # the task that failed first, in this attempt
    assert last_error_line([err0, out0, err1]) == "srun: error: node2: task 1: Killed"
    cancelled = "slurmstepd-node1: error: *** STEP 12.0 ON node1 CANCELLED AT 2026-01-01T10:00:10 ***"
    assert last_error_line([err0, out0, err1], slurm_first=True) == cancelled  # a job SLURM ended
    # The killed task is the cause; what rank 0 said then (torch prefixes its lines) follows it.
    err0.write_text(
        SRUN_ERR_LOG.replace(
            "srun: error: node1: task 0: Killed\n",
            "[rank0]: Traceback (most recent call last):\n[rank0]:   File 'x.py', line 1\n"
            "[rank0]: RuntimeError: Connection reset by peer\nsrun: error: node1: task 0: Killed\n",
        )
    )
    assert last_error_line([err0, out0]) == (
        "srun: error: node2: task 1: Killed; then: RuntimeError: Connection reset by peer"
    )
    err0.write_text("")  # only SLURM's own line, in another rank's log
    assert last_error_line([err0, out0, err1]).startswith(
        "slurmstepd: error: *** STEP 12.0 ON node2 CANCELLED"
    )
    assert last_error_line([out0, tmp_path / "missing.err"]) is None


def test_status_says_why_a_job_failed(tmp_path):
    from launch.status import format_status

    s = {
        "run": "r",
        "run_dir": str(tmp_path),
        "steps": 40,
        "checkpoint": None,
        "export": None,
        "starts": 1,
        "stops": 0,
        "finished": False,
        "last": None,
        "evals": [],
        "jobs": [
            {
                "job_id": "12",
                "kind": "pretrain",
                "state": "FAILED",
                "restarts": 0,
                "attempts": ["FAILED"],
                "exit_code": "1:0",
                "error": "launch.jobs.JobFailed: ConfigError: bad",
            },
            {
                "job_id": "13",
                "kind": "eval",
                "protocol": "knn",
                "state": "CANCELLED",
                "restarts": 0,
                "attempts": ["CANCELLED"],
                "exit_code": "0:0",
                "error": None,
            },
        ],
    }
    out = format_status(s)
    assert "  job        12 FAILED, restarts 0 (FAILED)" in out
    stopped = {
        **s,
        "jobs": [{**s["jobs"][0], "exit_code": "3:0", "error": "srun: error: task 0: Exited with 3"}],
    }
    assert "  why        FAILED, exit code 3: stopped on request with a complete checkpoint" in format_status(
        stopped
    )
    assert "  why        FAILED, exit code 1:0: launch.jobs.JobFailed: ConfigError: bad" in out
    assert "  eval job   13 knn: CANCELLED (exit code 0:0)" in out


@pytest.mark.parametrize("script", ["status", "slurm"])
def test_a_reader_that_stops_early_ends_the_tools_quietly(script, tmp_path):
    """`launch/status.py --all | head` (and a dry run into head): no BrokenPipeError, exit 0."""
    for i in range(3):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "config.yaml").write_text("train:\n  steps: 20\n")
    argv = {
        "status": ["launch/status.py", "--all", "--root", str(tmp_path), "--no-slurm"],
        "slurm": [
            "launch/slurm.py",
            "--config",
            str(TINY_MAE),
            f"run.root={tmp_path}",
            "--local",
            "--dry-run",
        ],
    }[script]
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# ---------------------------------------------------------------- no SLURM controller answers
@pytest.fixture
def dead_controller(slurm_cluster, tmp_path_factory, monkeypatch):
    """SLURM_CONF naming the test cluster's config with ports nobody answers on (the cluster keeps running).

    ``silent``: the controller's port accepts connections and never replies (a hung or firewalled
    controller: SLURM's clients wait MessageTimeout); ``refused``: nothing listens (a stopped controller:
    they retry ~9 s). slurmdbd's port is refused in both (sacct).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = s.getsockname()[1]
    text = slurm_cluster.conf.read_text()
    confs = {}
    for kind, port in (("silent", listener.getsockname()[1]), ("refused", refused)):
        conf = tmp_path_factory.mktemp(f"dead-{kind}") / "slurm.conf"
        t = re.sub(r"^SlurmctldPort=\d+", f"SlurmctldPort={port}", text, flags=re.MULTILINE)
        conf.write_text(
            re.sub(r"^AccountingStoragePort=\d+", f"AccountingStoragePort={refused}", t, flags=re.M)
        )
        confs[kind] = conf

    def use(kind: str) -> Path:
        monkeypatch.setenv("SLURM_CONF", str(confs[kind]))
        return confs[kind]

    yield use
    listener.close()


@pytest.mark.slurm
@pytest.mark.parametrize("kind", ["silent", "refused"])
def test_no_controller_submit_says_so_and_what_to_do_instead(
    kind, dead_controller, tmp_path, no_submit, capsys
):
    conf = dead_controller(kind)
    t0 = time.monotonic()
    code = cli.main(["--config", str(TINY_MAE), "--cluster", "local", "--nodes", "2", f"run.root={tmp_path}"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: no SLURM cluster answered: 'scontrol ping'") and str(conf) in err, err
    for hint in ("--dry-run", "--local --nproc N", "--cluster local", "sudo launch/local_cluster.sh start"):
        assert hint in err, err
    assert "sinfo" not in err and "slurm_load" not in err, err  # no raw errors of the later queries
    assert elapsed < 3 + 4, elapsed  # one bounded ping; sinfo alone waited 9-10 s
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
def test_no_controller_dry_run_and_status_ask_once_briefly(dead_controller, tmp_path, no_submit, capsys):
    from launch import status

    dead_controller("silent")
    t0 = time.monotonic()
    code = cli.main(["--method", "mae", "--nodes", "8", f"run.root={tmp_path}", "--dry-run"])
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    assert code == 0 and "dry run: nothing submitted" in out
    assert (
        "(partition not checked: no SLURM cluster answered: 'scontrol ping' got no answer within 3 s" in out
    )
    assert elapsed < 3 + 5, elapsed  # before: sinfo waited for the controller (MessageTimeout, 10 s)

    run = tmp_path / "r"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "jobs.jsonl").write_text(
        "".join(json.dumps({"job_id": str(j), "kind": "pretrain"}) + "\n" for j in (7, 8))
    )
    t0 = time.monotonic()
    assert status.main([str(run), str(run)]) == 0
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("  slurm ")]
    assert len(lines) == 2 and "no SLURM cluster answered" in lines[0] and "job states not shown" in lines[0]
    assert "squeue" not in out and "sacct" not in out and "slurm_load" not in out, out
    assert elapsed < 3 + 2, elapsed  # one ping for both runs, no squeue (10 s) or sacct after it

"""launch/: flags -> SLURM parameters, cluster profiles, --dry-run, bad input (exit 2, nothing submitted).

No cluster needed, except the unknown-partition case (marked slurm: it asks the real sinfo).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch import slurm as cli
from launch.cluster_profile import ClusterProfile, LaunchError, load_profile, parse_time_minutes
from launch.local import combine_exit_codes, rank_env
from launch.plan import (
    estimate,
    eval_protocols,
    eval_slurm_parameters,
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
    p = eval_slurm_parameters(profile, "run-eval-knn", "123")
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
    assert code == 2 and "exists with a different config" in err and "method.mask_ratio" in err


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

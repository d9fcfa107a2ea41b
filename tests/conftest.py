"""Shared fixtures: real Fashion-MNIST shards, a tiny MAE config, subprocess helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY_MAE = ROOT / "configs" / "mae" / "tiny_fmnist.yaml"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip a test whose component is missing; under CI=true a missing component is a failure."""
    if IN_CI:
        pytest.fail(f"CI=true and a required component is missing: {reason}")
    pytest.skip(reason)


def python_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: repo on the path, one thread per rank, offline hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_cmd(args: list[str], timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kw.pop("env", python_env()),
        cwd=kw.pop("cwd", ROOT),
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def train_cmd(nproc: int, *overrides: str, config: Path = TINY_MAE) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.train", "--config", str(config), *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        "-m",
        "pretrain.train",
        "--config",
        str(config),
        *overrides,
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 real Fashion-MNIST training images in 8 shards of PGM files, as ``make data`` builds them."""
    out = tmp_path_factory.mktemp("fmnist") / "train"
    run_cmd(
        [
            sys.executable,
            "-m",
            "data_pipelines.build_shards",
            "fashion-mnist",
            str(out),
            "--split",
            "train",
            "--limit",
            "2000",
            "--shard-size",
            "250",
            "--image-format",
            "pnm",
        ],
        timeout=600,
    )
    return out

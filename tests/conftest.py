"""Shared fixtures: real Fashion-MNIST shards, a tiny MAE config, subprocess helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.components import IN_CI, skip_or_fail
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY_MAE = ROOT / "configs" / "mae" / "tiny_fmnist.yaml"


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true a skipped test fails unless it is GPU-marked (the CI machines have no GPU).

    ``skip_or_fail`` already fails there; this also catches a skip from anywhere else (a new
    ``pytest.importorskip``, a fixture's ``pytest.skip``), so CI never passes with a test unrun.
    """
    report = yield
    if (
        IN_CI
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("gpu") is None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: this test was skipped ({reason}); only gpu-marked tests may skip in CI"
    return report


_SYSTEM_READS: dict[str, Path] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Record which system files the tests read (tests/system_reads.py); checked at the end."""
    from tests import system_reads

    if config.option.collectonly or hasattr(config, "workerinput") or not system_reads.available():
        return
    _SYSTEM_READS["dir"] = system_reads.start(Path(tempfile.gettempdir()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a test read a system file that no install step of the project provides."""
    from tests import system_reads

    if session.config.option.collectonly:
        return
    folder = _SYSTEM_READS.get("dir")
    if folder is None:
        if IN_CI:
            _fail_session(session, ["dpkg/apt-cache not found: cannot check the system files the tests read"])
        return
    lines = system_reads.problems(folder)
    shutil.rmtree(folder, ignore_errors=True)
    if lines:
        _fail_session(
            session,
            [
                "tests read system files that no install step of the project provides; a fresh machine will "
                "not have them. Install the package in the Makefile (APT_PACKAGES) or launch/local_cluster.sh "
                "(PACKAGES), or make the test independent of it:",
                *lines,
            ],
        )


def _fail_session(session: pytest.Session, lines: list[str]) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.section("system files read by the tests", sep="=", red=True, bold=True)
        for line in lines:
            reporter.line(line, red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tux_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Tux Paint stamps as CLIP shards with the held-out split (Debian tuxpaint-stamps-default)."""
    from data_pipelines.image_text import TUXPAINT_STAMPS

    if not TUXPAINT_STAMPS.is_dir():
        skip_or_fail(
            f"{TUXPAINT_STAMPS} missing: install the Debian package tuxpaint-stamps-default (make system-deps)"
        )
    out = tmp_path_factory.mktemp("tuxpaint")
    run_cmd([sys.executable, "-m", "data_pipelines.image_text", "tuxpaint", str(out), "--quiet"], timeout=300)
    return out

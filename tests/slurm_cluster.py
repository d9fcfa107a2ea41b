"""A real single-machine SLURM cluster for the test suite (started by launch/local_cluster.sh).

The session-scoped fixture `slurm_cluster` installs the Debian packages if they are missing, starts
the cluster once per test run, and stops it at the end — unless it was already up and healthy
before the run (a developer's own cluster), which it reuses and leaves running.

Environment:
- CI=true: a cluster that cannot be installed or started FAILS every test that uses it (never skips).
- outside CI: skipped with the reason when not root, not Linux, or apt cannot install the packages;
  a start failure is still a failure.
- SSL_SLURM_DIR (default /tmp/ssl-slurm), SSL_SLURM_NODES (default 4): passed to the script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests.components import skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "launch" / "local_cluster.sh"

# sacct states after which a job will not run again (REQUEUED is not one of them).
FAILED_STATES = frozenset(
    {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)

T = TypeVar("T")


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class SlurmCluster:
    """Handle on the running cluster, yielded by the `slurm_cluster` fixture."""

    dir: Path  # cluster state: etc/ (slurm.conf), log/, run/, state/, spool/, mysql/
    conf: Path  # slurm.conf (SLURM_CONF)
    partition: str  # default partition, e.g. "debug"
    nodes: list[str]  # node names, e.g. ["node1", ..., "node4"]
    cluster_name: str  # ClusterName, also SLURM_CLUSTER_NAME inside jobs
    env: dict[str, str] = field(repr=False)  # environment for SLURM commands (has SLURM_CONF)
    script: Path = SCRIPT
    started_here: bool = True  # False: it was already running and is left running

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    def run(
        self, cmd: str | Sequence[str], *, timeout: float = 60, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command (a list, or a string for bash) with the cluster's environment.

        Bounded by `timeout` seconds; with `check`, a non-zero exit or a timeout raises an
        AssertionError that shows the command's output.
        """
        args = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        try:
            proc = subprocess.run(
                args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            out = (
                (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            )
            raise AssertionError(f"timed out after {timeout} s: {args}\n{_tail(out)}") from None
        if check and proc.returncode != 0:
            raise AssertionError(
                f"exit {proc.returncode}: {args}\n--- stdout\n{_tail(proc.stdout)}\n--- stderr\n{_tail(proc.stderr)}"
            )
        return proc

    def sbatch(self, *args: str, timeout: float = 30) -> str:
        """Submits with `sbatch --parsable ARGS...` and returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], timeout=timeout).stdout.strip()
        job_id = out.split(";")[0]
        assert job_id.isdigit(), f"unexpected sbatch output: {out!r}"
        return job_id

    def sacct_state(self, job_id: str) -> str:
        """State of the job's allocation in accounting ('' if not there yet), e.g. 'COMPLETED'."""
        proc = self.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], check=False, timeout=20)
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        return lines[-1].split()[0] if lines else ""

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (e.g. info['JobState'], info['Restarts']); {} if unknown."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=20)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", proc.stdout))

    def diagnostics(self) -> str:
        """squeue + sinfo + the controller's log tail, for error messages."""
        parts = []
        for cmd in (["squeue", "-t", "all"], ["sinfo", "-N"]):
            proc = self.run(cmd, check=False, timeout=20)
            parts.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        log = self.log_dir / "slurmctld.log"
        if log.exists():
            parts.append(f"--- tail {log}\n{_tail(log.read_text(errors='replace'), 25)}")
        return "\n".join(parts)

    def wait_for(self, predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.5) -> T:
        """Polls `predicate` until it returns a truthy value (returned) or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.diagnostics()}")
            time.sleep(interval)

    def wait_state(self, job_id: str, states: str | set[str], *, timeout: float = 60) -> str:
        """Waits until sacct shows the job in one of `states`; fails early on a failed state."""
        wanted = {states} if isinstance(states, str) else set(states)

        def check() -> str:
            state = self.sacct_state(job_id)
            if state in FAILED_STATES and state not in wanted:
                raise AssertionError(
                    f"job {job_id} ended {state}, wanted {sorted(wanted)}\n{self.diagnostics()}"
                )
            return state if state in wanted else ""

        return self.wait_for(check, timeout=timeout, what=f"job {job_id} to be {sorted(wanted)}")


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(e.cmd, 124, out, err + f"\n(timed out after {timeout} s)")


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return _tail(f"{proc.stdout}\n{proc.stderr}".strip(), 80)


def _unavailable(reason: str) -> None:
    skip_or_fail(f"SLURM test cluster unavailable: {reason}")


def _start() -> bool:
    """Brings the cluster up; returns False if it was already running (then it is left running)."""
    if not sys.platform.startswith("linux"):
        _unavailable(f"needs Linux (this is {sys.platform})")
    if not SCRIPT.is_file():
        pytest.fail(f"missing {SCRIPT}", pytrace=False)
    if _script("status", timeout=60).returncode == 0:
        return False
    if os.geteuid() != 0:
        _unavailable(
            "needs root to install packages and start daemons (or start it first: "
            "sudo launch/local_cluster.sh start)"
        )
    if shutil.which("apt-get") is None and shutil.which("slurmctld", path="/usr/sbin:/usr/bin") is None:
        _unavailable("apt-get is not available to install SLURM")
    proc = _script("install", timeout=900)
    if proc.returncode != 0:
        _unavailable(f"'local_cluster.sh install' failed (exit {proc.returncode}):\n{_output(proc)}")
    proc = _script("start", timeout=600)
    if proc.returncode != 0:
        _script("stop", timeout=180)  # leave no half-started daemons; the logs stay in the cluster dir
        pytest.fail(
            f"'local_cluster.sh start' failed (exit {proc.returncode}):\n{_output(proc)}", pytrace=False
        )
    return True


def _make_cluster(started_here: bool) -> SlurmCluster:
    proc = _script("env", timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"'local_cluster.sh env' failed:\n{_output(proc)}", pytrace=False)
    exports = dict(re.findall(r"^export (\w+)=(.*)$", proc.stdout, flags=re.MULTILINE))
    env = {**os.environ, **exports}
    conf = Path(exports["SLURM_CONF"])
    conf_text = conf.read_text()
    cluster_name = re.search(r"^ClusterName=(\S+)", conf_text, flags=re.MULTILINE)
    partition = re.search(r"^PartitionName=(\S+).*Default=YES", conf_text, flags=re.MULTILINE)
    nodes_out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    nodes = sorted(set(nodes_out), key=lambda n: (len(n), n))
    assert cluster_name and partition and nodes, f"cannot read the cluster from {conf}"
    return SlurmCluster(
        dir=conf.parent.parent,
        conf=conf,
        partition=partition.group(1),
        nodes=nodes,
        cluster_name=cluster_name.group(1),
        env=env,
        started_here=started_here,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The running single-machine SLURM cluster (see the module docstring)."""
    started_here = _start()
    cluster = _make_cluster(started_here)
    # submitit runs sbatch/sacct/scontrol with os.environ: point it at this cluster's config.
    with pytest.MonkeyPatch.context() as mp:
        for key in ("SLURM_CONF",):
            mp.setenv(key, cluster.env[key])
        try:
            yield cluster
        finally:
            if started_here:
                proc = _script("stop", timeout=180)
                if proc.returncode != 0:
                    print(f"'local_cluster.sh stop' failed:\n{_output(proc)}", file=sys.stderr)

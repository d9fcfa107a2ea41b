"""Small, bounded queries of the SLURM cluster (sinfo, squeue, sacct) for the launcher and status tool.

Callers first ask :func:`probe_controller` (one ``scontrol ping``, a few seconds at most): with the
controller down, ``sinfo`` and ``squeue`` retry for ~9 s each before they give up, so every further
query is skipped once the probe says nobody answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from launch.cluster_profile import LaunchError

# squeue states in which a job may still write its run directory.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)


# Seconds `scontrol ping` may take. A live controller answers a ping in milliseconds, even when busy;
# a dead one makes SLURM's clients retry for ~9 s, or wait MessageTimeout when its port never answers.
PROBE_TIMEOUT_S = 3.0


class SlurmUnavailable(RuntimeError):
    """The SLURM commands are missing or the controller does not answer."""


class ControllerDown(SlurmUnavailable):
    """SLURM is installed, but no controller answered ``scontrol ping`` (the message says what it said)."""


def slurm_installed() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def _run(cmd: list[str], timeout: float = 30) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmUnavailable(f"'{cmd[0]}' not found: SLURM is not installed on this machine")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"'{' '.join(cmd)}' did not answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise SlurmUnavailable(f"'{' '.join(cmd)}' failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def slurm_conf() -> str:
    """The configuration SLURM's commands read: ``$SLURM_CONF`` or the default path."""
    return os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"


def probe_controller(timeout: float = PROBE_TIMEOUT_S) -> None:
    """Return when a SLURM controller answers ``scontrol ping`` within ``timeout`` seconds.

    Raises:
        SlurmUnavailable: ``scontrol`` is not installed.
        ControllerDown: no controller answered; the message names the config and what ping said.
    """
    cmd = ["scontrol", "ping"]
    if shutil.which(cmd[0]) is None:
        raise SlurmUnavailable(f"'{cmd[0]}' not found: SLURM is not installed on this machine")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ControllerDown(
            f"no SLURM cluster answered: 'scontrol ping' got no answer within {timeout:g} s "
            f"(config {slurm_conf()})"
        ) from None
    # One line per controller, e.g. "Slurmctld(primary) at head1 is UP"; any UP controller serves.
    if " is UP" in proc.stdout:
        return
    said = " ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "*" not in line)
    raise ControllerDown(
        f"no SLURM cluster answered: 'scontrol ping' says: {said or f'exit code {proc.returncode}'} "
        f"(config {slurm_conf()})"
    )


def partitions() -> tuple[list[str], str | None]:
    """(all partition names, the default partition or None) from ``sinfo``."""
    names: list[str] = []
    default = None
    for line in _run(["sinfo", "-h", "-o", "%P"]).split():
        name = line.rstrip("*")
        if line.endswith("*"):
            default = name
        if name not in names:
            names.append(name)
    return names, default


def check_partition(partition: str | None) -> str:
    """The partition a job will run in; LaunchError naming the valid ones if ``sinfo`` does not know it."""
    import difflib

    names, default = partitions()
    if partition is None:
        if default is None:
            raise LaunchError(
                f"no default partition on this cluster: pass --partition (one of {', '.join(names)})"
            )
        return default
    if partition not in names:
        close = difflib.get_close_matches(partition, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LaunchError(
            f"--partition {partition}: sinfo does not know this partition{hint} Valid partitions: {', '.join(names)}"
        )
    return partition


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """squeue state of each job id still known to the controller (pending, running, ...)."""
    if not job_ids:
        return {}
    wanted = set(job_ids)
    out: dict[str, str] = {}
    for line in _run(["squeue", "-h", "-o", "%i %T"]).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            out[parts[0]] = parts[1]
    return out


@dataclass
class Attempt:
    job_id: str
    state: str
    start: str
    end: str
    elapsed: str
    exit_code: str
    nodes: str


def sacct_attempts(job_id: str) -> list[Attempt]:
    """Every attempt of a job, oldest first (``sacct -D``: one row per requeue)."""
    out = _run(
        [
            "sacct",
            "-X",
            "-D",
            "-n",
            "-P",
            "-j",
            job_id,
            "-o",
            "JobID,State,Start,End,Elapsed,ExitCode,NodeList",
        ]
    )
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 7 and parts[0].split("_")[0] == job_id:
            rows.append(Attempt(parts[0], parts[1].split()[0] if parts[1] else "", *parts[2:]))
    return rows

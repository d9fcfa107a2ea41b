"""Cluster profiles: a site's SLURM defaults in ``configs/cluster/<site>.yaml``.

A profile holds what is the same for every job on a site (partition, account, GPUs per node, time
limit, signal delay, requeue bounds, ...). ``launch/slurm.py --cluster <site>`` loads it, and every
command-line flag overrides the matching key. Without ``--cluster`` the profile named by the
``SSL_CLUSTER`` environment variable is used, else the built-in defaults below (an 8-GPU node).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "configs" / "cluster"


class LaunchError(ValueError):
    """Bad input to the launcher (exit code 2): the message names the flag/file/key and what is valid."""


@dataclass
class ClusterProfile:
    """SLURM defaults of one site. Field names are the YAML keys."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 8  # one task (rank) per GPU
    tasks_per_node: int | None = None  # ranks per node; None: gpus_per_node, or 1 on CPU-only nodes
    cpus_per_task: int = 8
    mem: str | None = None  # sbatch --mem (e.g. "200G", "0" = all); None: the site default
    time: str = "3-00:00:00"  # sbatch --time: minutes, [D-]HH:MM[:SS]
    signal_delay_s: int = 120  # USR2 this many seconds before the time limit
    max_timeouts: int = 3  # time-limit requeues (submitit's max_num_timeout)
    max_requeues: int = 100  # restarts of one job for any reason (preemption, timeout, scontrol requeue)
    exclusive: bool = False
    peak_tflops: float = 989.0  # per-GPU dense bf16 peak for the --dry-run estimate (H100 SXM)
    assumed_mfu: float = 0.40  # model FLOPs utilisation assumed by the --dry-run estimate
    eval_time: str = "04:00:00"  # time limit of each --eval job
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option: {name: value}
    setup: list[str] = field(default_factory=list)  # shell lines run in the batch script before srun
    env: dict[str, str] = field(default_factory=dict)  # environment variables exported before srun

    @property
    def ranks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def validate(self, where: str) -> None:
        errors: list[str] = []
        if self.gpus_per_node < 0:
            errors.append(f"gpus_per_node={self.gpus_per_node} must be >= 0")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            errors.append(f"tasks_per_node={self.tasks_per_node} must be >= 1")
        if self.cpus_per_task < 1:
            errors.append(f"cpus_per_task={self.cpus_per_task} must be >= 1")
        if self.signal_delay_s < 0:
            errors.append(f"signal_delay_s={self.signal_delay_s} must be >= 0")
        if self.max_timeouts < 0:
            errors.append(f"max_timeouts={self.max_timeouts} must be >= 0")
        if self.max_requeues < 0:
            errors.append(f"max_requeues={self.max_requeues} must be >= 0")
        if not 0 < self.assumed_mfu <= 1:
            errors.append(f"assumed_mfu={self.assumed_mfu} must be in (0, 1]")
        if self.peak_tflops <= 0:
            errors.append(f"peak_tflops={self.peak_tflops} must be > 0")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?B?", str(self.mem)):
            errors.append(f"mem={self.mem!r}: use SLURM's form, e.g. 200G, 64000M or 0 (all of the node)")
        for key in ("time", "eval_time"):
            try:
                parse_time_minutes(getattr(self, key))
            except LaunchError as e:
                errors.append(f"{key}: {e}")
        for name in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                errors.append(f"env: {name!r} is not a valid environment variable name")
        if errors:
            raise LaunchError(f"{where}: invalid cluster profile:\n  - " + "\n  - ".join(errors))


_FIELDS = {f.name: f for f in dataclasses.fields(ClusterProfile)}


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(spec: str) -> Path:
    """``spec`` is a YAML path or a site name under ``configs/cluster/``."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or "/" in spec:
        if not path.is_file():
            raise LaunchError(f"--cluster {spec}: no such file")
        return path
    named = PROFILE_DIR / f"{spec}.yaml"
    if not named.is_file():
        names = list_profiles()
        close = difflib.get_close_matches(spec, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LaunchError(
            f"--cluster {spec}: no profile {named}{hint} Available: {', '.join(names) or 'none'}"
        )
    return named


def load_profile(spec: str | None) -> tuple[ClusterProfile, str]:
    """Load a profile (path or site name; None: ``$SSL_CLUSTER`` or built-in defaults).

    Returns:
        The validated profile and a description of where it came from.
    """
    spec = spec or os.environ.get("SSL_CLUSTER") or None
    if spec is None:
        profile = ClusterProfile()
        profile.validate("built-in defaults")
        return profile, "built-in defaults (an 8-GPU node; pass --cluster <site>)"
    path = profile_path(spec)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LaunchError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    profile = ClusterProfile()
    for key, value in data.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise LaunchError(f"{path}: unknown key '{key}'{hint} Valid keys: {', '.join(_FIELDS)}")
        setattr(profile, key, _coerce(path, key, value))
    profile.validate(str(path))
    return profile, str(path)


def _coerce(path: Path, key: str, value: Any) -> Any:
    default = _FIELDS[key].default
    if value is None:
        return None
    try:
        if key in ("sbatch", "env"):
            if not isinstance(value, dict):
                raise TypeError("a mapping")
            return {str(k): (str(v) if key == "env" else v) for k, v in value.items()}
        if key == "setup":
            if not isinstance(value, list):
                raise TypeError("a list of shell lines")
            return [str(v) for v in value]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if key in (
            "gpus_per_node",
            "tasks_per_node",
            "cpus_per_task",
            "signal_delay_s",
            "max_timeouts",
            "max_requeues",
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError("an integer")
            return value
        if key in ("peak_tflops", "assumed_mfu"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError("a number")
            return float(value)
        return str(value)
    except TypeError as e:
        raise LaunchError(f"{path}: '{key}' must be {e.args[0]}, got {value!r}") from None


_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_time_minutes(text: str | int) -> int:
    """SLURM time string -> whole minutes (rounded up; SLURM's own granularity).

    Accepted, as sbatch --time: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.
    """
    s = str(text).strip()
    m = _TIME.match(s)
    if not m or s in ("", "0"):
        raise LaunchError(
            f"time {text!r}: use minutes (90), HH:MM:SS (01:30:00) or D-HH:MM:SS (3-00:00:00), more than 0"
        )
    days, a, b, c = m.group("days"), m.group("a"), m.group("b"), m.group("c")
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    if seconds <= 0:
        raise LaunchError(f"time {text!r} must be more than 0")
    return max(1, math.ceil(seconds / 60))

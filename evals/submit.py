"""Evaluation jobs on SLURM: one ``evals.run`` command per job, sized by the site's cluster profile.

The profile is the launcher's (``configs/cluster/<site>.yaml``, :mod:`launch.cluster_profile`): chosen
with ``--cluster SITE`` or ``$SSL_CLUSTER``, else the built-in defaults (an 8-GPU node). An evaluation
job is one task on one node: ``cpus_per_task`` CPUs per rank, one GPU when the site's nodes have GPUs
(``--gpus N``: N GPUs, N ranks under torchrun), the profile's ``eval_time``, partition, account, QOS,
constraint, extra ``sbatch`` options, ``setup`` lines and ``env``. Memory is the site's default unless
``--mem`` asks for some: a profile's ``mem`` is sized for exclusive training nodes (``"0"``: all of
it), which an evaluation must not hold.

A submission that SLURM refuses becomes one line naming what was asked for and what ``sbatch`` said
(:class:`~evals.errors.EvalInputError`, exit 2); a controller that does not answer is
:class:`SlurmUnavailableError` (exit 1: retry later).

Other programs submit evaluation jobs with :func:`eval_executor` + :func:`submit_eval`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from evals.errors import EvalInputError

REPO_ROOT = Path(__file__).resolve().parents[1]

# sbatch messages that mean "no controller answered", not "this request is invalid".
_UNREACHABLE = (
    "unable to contact slurm controller",
    "socket timed out",
    "connection refused",
    "zero bytes were transmitted",
    "slurm_persist_conn",
)


class SlurmUnavailableError(RuntimeError):
    """SLURM did not answer (controller down or unreachable): nothing was submitted; retry later."""


class EvalCommand:
    """submitit callable: run one ``evals.run`` command (a preempted evaluation simply starts over).

    Args:
        command: the full command line (``python -m evals.run ...`` or torchrun).
        workdir: the directory it runs in (the repository).
    """

    def __init__(self, command: list[str], workdir: str) -> None:
        self.command, self.workdir = command, workdir

    def __call__(self) -> int:
        """Run the command; raise when it fails, so that SLURM and submitit record the job as failed."""
        print("running:", " ".join(self.command), flush=True)
        code = subprocess.run(self.command, cwd=self.workdir, check=False).returncode
        if code != 0:
            raise RuntimeError(f"{' '.join(self.command)} exited with {code}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue as is: evaluations are pure functions of the export."""
        import submitit

        return submitit.helpers.DelayedSubmission(EvalCommand(self.command, self.workdir))


def load_cluster_profile(spec: str | None) -> tuple[Any, str]:
    """The cluster profile (``--cluster`` value, else ``$SSL_CLUSTER``, else built-in defaults) and where
    it came from.

    Raises:
        EvalInputError: unknown site or invalid profile (the launcher's message, naming the valid ones).
    """
    from launch.cluster_profile import LaunchError, load_profile

    try:
        return load_profile(spec)
    except LaunchError as exc:
        raise EvalInputError(str(exc)) from None


def eval_job_parameters(
    profile: Any,
    job_name: str,
    *,
    gpus: int | None = None,
    time: str | int | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    dependency: str | None = None,
    repo_root: Path = REPO_ROOT,
) -> dict[str, Any]:
    """``submitit.SlurmExecutor.update_parameters`` arguments of one evaluation job.

    Args:
        profile: a :class:`launch.cluster_profile.ClusterProfile`.
        job_name: SLURM job name.
        gpus: GPUs (= ranks) of the job; ``None``: 1 where the profile's nodes have GPUs, else 0.
        time: time limit (minutes or a SLURM time string); ``None``: the profile's ``eval_time``.
        cpus_per_task: CPUs per rank; ``None``: the profile's ``cpus_per_task``.
        mem: memory of the job in SLURM's form (``32G``); ``None``: the site's default.
        dependency: an sbatch dependency, e.g. ``afterok:1234`` (the job is dropped if it can never start).
        repo_root: put on ``PYTHONPATH`` in the batch script.

    Raises:
        EvalInputError: an invalid time, or negative GPU/CPU/memory counts.
    """
    from launch.cluster_profile import LaunchError, parse_time_minutes

    gpus = (1 if profile.gpus_per_node > 0 else 0) if gpus is None else gpus
    cpus = profile.cpus_per_task if cpus_per_task is None else cpus_per_task
    if gpus < 0 or cpus < 1:
        raise EvalInputError(f"--gpus {gpus} must be >= 0 and --cpus-per-task {cpus} >= 1")
    if mem is not None and not re.fullmatch(r"[1-9]\d*[KMGT]?B?", str(mem)):
        raise EvalInputError(f"--mem {mem!r}: use SLURM's form, e.g. 32G or 64000M")
    try:
        minutes = parse_time_minutes(profile.eval_time if time is None else time)
    except LaunchError as exc:
        raise EvalInputError(f"evaluation job time limit: {exc}") from None
    setup = list(profile.setup)
    setup += [f"export {k}={shlex.quote(v)}" for k, v in profile.env.items()]
    setup.append(f"export PYTHONPATH={shlex.quote(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}")
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": 1,
        "ntasks_per_node": 1,  # one process; with several GPUs it runs torchrun with one rank per GPU
        "cpus_per_task": cpus * max(1, gpus),
        "time": minutes,
        "signal_delay_s": min(profile.signal_delay_s, 60),
        "setup": setup,
        "additional_parameters": {"requeue": True, **profile.sbatch},
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(profile, key)
        if value is not None:
            params[key] = str(value)
    if mem is not None:
        params["mem"] = str(mem)
    if dependency:
        params["dependency"] = dependency
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    return params


def describe_request(params: dict[str, Any]) -> str:
    """``partition debug, 1 CPU(s), no GPU, 10 min`` (for messages)."""
    gpus = params.get("gpus_per_node")
    parts = [
        f"partition {params.get('partition', '(default)')}",
        f"{params['cpus_per_task']} CPU(s)",
        f"{gpus} GPU(s)" if gpus else "no GPU",
        f"{params['time']} min",
    ]
    if params.get("mem"):
        parts.append(f"mem {params['mem']}")
    for key in ("account", "qos", "constraint"):
        if params.get(key):
            parts.append(f"{key} {params[key]}")
    return ", ".join(parts)


def eval_executor(folder: str | Path, profile: Any, params: dict[str, Any]) -> Any:
    """A ``submitit.SlurmExecutor`` for evaluation jobs (logs in ``folder``, ``%j`` per job).

    Raises:
        EvalInputError: submitit or SLURM (``sbatch``) is not installed here.
    """
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
    if missing:
        raise EvalInputError(
            f"SLURM is not installed here (no {' or '.join(missing)} on PATH): drop --submit to evaluate on this "
            "machine, or run this on a SLURM login node"
        )
    try:
        import submitit
    except ImportError:
        raise EvalInputError("--submit needs submitit (pip install -e '.[slurm]')") from None
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=profile.max_timeouts)
    executor.update_parameters(**params)
    return executor


def submit_eval(executor: Any, command: list[str], workdir: str | Path = REPO_ROOT, request: str = "") -> str:
    """Submit one evaluation command as a job; return its job id.

    Args:
        executor: from :func:`eval_executor`.
        command: the ``evals.run`` command line (see ``evals.watch.eval_command``).
        workdir: where it runs.
        request: what was asked for (:func:`describe_request`), for the error message.

    Raises:
        EvalInputError: ``sbatch`` refused the job (the message names the request and SLURM's reason).
        SlurmUnavailableError: no SLURM controller answered.
    """
    from submitit.core.utils import FailedJobError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # submitit prints sbatch's stderr itself; we say it once
            job = executor.submit(EvalCommand(list(command), str(workdir)))
    except FailedJobError as exc:
        reason = _reason(str(exc) or captured.getvalue())
        if any(marker in reason.lower() for marker in _UNREACHABLE):
            raise SlurmUnavailableError(f"no SLURM controller answered sbatch: {reason}") from None
        raise EvalInputError(f"sbatch refused the evaluation job ({request}): {reason}") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmUnavailableError(f"sbatch could not be run: {exc}") from None
    return str(job.job_id)


def _reason(text: str) -> str:
    """The informative line of sbatch's output (``sbatch: error: ...``), without the prefix."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines or ["(no message)"]
    reason = errors[-1]
    for prefix in ("sbatch: error: ", "sbatch: "):
        if reason.startswith(prefix):
            reason = reason[len(prefix) :]
    return reason

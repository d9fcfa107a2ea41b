"""From command-line flags to a launch plan: recipe, resolved config, world size, SLURM parameters.

Pure functions (no submission, no SLURM calls), so that the argument -> SLURM parameter mapping,
the GPU-hours estimate and the --dry-run text are unit-tested without a cluster.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launch.cluster_profile import REPO_ROOT, ClusterProfile, LaunchError, parse_time_minutes

RECIPE_INDEX = REPO_ROOT / "configs" / "default_recipes.yaml"
EVAL_PROTOCOL_DIR = REPO_ROOT / "configs" / "eval"


def recipe_for_method(method: str) -> Path:
    """The default recipe of ``method`` (``configs/default_recipes.yaml``); LaunchError if unknown."""
    from pretrain.methods import list_methods

    known = list_methods()
    index = (yaml.safe_load(RECIPE_INDEX.read_text()) or {}) if RECIPE_INDEX.is_file() else {}
    if method not in known:
        close = difflib.get_close_matches(method, known, n=1, cutoff=0.3)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LaunchError(f"--method {method}: unknown method{hint} Valid methods: {', '.join(known)}")
    if method not in index:
        raise LaunchError(
            f"--method {method}: no default recipe in {RECIPE_INDEX.relative_to(REPO_ROOT)}; "
            f"pass --config configs/{method}/<recipe>.yaml"
        )
    path = Path(index[method])
    return path if path.is_absolute() else REPO_ROOT / path


def complete_steps(parent: Path) -> list[int]:
    """Steps of the ``step_N`` directories under ``parent`` that hold a ``COMPLETE`` marker, ascending.

    A checkpoint or export without the marker does not exist (it was cut short), so it is not listed.
    """
    steps = []
    if parent.is_dir():
        for d in parent.glob("step_*"):
            if (d / "COMPLETE").is_file():
                try:
                    steps.append(int(d.name.split("_", 1)[1]))
                except ValueError:
                    continue
    return sorted(steps)


def finished_step(run_dir: Path, total_steps: int) -> int | None:
    """The step of the run's newest complete export if training is done (step >= ``total_steps``)."""
    exports = complete_steps(run_dir / "exports")
    return exports[-1] if exports and exports[-1] >= total_steps else None


def eval_protocols(spec: str | None) -> list[str]:
    """``--eval knn,linear`` -> ["knn", "linear"], checked against ``configs/eval/*.yaml`` when present."""
    if not spec:
        return []
    names = [p.strip() for p in spec.split(",") if p.strip()]
    if not names:
        raise LaunchError(f"--eval {spec!r}: give protocol names separated by commas, e.g. --eval knn,linear")
    known = sorted(p.stem for p in EVAL_PROTOCOL_DIR.glob("*.yaml")) if EVAL_PROTOCOL_DIR.is_dir() else []
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise LaunchError(f"--eval: protocol name {name!r} must be letters, digits, '_', '.', '-'")
        if known and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise LaunchError(f"--eval: unknown protocol '{name}'{hint} Valid: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise LaunchError(f"--eval {spec!r}: a protocol is named twice")
    return names


@dataclass
class Estimate:
    flops_per_sample: float
    total_flops: float
    peak_flops: float  # per rank
    mfu: float
    wall_hours: float
    gpu_hours: float


def estimate(
    flops_per_sample: float, steps: int, global_batch: int, world_size: int, peak_tflops: float, mfu: float
) -> Estimate:
    """GPU-hours = steps x global_batch x flops_per_sample / (peak x MFU), wall = that / world_size."""
    total = float(steps) * global_batch * flops_per_sample
    peak = peak_tflops * 1e12
    wall_s = total / (world_size * peak * mfu)
    return Estimate(flops_per_sample, total, peak, mfu, wall_s / 3600, wall_s * world_size / 3600)


def method_flops_per_sample(cfg: Any) -> float:
    """Training FLOPs per sample of the configured method, without allocating its weights."""
    import torch

    from pretrain.methods import build_method

    with torch.device("meta"):
        return float(build_method(cfg).flops_per_sample())


def slurm_parameters(
    profile: ClusterProfile, job_name: str, nodes: int, repo_root: Path = REPO_ROOT
) -> dict[str, Any]:
    """``submitit.SlurmExecutor.update_parameters`` arguments of a pretraining job."""
    if nodes < 1:
        raise LaunchError(f"--nodes {nodes}: need at least 1 node")
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": nodes,
        "ntasks_per_node": profile.ranks_per_node,  # one task (rank) per GPU
        "cpus_per_task": profile.cpus_per_task,
        "time": parse_time_minutes(profile.time),
        "signal_delay_s": profile.signal_delay_s,
        "setup": setup_lines(profile, repo_root),
        # A rank that exits non-zero ends the whole step at once (no wait for the collective timeout).
        "srun_args": ["--kill-on-bad-exit=1"],
        # requeue: allowed for this job even where the site's JobRequeue=0 (preemption, node failure).
        "additional_parameters": {"requeue": True, **profile.sbatch},
    }
    if profile.gpus_per_node > 0:
        params["gpus_per_node"] = profile.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        value = getattr(profile, key)
        if value is not None:
            params[key] = str(value)
    if profile.exclusive:
        params["exclusive"] = True
    return params


def setup_lines(profile: ClusterProfile, repo_root: Path = REPO_ROOT) -> list[str]:
    """Shell lines of the batch script before srun: the profile's setup, its env, the code on the path."""
    lines = list(profile.setup)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in profile.env.items()]
    lines.append(f"export PYTHONPATH={shlex.quote(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}")
    return lines


def sbatch_preview(params: dict[str, Any], folder: Path) -> list[str]:
    """The batch script submitit will write for ``params``, without its comments (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = folder.absolute()
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    text = _make_sbatch_string(command=command, folder=folder, **params)
    return [line for line in text.splitlines() if line.strip() and not line.startswith(("# ", "#!"))]


@dataclass
class Plan:
    """Everything ``launch/slurm.py`` decided before submitting (or printing, with --dry-run)."""

    recipe: Path
    cfg: Any  # resolved, validated DictConfig
    profile: ClusterProfile
    profile_source: str
    nodes: int
    world_size: int
    run_dir: Path
    slurm: dict[str, Any]
    evals: list[str] = field(default_factory=list)
    local_nproc: int | None = None
    finished_step: int | None = None  # the run's complete export at step >= train.steps: nothing to train

    @property
    def evals_only(self) -> bool:
        """A finished run with ``--eval``: only the eval jobs are submitted, no training job."""
        return self.finished_step is not None and bool(self.evals) and self.local_nproc is None

    def describe(self, est: Estimate | None) -> str:
        from pretrain.config import to_yaml

        cfg, p = self.cfg, self.profile
        lines = ["# resolved config", to_yaml(cfg).rstrip(), ""]
        if self.evals_only:
            lines += [
                f"# run '{cfg.run.name}' is finished (export step {self.finished_step} >= train.steps="
                f"{cfg.train.steps}): no training job; eval jobs only",
                f"evals:        {', '.join(self.evals)} on {self.run_dir}/exports/step_{self.finished_step:08d}",
                f"eval job:     1 node x 1 task, {p.cpus_per_task} CPU(s)"
                + (", 1 GPU" if p.gpus_per_node > 0 else "")
                + f", time {p.eval_time}",
            ]
            return "\n".join(lines)
        if self.local_nproc is not None:
            lines += ["# local run (no SLURM)", f"processes: {self.local_nproc} on this machine"]
        else:
            lines += [f"# SLURM parameters (profile: {self.profile_source})"]
            lines += sbatch_preview(self.slurm, self.run_dir / "slurm")
            lines += [
                f"max time-limit requeues: {p.max_timeouts}   max restarts (any cause): {p.max_requeues}"
            ]
        steps, gbs = int(cfg.train.steps), int(cfg.train.global_batch_size)
        lines += [
            "",
            "# job",
            f"recipe:       {self.recipe}",
            f"run dir:      {self.run_dir}",
            f"nodes:        {self.nodes}",
            f"world size:   {self.world_size} rank(s)"
            + (
                ""
                if self.local_nproc is not None
                else f" = {self.nodes} node(s) x {p.ranks_per_node} task(s)"
            ),
            f"global batch: {gbs} ({gbs // (self.world_size * int(cfg.train.accum_steps))} per rank per micro-batch,"
            f" accum {cfg.train.accum_steps})",
            f"steps:        {steps} ({steps * gbs:,} samples)",
        ]
        if self.finished_step is not None:
            lines.append(
                f"training:     finished (export step {self.finished_step} >= train.steps): nothing to train"
            )
        if self.evals:
            lines.append(f"evals:        {', '.join(self.evals)} (after pretraining succeeds)")
        if est is not None:
            lines += [
                "",
                "# estimate (assumed, not measured)",
                f"model FLOPs:  {est.flops_per_sample / 1e9:.2f} GFLOP/sample (training) x {steps * gbs:,} samples"
                f" = {est.total_flops:.3e} FLOP",
                f"assumed:      {est.mfu:.0%} MFU of {est.peak_flops / 1e12:g} TFLOP/s peak per GPU"
                " (--mfu, --peak-tflops)",
                f"GPU-hours:    {est.gpu_hours:,.4g}  (wall-clock {est.wall_hours:,.4g} h on {self.world_size} GPU(s))",
            ]
        return "\n".join(lines)


def profile_with_overrides(profile: ClusterProfile, **flags: Any) -> ClusterProfile:
    """A copy of ``profile`` with every flag that was given (not None) replacing its key."""
    changes = {k: v for k, v in flags.items() if v is not None}
    updated = dataclasses.replace(profile, **changes)
    updated.validate("command line")
    return updated

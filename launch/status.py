"""Status of pretraining runs: SLURM job state, restarts, why a job failed, newest complete checkpoint,
last loss/throughput and eval results.

    python launch/status.py RUN [RUN ...]      # a run name (under runs/) or a run directory
    python launch/status.py --all              # every run under runs/ (or --root DIR)
    python launch/status.py RUN --json         # one JSON object per run, for scripts and dashboards

Reads the run directory (``metrics.jsonl``, ``checkpoints/``, ``exports/``, ``evals/``,
``slurm/jobs.jsonl`` written by launch/slurm.py, and the jobs' logs) and asks SLURM (``squeue``,
``sacct``) about the run's jobs. SLURM is probed once first (``scontrol ping``, a few seconds at most):
when no controller answers, one line says so and no other SLURM query is made. Exit code 0, or 2 when
a named run does not exist; a reader that stops early (``| head``) ends it quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/status.py`: import from the repository, not from launch/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from launch.plan import complete_steps

# sacct states of a job attempt that did not succeed: status says why (exit code, log line).
UNSUCCESSFUL_STATES = frozenset(
    {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
LOG_TAIL_BYTES = 64 * 1024  # how much of each log's end is searched for the error line


def _read_metrics(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(last scalar record, all events) of metrics.jsonl; tolerant of a half-written last line."""
    last: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    if not path.is_file():
        return None, []
    with path.open() as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" in rec:
                events.append(rec)
            elif "train/loss" in rec:
                last = rec
    return last, events


def _jobs(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "slurm" / "jobs.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def eval_results(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluations, oldest step first, as ``evals.results.list_results`` (the evals package's
    stable listing) reports them: results (state ``done``) and ``evals.watch``'s ``failed`` /
    ``submitted`` records, each with its step, name, protocol, recipe line, headline metric and file.
    """
    from evals.results import list_results

    out = []
    for e in list_results(run_dir):
        metrics = {
            k: float(v)
            for k, v in (e.metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        out.append(
            {
                "step": e.step,
                "name": e.name,
                "protocol": e.protocol,
                "state": e.state,
                "encoder": e.encoder,
                "recipe": e.recipe,
                "headline": e.headline,
                "value": e.value,
                "metrics": metrics,
                "file": str(e.file),
                "detail": e.detail,
                "job_id": e.job_id,
            }
        )
    return out


_TRACEBACK = "Traceback (most recent call last):"
# Where an attempt starts in a log that every attempt appends to: submitit's first line (.out) and
# launch.jobs' marker (.err).
_ATTEMPT_START = re.compile(r"Starting with JobEnvironment|^launch: job \S+ attempt \d+ rank \d+ started")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torch.distributed prefixes a rank's traceback lines
_TASK_FAILED = re.compile(r"^srun: error: \S+: tasks? ([\d\-,]+): (.*)")
_SLURM_ERROR = re.compile(r"^(slurmstepd\S*|srun): error: |CANCELLED|TIME LIMIT|oom|Killed|Terminated")
_SLURM_ENDED = re.compile(r"\*\*\* (JOB|STEP) \S+ ON \S+ .+ \*\*\*")  # "*** JOB 12 ON node1 CANCELLED AT ..."
_LOG_RANK = re.compile(r"_(\d+)_log\.\w+$")
MAX_ERROR_CHARS = 300


def last_error_line(log_files: list[Path], slurm_first: bool = False) -> str | None:
    """Why a job's last attempt failed, in one line, from its logs (``<jobid>_<rank>_log.{err,out}``).

    The cause is the exception line that ended a Python traceback, else the last logged ERROR, taken
    from the rank that srun reports failing first (``srun: error: node2: task 1: Exited with exit code
    1``), else from any rank. A first task that did not exit by itself (``... task 1: Killed``) is the
    cause: that line comes first, followed by what the other ranks then said. Without any of these:
    SLURM's own last error line. ``slurm_first`` (a job SLURM ended: cancelled, timed out,
    preempted): SLURM's line saying so (``slurmstepd: error: *** JOB 12 ON node1 CANCELLED AT ...
    DUE TO TIME LIMIT ***``) comes first.
    """
    texts: list[tuple[int | None, list[str]]] = []
    for path in log_files:
        with contextlib.suppress(OSError), path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            lines = [_RANK_PREFIX.sub("", ln) for ln in f.read().decode(errors="replace").splitlines()]
            starts = [i for i, line in enumerate(lines) if _ATTEMPT_START.search(line)]
            m = _LOG_RANK.search(path.name)
            texts.append((int(m.group(1)) if m else None, lines[starts[-1] :] if starts else lines))
    if slurm_first and (ended := _first(texts, _slurm_ended)):
        return ended[:MAX_ERROR_CHARS]
    task = _first(texts, _first_failed_task)
    first_rank = None
    if task and (m := _TASK_FAILED.search(task)) and m.group(1).isdigit():
        first_rank = int(m.group(1))
    # The failed task's own logs first, then the others in their order.
    ordered = sorted(texts, key=lambda t: t[0] != first_rank) if first_rank is not None else texts
    cause = _first(ordered, _exception_line) or _first(ordered, _logged_error)
    if task and cause and "Exited with exit code" not in task:
        return f"{task}; then: {cause}"[:MAX_ERROR_CHARS]
    return (cause or task or _first(texts, _slurm_error) or "")[:MAX_ERROR_CHARS] or None


def _first(texts: list[tuple[int | None, list[str]]], pick: Any) -> str | None:
    """The first file's answer of ``pick`` (a function of a file's lines), stripped."""
    for _, lines in texts:
        found = pick(lines)
        if found:
            return found.strip()
    return None


def _exception_line(lines: list[str]) -> str | None:
    found = None
    in_traceback = False
    for line in lines:
        if line.startswith(_TRACEBACK):
            in_traceback = True
        elif in_traceback and line.strip() and not line.startswith((" ", "\t")):
            found, in_traceback = line, False
    return found


def _logged_error(lines: list[str]) -> str | None:
    # Our log format ("12:00:00 [rank0] ERROR name: message"); not submitit's generic
    # "submitit ERROR (...) - Submitted job triggered an exception" (its traceback follows).
    return next((ln for ln in reversed(lines) if re.search(r"\[rank\d+\] ERROR ", ln)), None)


def _first_failed_task(lines: list[str]) -> str | None:
    return next((ln for ln in lines if _TASK_FAILED.search(ln)), None)


def _slurm_ended(lines: list[str]) -> str | None:
    return next((ln for ln in reversed(lines) if _SLURM_ENDED.search(ln)), None)


def _slurm_error(lines: list[str]) -> str | None:
    return next((ln for ln in reversed(lines) if _SLURM_ERROR.search(ln)), None)


def _job_logs(run_dir: Path, job_id: str) -> list[Path]:
    """A job's log files, rank 0 first, .err before .out."""

    def key(p: Path) -> tuple[int, int]:
        rank = p.name[len(job_id) + 1 :].split("_", 1)[0]
        return (int(rank) if rank.isdigit() else 1 << 30, 0 if p.suffix == ".err" else 1)

    return sorted((run_dir / "slurm").glob(f"{job_id}_*_log.*"), key=key)


class SlurmProbe:
    """Asks ``scontrol ping`` once, on first use; ``error`` is None when a controller answered."""

    def __init__(self) -> None:
        self._checked = False
        self._error: str | None = None

    @property
    def error(self) -> str | None:
        if not self._checked:
            from launch.cluster import SlurmUnavailable, probe_controller

            self._checked = True
            try:
                probe_controller()
            except SlurmUnavailable as e:
                self._error = f"{e}; job states not shown (--no-slurm: do not ask)"
        return self._error


def run_status(run_dir: Path, query_slurm: bool = True, slurm: SlurmProbe | None = None) -> dict[str, Any]:
    """Everything the status lines show, as a dict.

    Args:
        run_dir: the run directory.
        query_slurm: ask SLURM about the run's recorded jobs (squeue, sacct).
        slurm: the probe to share between runs (one ``scontrol ping`` for all); default: a new one.
    """
    from launch.cluster import SlurmUnavailable, queue_states, sacct_attempts

    ckpts = complete_steps(run_dir / "checkpoints")
    exports = complete_steps(run_dir / "exports")
    last, events = _read_metrics(run_dir / "metrics.jsonl")
    total_steps = None
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        import yaml

        with contextlib.suppress(yaml.YAMLError, AttributeError):
            total_steps = (yaml.safe_load(cfg_path.read_text()) or {}).get("train", {}).get("steps")
    status: dict[str, Any] = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "steps": total_steps,
        "checkpoint": ckpts[-1] if ckpts else None,
        "checkpoint_dir": str(run_dir / "checkpoints" / f"step_{ckpts[-1]:08d}") if ckpts else None,
        "export": exports[-1] if exports else None,
        "starts": sum(1 for e in events if e.get("event") == "start"),
        "stops": sum(1 for e in events if e.get("event") == "stopped"),
        "finished": any(e.get("event") == "finished" for e in events),
        "last": None,
        "jobs": [],
        "evals": eval_results(run_dir),
    }
    if last is not None:
        status["last"] = {
            "step": last.get("step"),
            "age_s": round(time.time() - float(last.get("time", time.time())), 1),
            "loss": last.get("train/loss"),
            "images_per_s": last.get("perf/images_per_s"),
            "mfu": last.get("perf/mfu"),
        }
    jobs = _jobs(run_dir)
    if not (query_slurm and jobs):
        return status
    slurm = slurm or SlurmProbe()
    if slurm.error is not None:
        status["slurm_error"] = slurm.error
        return status
    try:
        queued = queue_states([str(j["job_id"]) for j in jobs])
    except SlurmUnavailable as e:
        queued, status["slurm_error"] = {}, str(e)
    for j in jobs:
        jid = str(j["job_id"])
        row: dict[str, Any] = {"job_id": jid, "kind": j.get("kind"), "protocol": j.get("protocol")}
        try:
            attempts = sacct_attempts(jid)
        except SlurmUnavailable as e:
            attempts, status["slurm_error"] = [], str(e)
        row["state"] = queued.get(jid) or (attempts[-1].state if attempts else "UNKNOWN")
        row["restarts"] = max(0, len(attempts) - 1)
        row["attempts"] = [a.state for a in attempts]
        row["exit_code"] = attempts[-1].exit_code if attempts else None
        if jid not in queued and row["state"] in UNSUCCESSFUL_STATES:
            ended_by_slurm = row["state"] not in ("FAILED", "OUT_OF_MEMORY")
            row["error"] = last_error_line(_job_logs(run_dir, jid), slurm_first=ended_by_slurm)
        status["jobs"].append(row)
    return status


def _why(j: dict[str, Any]) -> str:
    """Why a job attempt did not succeed: exit code and the error line of its logs ('' if it did)."""
    if j["state"] not in UNSUCCESSFUL_STATES:
        return ""
    if j["state"] == "FAILED" and str(j.get("exit_code", "")).startswith("3:"):
        # pretrain.train's exit 3: the ranks stopped on a signal (e.g. scancel --signal=TERM) and saved.
        return "exit code 3: stopped on request with a complete checkpoint; the same command continues"
    parts = [f"exit code {j['exit_code']}"] if j.get("exit_code") else []
    if j.get("error"):
        parts.append(j["error"])
    return ": ".join(parts)


def format_status(s: dict[str, Any]) -> str:
    """The human-readable lines of one run's status (``run_status``'s dict)."""
    steps = f"/{s['steps']}" if s["steps"] else ""
    lines = [f"run {s['run']}  ({s['run_dir']})"]
    pretrain = [j for j in s["jobs"] if j["kind"] == "pretrain"]
    if pretrain:
        j = pretrain[-1]
        older = f"; {len(pretrain) - 1} earlier job(s)" if len(pretrain) > 1 else ""
        lines.append(
            f"  job        {j['job_id']} {j['state']}, restarts {j['restarts']}"
            f" ({' -> '.join(j['attempts']) or 'no accounting yet'}){older}"
        )
        if _why(j):
            lines.append(f"  why        {j['state']}, {_why(j)}")
    elif "slurm_error" not in s:
        lines.append("  job        none recorded (not launched with launch/slurm.py, or --local)")
    if "slurm_error" in s:
        lines.append(f"  slurm      {s['slurm_error']}")
    for j in s["jobs"]:
        if j["kind"] == "eval":
            why = f" ({_why(j)})" if _why(j) else ""
            lines.append(f"  eval job   {j['job_id']} {j['protocol']}: {j['state']}{why}")
    state = "finished" if s["finished"] else f"{s['starts']} start(s), {s['stops']} stop(s) on request"
    lines.append(f"  training   {state}")
    ck = f"step {s['checkpoint']}{steps}  {s['checkpoint_dir']}" if s["checkpoint"] is not None else "none"
    lines.append(f"  checkpoint {ck}")
    lines.append(f"  export     {'step ' + str(s['export']) if s['export'] is not None else 'none'}")
    last = s["last"]
    if last:
        mfu = f", MFU {last['mfu']:.1%}" if last.get("mfu") is not None else ""
        ips = f"{last['images_per_s']:.1f} img/s" if last.get("images_per_s") is not None else "? img/s"
        loss = f"{last['loss']:.4f}" if last.get("loss") is not None else "?"
        lines.append(
            f"  last log   step {last['step']}{steps}: loss {loss}, {ips}{mfu} ({_ago(last['age_s'])})"
        )
    else:
        lines.append("  last log   nothing logged yet")
    lines += _eval_lines(s["evals"])
    return "\n".join(lines)


def _eval_lines(results: list[dict[str, Any]]) -> list[str]:
    """Evaluations of the newest evaluated step, one per line; older steps counted."""
    if not results:
        return ["  evals      none"]
    newest = max((r["step"] for r in results if r["step"] is not None), default=None)
    shown = [r for r in results if r["step"] == newest]
    older = len({r["step"] for r in results}) - 1
    lines = []
    for i, r in enumerate(shown):
        if r["state"] == "done":
            metrics = r["metrics"]
            keys = [k for k in (r["headline"], "top5") if k in metrics] or list(metrics)[:3]
            text = ", ".join(f"{k} {metrics[k]:.2f}" for k in keys) or "no scalar metrics"
            if r["recipe"]:
                text += f"  ({r['recipe']})"
        else:
            text = f"{r['state']} ({r['detail']})" if r["detail"] else r["state"]
        head = "  evals      " if i == 0 else "             "
        lines.append(f"{head}step {newest}: {r['name']}: {text}")
    if older > 0:
        lines.append(f"             (and evaluations at {older} earlier step(s); --json lists all)")
    return lines


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def resolve_run(spec: str, root: Path) -> Path:
    path = Path(spec)
    if path.is_dir():
        return path
    return root / spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python launch/status.py",
        description="Job state, restarts, why a job failed, newest complete checkpoint, last logged "
        "loss/throughput and eval results of runs.",
        epilog="examples:\n  python launch/status.py mae_vit_l16_in1k\n  python launch/status.py --all\n"
        "  python launch/status.py runs/mae_tiny_fmnist --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="run name (under --root) or run directory")
    p.add_argument("--name", action="append", default=[], help="run name (same as a positional RUN)")
    p.add_argument("--root", default="runs", help="directory of run directories (run.root; default runs)")
    p.add_argument("--all", action="store_true", help="every run under --root")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    p.add_argument("--no-slurm", action="store_true", help="do not ask SLURM (run directory only)")
    args = p.parse_args(argv)
    root = Path(args.root)
    specs = list(args.runs) + list(args.name)
    if args.all:
        specs += sorted(
            str(d) for d in root.glob("*") if (d / "config.yaml").is_file() or (d / "slurm").is_dir()
        )
    if not specs:
        p.print_usage(sys.stderr)
        print("error: name a run (RUN or --name), or --all", file=sys.stderr)
        return 2
    code = 0
    slurm = SlurmProbe()
    try:
        for spec in specs:
            run_dir = resolve_run(spec, root)
            if not run_dir.is_dir():
                print(
                    f"error: no run directory {run_dir} (run names are directories under --root {root})",
                    file=sys.stderr,
                )
                code = 2
                continue
            s = run_status(run_dir, query_slurm=not args.no_slurm, slurm=slurm)
            print(json.dumps(s) if args.json else format_status(s), flush=True)
    except BrokenPipeError:  # `--all | head`: the reader has what it wants
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush fails too
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Status of pretraining runs: SLURM job state, restarts, newest complete checkpoint, last loss/throughput.

    python launch/status.py RUN [RUN ...]      # a run name (under runs/) or a run directory
    python launch/status.py --all              # every run under runs/ (or --root DIR)
    python launch/status.py RUN --json         # one JSON object per run, for scripts and dashboards

Reads only the run directory (``metrics.jsonl``, ``checkpoints/``, ``exports/``, ``slurm/jobs.jsonl``
written by launch/slurm.py) and asks SLURM (``squeue``, ``sacct``) about the run's jobs when SLURM
is there. Exit code 0, or 2 when a named run does not exist.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/status.py`: import from the repository, not from launch/
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def _complete_steps(parent: Path) -> list[int]:
    steps = []
    if parent.is_dir():
        for d in parent.glob("step_*"):
            if (d / "COMPLETE").is_file():
                try:
                    steps.append(int(d.name.split("_")[1]))
                except (IndexError, ValueError):
                    continue
    return sorted(steps)


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


def run_status(run_dir: Path, query_slurm: bool = True) -> dict[str, Any]:
    """Everything the status line shows, as a dict."""
    from launch.cluster import SlurmUnavailable, queue_states, sacct_attempts

    ckpts = _complete_steps(run_dir / "checkpoints")
    exports = _complete_steps(run_dir / "exports")
    last, events = _read_metrics(run_dir / "metrics.jsonl")
    total_steps = None
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        import yaml

        with contextlib.suppress(yaml.YAMLError):
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
    }
    if last is not None:
        status["last"] = {
            "step": last.get("step"),
            "age_s": round(time.time() - float(last.get("time", time.time())), 1),
            "loss": last.get("train/loss"),
            "images_per_s": last.get("perf/images_per_s"),
            "mfu": last.get("perf/mfu"),
        }
    if query_slurm:
        jobs = _jobs(run_dir)
        ids = [str(j["job_id"]) for j in jobs]
        try:
            queued = queue_states(ids)
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
            status["jobs"].append(row)
    return status


def format_status(s: dict[str, Any]) -> str:
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
    elif "slurm_error" not in s:
        lines.append("  job        none recorded (not launched with launch/slurm.py, or --local)")
    if "slurm_error" in s:
        lines.append(f"  slurm      {s['slurm_error']}")
    for j in s["jobs"]:
        if j["kind"] == "eval":
            lines.append(f"  eval       {j['job_id']} {j['protocol']}: {j['state']}")
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
    return "\n".join(lines)


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
        description="Job state, restarts, newest complete checkpoint and last logged loss/throughput of runs.",
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
    for spec in specs:
        run_dir = resolve_run(spec, root)
        if not run_dir.is_dir():
            print(
                f"error: no run directory {run_dir} (run names are directories under --root {root})",
                file=sys.stderr,
            )
            code = 2
            continue
        s = run_status(run_dir, query_slurm=not args.no_slurm)
        print(json.dumps(s) if args.json else format_status(s), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

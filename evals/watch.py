"""Follow a training run and evaluate every new complete export exactly once.

    python -m evals.watch runs/<name> --protocol knn,linear --data data/fmnist
    python -m evals.watch runs/<name> --protocol knn --data data/fmnist --once        # what exists, then exit
    python -m evals.watch runs/<name> --protocol knn --data data/fmnist --nproc 4     # torchrun per evaluation
    python -m evals.watch runs/<name> --protocol knn --data data/fmnist --submit --cluster local  # SLURM jobs

Every ``--interval`` seconds the watcher lists ``runs/<name>/exports/step_*`` directories that carry the
``COMPLETE`` marker (an export being written has none and is not looked at) and, oldest first, runs
``python -m evals.run --checkpoint <export> --protocol P ...`` for every protocol whose result file
(``runs/<name>/evals/step_N/<result>.json``, written atomically at the end) does not exist yet. A
result's name holds its recipe id (protocol settings with the overrides, and the evaluation data's
content; see :mod:`evals.results`), which the watcher computes before running, so the result file is
the record of "done" for exactly that recipe: restarting the watcher never repeats an evaluation, and
watching with other settings or data evaluates again into new files without touching the old ones.

Purges: ``evals.run`` reads an export consistently (the marker is checked before and after reading
every file) and exits with 4 when the export disappeared or changed meanwhile; the watcher then logs
"skipped" and moves on (it also treats any failure of an export that is no longer complete that way).
Other failures are recorded in ``<result>.failed.json`` (with the log tail) so they are not retried
forever; delete that file to retry. Input errors (exit 2) on a complete export stop the watcher: every
later export would fail the same way. Evaluation logs: ``runs/<name>/evals/step_N/<result>.log``.
A lock (``.<result>.lock``, ``flock``) keeps two watchers from evaluating the same export at once.

``--submit`` sends each evaluation to SLURM with submitit (one job per export and protocol, logs in
``runs/<name>/slurm/evals/``); ``<result>.submitted.json`` (job id, command) marks it as handed over.
The job runs the same ``python -m evals.run`` command, so the result file appears when it finishes.
Jobs are sized by the cluster profile (``--cluster SITE`` or ``$SSL_CLUSTER``, as for
``launch/slurm.py``; see :mod:`evals.submit`): its partition, account, QOS, constraint, CPUs per rank,
one GPU when the nodes have GPUs, ``eval_time``, setup lines and environment; every flag of the SLURM
group overrides its key. A job SLURM refuses stops the watcher with one line naming the request and
SLURM's reason (exit 2); a controller that does not answer exits 1.

The watcher stops by itself once the run's final export (``train.steps`` of ``runs/<name>/config.yaml``)
has been handled, after ``--max-idle`` seconds without a new export, or with ``--once``;
``--forever`` disables the first rule. Exit codes: 0, 2 bad input (also a job SLURM refuses), 1 other
failures (also SLURM not answering).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evals.config import load_eval_config
from evals.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EvalInputError
from evals.export import STEP_DIR, is_complete_export, list_complete_exports
from evals.results import ResultKey, results_dir, setup_logging, write_json_atomic
from evals.run import identify_data, resolve_data_specs, result_key
from evals.submit import (
    EvalCommand,  # noqa: F401  (jobs pickled by earlier versions name evals.watch.EvalCommand)
    SlurmUnavailableError,
    describe_request,
    eval_executor,
    eval_job_parameters,
    load_cluster_profile,
    submit_eval,
)

log = logging.getLogger("evals.watch")

EXIT_VANISHED = 4  # evals.run: the export was purged or rewritten while being read
REPO_ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m evals.watch",
        description="Evaluate every new complete export of a run exactly once (locally or as SLURM jobs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("run_dir", help="the run directory, runs/<name>")
    p.add_argument(
        "--protocol", required=True, help="protocol names, comma-separated (configs/eval/*.yaml stems)"
    )
    p.add_argument("--data", help="passed to evals.run (directory with train/ and test/)")
    p.add_argument("--train-data", help="passed to evals.run")
    p.add_argument("--test-data", help="passed to evals.run")
    p.add_argument("--labels-fraction", type=float, help="passed to evals.run (few-label)")
    p.add_argument("--baseline", choices=["random"], help="passed to evals.run")
    p.add_argument("--device", help="passed to evals.run")
    p.add_argument("--resize", choices=["auto", "center_crop", "resize", "none"], help="passed to evals.run")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between scans (default 60)")
    p.add_argument(
        "--once", action="store_true", help="handle the complete exports that exist now, then exit"
    )
    p.add_argument("--forever", action="store_true", help="keep watching after the run's final export")
    p.add_argument(
        "--max-idle", type=float, help="exit after this many seconds without a new complete export"
    )
    p.add_argument("--nproc", type=int, default=1, help="ranks per local evaluation (torchrun when > 1)")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds one local evaluation may take")
    sub = p.add_argument_group(
        "SLURM (--submit, through submitit; defaults from the cluster profile, like launch/slurm.py)"
    )
    sub.add_argument(
        "--submit", action="store_true", help="submit each evaluation as a SLURM job instead of running it"
    )
    sub.add_argument(
        "--cluster",
        help="cluster profile: a site name in configs/cluster/ or a YAML path (default: $SSL_CLUSTER)",
    )
    sub.add_argument("--partition", help="SLURM partition (default: the profile's)")
    sub.add_argument("--account", help="SLURM account (default: the profile's)")
    sub.add_argument("--qos", help="SLURM QOS (default: the profile's)")
    sub.add_argument("--constraint", help="SLURM constraint (default: the profile's)")
    sub.add_argument(
        "--time", help="job time limit: minutes or [D-]HH:MM:SS (default: the profile's eval_time)"
    )
    sub.add_argument(
        "--gpus",
        type=int,
        help="GPUs (= ranks) per evaluation job (default: 1 where the nodes have GPUs, else 0)",
    )
    sub.add_argument("--cpus-per-task", type=int, help="CPUs per rank (default: the profile's cpus_per_task)")
    sub.add_argument("--mem", help="memory per job in SLURM's form, e.g. 64G (default: the site's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to evals.run")
    return p


@dataclass
class Task:
    """One (export, protocol) evaluation."""

    export: Path
    protocol: str
    key: ResultKey

    @property
    def stem(self) -> str:
        """The result's file stem (``knn-3fa2c1d0``)."""
        return self.key.stem

    @property
    def out_dir(self) -> Path:
        """The export's results directory."""
        return results_dir(self.export)

    @property
    def result(self) -> Path:
        """The result file whose existence means done."""
        return self.key.path(self.out_dir)

    def marker(self, kind: str) -> Path:
        """``<stem>.<kind>.json`` (failed / submitted)."""
        return self.out_dir / f"{self.stem}.{kind}.json"

    @property
    def handled(self) -> bool:
        """Evaluated (also by an earlier version, same recipe), submitted or recorded as failed before."""
        return (
            self.key.existing(self.out_dir) is not None
            or self.marker("submitted").is_file()
            or self.marker("failed").is_file()
        )


def eval_command(task: Task, args: argparse.Namespace, python: str = sys.executable) -> list[str]:
    """The ``evals.run`` command line of a task (torchrun with ``--nproc`` ranks, or ``--gpus`` in a job)."""
    cmd = ["-m", "evals.run", "--checkpoint", str(task.export), "--protocol", task.protocol, "--no-progress"]
    for flag in ("data", "train_data", "test_data", "labels_fraction", "baseline", "device", "resize"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    cmd += list(args.overrides)
    nproc = max(1, args.gpus or 0) if args.submit else args.nproc
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            *cmd,
        ]
    return [python, *cmd]


@contextlib.contextmanager
def task_lock(task: Task) -> Iterator[bool]:
    """Non-blocking exclusive lock of a task (False when another watcher holds it)."""
    task.out_dir.mkdir(parents=True, exist_ok=True)
    path = task.out_dir / f".{task.stem}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def make_executor(args: argparse.Namespace, run_dir: Path) -> tuple[Any, str]:
    """A submitit executor for evaluation jobs (``--submit``) and a description of what it asks SLURM for.

    Raises:
        EvalInputError: unknown cluster profile, invalid flags, or SLURM / submitit not installed.
    """
    profile, origin = load_cluster_profile(args.cluster)
    params = eval_job_parameters(
        profile,
        f"{run_dir.name}-eval",
        gpus=args.gpus,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
    )
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    request = f"{describe_request(params)}; cluster profile {origin}"
    return eval_executor(run_dir / "slurm" / "evals" / "%j", profile, params), request


class Watcher:
    """The polling loop (see the module docstring).

    Args:
        args: parsed command line.
        executor_factory: builds the submitit executor for ``--submit`` (replaceable in tests).
    """

    def __init__(
        self, args: argparse.Namespace, executor_factory: Callable[..., Any] = make_executor
    ) -> None:
        self.args = args
        self.run_dir = Path(args.run_dir)
        self.protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
        self.configs: dict[str, Any] = {}
        for protocol in self.protocols:  # validates names and overrides before anything runs
            overrides = list(args.overrides)
            if args.labels_fraction is not None:
                overrides.append(f"data.labels_fraction={args.labels_fraction}")
            if args.resize is not None:
                overrides.append(f"data.resize={args.resize}")
            self.configs[protocol] = load_eval_config(protocol, None, overrides)[1]
        self._keys: dict[str, ResultKey] = {}
        self.executor_factory = executor_factory
        self._executor: Any = None
        self._request = ""
        self.evaluated: list[Task] = []
        self.skipped: list[Task] = []
        self.failed: list[Task] = []

    def final_step(self) -> int | None:
        """``train.steps`` of the run's resolved config (``None`` when unknown)."""
        try:
            cfg = yaml.safe_load((self.run_dir / "config.yaml").read_text()) or {}
            return int(cfg["train"]["steps"])
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
            return None

    def key(self, protocol: str) -> ResultKey:
        """The result key of ``protocol`` with this watcher's settings and data (computed once).

        The data are resolved as ``evals.run`` resolves them (``--data``/``--train-data``/``--test-data``,
        the config's ``data.train``/``data.test``, else the run's ``data.shards``), so the name matches
        the file ``evals.run`` writes.
        """
        if protocol not in self._keys:
            cfg = self.configs[protocol]
            a = self.args
            train, test, _ = resolve_data_specs(a.data, a.train_data, a.test_data, cfg, self.run_dir)
            train_id = identify_data(train, "training data") if train else None
            test_id = identify_data(test, "test data")
            seed = int(cfg.seed) if a.baseline == "random" else None
            self._keys[protocol] = result_key(protocol, cfg, train_id, test_id, seed)
        return self._keys[protocol]

    def pending(self) -> list[Task]:
        """Tasks of complete exports that have not been handled, oldest export first."""
        tasks = []
        for export in list_complete_exports(self.run_dir / "exports"):
            for protocol in self.protocols:
                task = Task(export, protocol, self.key(protocol))
                if not task.handled:
                    tasks.append(task)
        return tasks

    def handle(self, task: Task) -> None:
        """Evaluate or submit one task, and record what happened."""
        with task_lock(task) as locked:
            if not locked or task.handled:
                return
            if not is_complete_export(task.export):
                log.info("%s: no longer a complete export (purged); skipped", task.export)
                self.skipped.append(task)
                return
            if self.args.submit:
                self._submit(task)
            else:
                self._run(task)

    def _submit(self, task: Task) -> None:
        if self._executor is None:
            self._executor, self._request = self.executor_factory(self.args, self.run_dir)
        command = eval_command(task, self.args)
        job_id = submit_eval(self._executor, command, REPO_ROOT, self._request)
        write_json_atomic(
            task.marker("submitted"),
            {"job_id": job_id, "command": command, "time": time.time(), "export": str(task.export)},
        )
        log.info("%s %s: submitted job %s (%s)", task.export.name, task.protocol, job_id, self._request)
        self.evaluated.append(task)

    def _run(self, task: Task) -> None:
        command = eval_command(task, self.args)
        log_path = task.out_dir / f"{task.stem}.log"
        log.info("%s %s: %s", task.export.name, task.protocol, " ".join(command))
        started = time.perf_counter()
        with open(log_path, "w") as logf:
            try:
                code = subprocess.run(
                    command,
                    cwd=str(REPO_ROOT),
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    timeout=self.args.timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
        tail = log_path.read_text(errors="replace")[-3000:]
        if code == 0 and task.result.is_file():
            log.info(
                "%s %s: done in %.0fs -> %s",
                task.export.name,
                task.protocol,
                time.perf_counter() - started,
                task.result,
            )
            self.evaluated.append(task)
            return
        if code == EXIT_VANISHED or not is_complete_export(task.export):
            log.warning(
                "%s %s: the export was purged while being read; skipped", task.export.name, task.protocol
            )
            self.skipped.append(task)
            return
        write_json_atomic(task.marker("failed"), {"exit_code": code, "command": command, "log_tail": tail})
        self.failed.append(task)
        if code == EXIT_BAD_INPUT:
            raise EvalInputError(
                f"{task.export} {task.protocol}: evals.run rejected its input:\n{tail.strip()}"
            )
        log.error(
            "%s %s: failed with exit code %s (log: %s); recorded in %s",
            task.export.name,
            task.protocol,
            code,
            log_path,
            task.marker("failed"),
        )

    def loop(self) -> int:
        """Watch until done; return the exit code."""
        if not self.run_dir.is_dir():
            raise EvalInputError(f"run directory {self.run_dir} does not exist")
        last_new = time.monotonic()
        seen: set[str] = set()
        while True:
            for task in self.pending():
                if task.export.name not in seen:
                    seen.add(task.export.name)
                    last_new = time.monotonic()
                self.handle(task)
            if self.args.once:
                return EXIT_OK
            final = self.final_step()
            if not self.args.forever and final is not None and self._final_handled(final):
                log.info("the final export (step %d) is handled; exiting", final)
                return EXIT_OK
            if self.args.max_idle is not None and time.monotonic() - last_new > self.args.max_idle:
                log.info("no new export for %.0fs; exiting", self.args.max_idle)
                return EXIT_OK
            time.sleep(self.args.interval)

    def _final_handled(self, final: int) -> bool:
        exports = self.run_dir / "exports"
        for export in list_complete_exports(exports):
            m = STEP_DIR.match(export.name)
            if m and int(m.group(1)) >= final:
                return all(Task(export, p, self.key(p)).handled for p in self.protocols)
        return False


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = parser().parse_intermixed_args(argv)
    setup_logging()
    try:
        watcher = Watcher(args)
        code = watcher.loop()
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SlurmUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("watcher failed")
        return EXIT_FAILED
    summary = {
        "evaluated": [f"{t.export.name}/{t.stem}" for t in watcher.evaluated],
        "skipped": [f"{t.export.name}/{t.stem}" for t in watcher.skipped],
        "failed": [f"{t.export.name}/{t.stem}" for t in watcher.failed],
    }
    print(json.dumps(summary), flush=True)
    return EXIT_FAILED if watcher.failed else code


if __name__ == "__main__":
    sys.exit(main())

"""What runs inside every SLURM task: the submitit callables of a pretraining run and of its evals.

``PretrainJob`` is pickled by ``launch/slurm.py`` and called by submitit in every task (one task per
GPU). It exports submitit's ``TorchDistributedEnvironment`` to the usual variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; the port chosen by
:func:`master_port`) and calls ``pretrain.train.run(cfg)``; never torchrun inside submitit.

Stop signals. Before the slow imports, ``__call__`` makes USR2 (submitit's signal) and SIGTERM only set
the stop flag (``pretrain.preemption``) on every rank; the ranks agree on it at the next step boundary
(a CPU all-reduce), all save that step together (DCP; ``COMPLETE`` is written after every shard), and
``run`` returns 3. What happens then depends on the signal:

- USR2 (``#SBATCH --signal=USR2@<signal_delay_s>`` before the time limit, or ``scancel --signal=USR2``):
  save and requeue. Only after the save, rank 0 runs submitit's own USR2 handler, which it had kept
  aside: timeout accounting (``max_num_timeout``), re-dump of the job pickle with the remaining
  timeouts, ``scontrol requeue <same job id>``, exit. Other ranks exit 0 without a result. Submitit's
  handler would otherwise run ``checkpoint()`` on rank 0 inside the signal handler and requeue at once,
  racing a sharded save. Requeues are bounded: time-limit requeues by ``max_timeouts``, every restart
  of the job by ``max_requeues`` (``SLURM_RESTART_COUNT``); past a bound the job fails cleanly, its
  newest checkpoint complete. The requeued job (same id, same run directory, derived from
  ``run.name``) resumes from that step.
- SIGTERM: save and stop; the job never requeues itself. SLURM sends SIGTERM to every process of the
  job, then SIGKILL ``KillWait`` seconds later, when a job is cancelled (plain ``scancel``), requeued
  by ``scontrol requeue`` or by preemption, or reaches its time limit: the save must fit in KillWait.
  Every rank exits 3 without a traceback; after ``scancel`` the job ends CANCELLED, after ``scontrol
  requeue`` SLURM restarts it and it resumes from that step. A save cut by SIGKILL has no ``COMPLETE``
  and is ignored: the next start resumes from the newest complete (periodic) checkpoint. (Submitit
  itself ignores SIGTERM: without this, a cancelled job saved nothing.)

A rank that dies ends the job: srun runs with ``--kill-on-bad-exit=1``, and the others would also fail
at the collective timeout (``engine.timeout_s``).
"""

from __future__ import annotations

import faulthandler
import hashlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("launch")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3  # pretrain.train's exit codes

EPHEMERAL_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
MASTER_PORT_LOW = 20000  # below: well-known and common service ports (e.g. slurmctld 6817)
MASTER_PORT_FALLBACK = (20000, 32767)  # below Linux's default ephemeral range 32768-60999


class JobFailed(RuntimeError):
    """The run cannot continue (bad config, requeue bound reached, ...): the job ends FAILED."""


def _setup_logging(rank: int) -> None:
    # Same format as `python -m pretrain.train`: rank 0 logs INFO, other ranks warnings only.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    logging.getLogger("submitit").propagate = False  # it has its own handler: no double lines


class PretrainJob:
    """submitit callable: one rank of a pretraining run.

    Args:
        config_yaml: the resolved config (``pretrain.config.to_yaml``), fixed at submission so that
            every rank and every requeued attempt trains the same thing.
        workdir: directory the job runs in (relative ``run.root`` and ``data.shards`` resolve there).
        max_requeues: restarts of this job (any cause) after which a stop request ends it instead.
        gpus_per_node: > 0 exports CUDA_VISIBLE_DEVICES=<local rank> for each task.
    """

    def __init__(self, config_yaml: str, workdir: str, max_requeues: int, gpus_per_node: int) -> None:
        self.config_yaml = config_yaml
        self.workdir = workdir
        self.max_requeues = max_requeues
        self.gpus_per_node = gpus_per_node

    def __call__(self) -> dict[str, Any]:
        import submitit

        from pretrain import preemption  # no torch import: the handler is in place ~1 s after start

        # First of all, before the slow imports: a signal from now on only sets the stop flag.
        # Keep submitit's USR2 handler: it runs later, after the save (see the module docstring).
        usr_sig = submitit.JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        deferred_handler = signal.getsignal(usr_sig)
        preemption.clear()
        # SIGTERM too (scancel, scontrol requeue, time limit, preemption): submitit's handler ignores it,
        # and the job would save nothing before SIGKILL comes KillWait seconds later.
        preemption.install_handlers((usr_sig, signal.SIGTERM))

        from pretrain.config import load_config
        from pretrain.distributed import exit_process_at_exit, shutdown
        from pretrain.train import bad_input_errors, failure_errors, run

        faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
        os.chdir(self.workdir)
        job_env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        # submitit would take Random(job id).randint(20000, 60000), inside Linux's ephemeral range: an
        # outgoing connection on the master node may hold that port (EADDRINUSE). It reads MASTER_PORT.
        os.environ["MASTER_PORT"] = str(master_port(job_env.job_id, restarts))
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        if self.gpus_per_node > 0:
            gpu = gpu_for_rank(
                os.environ.get("CUDA_VISIBLE_DEVICES"), dist_env.local_rank, dist_env.local_world_size
            )
            if gpu is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        _setup_logging(dist_env.rank)
        # Every attempt appends to the same logs: mark where this one starts in stderr too (the log
        # lines go to stdout), for readers and for launch/status.py's "why it failed".
        print(
            f"launch: job {job_env.job_id} attempt {restarts + 1} rank {dist_env.rank} started",
            file=sys.stderr,
            flush=True,
        )
        log.info(
            "job %s attempt %d: rank %d/%d on %s (master %s:%s)",
            job_env.job_id,
            restarts + 1,
            dist_env.rank,
            dist_env.world_size,
            os.environ.get("SLURMD_NODENAME", job_env.hostname),
            dist_env.master_addr,
            dist_env.master_port,
        )
        try:
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="ssl-config-") as f:
                f.write(self.config_yaml)
                f.flush()
                cfg = load_config(f.name, [], world_size=dist_env.world_size)
            code = run(cfg)
        except bad_input_errors() as e:
            # Bad input (exit code 2 of pretrain.train): a requeue would fail the same way.
            raise JobFailed(f"{type(e).__name__}: {e}") from None
        except failure_errors() as e:
            # A non-finite loss, a failed checkpoint write, a peer that stalled or died: the message says
            # what happened and from which checkpoint the same command resumes.
            raise JobFailed(f"{type(e).__name__}: {e}") from None
        finally:
            shutdown()
        run_dir = str(Path(cfg.run.root) / cfg.run.name)
        if code == EXIT_OK:
            # submitit writes this result, then the process exits 0 without tearing down the
            # interpreter (see pretrain.distributed.exit_process: a finished run must not abort there).
            exit_process_at_exit(0)
            return {"rank": dist_env.rank, "run_dir": run_dir, "finished": True}
        if code != EXIT_STOPPED:
            raise JobFailed(f"pretrain.train.run returned {code} (see the log above); run dir {run_dir}")
        # Stopped on a signal: every rank has saved the same step (the save ends with a barrier after
        # the COMPLETE marker), so requeueing or exiting now cannot cut a save short.
        if preemption.stop_reason() == "SIGTERM":
            # scancel = save and stop. SLURM decides what follows (cancelled: the job ends; scontrol
            # requeue or preemption: it restarts and resumes here); SIGKILL comes after KillWait.
            if dist_env.rank == 0:
                log.warning(
                    "stopped by SIGTERM (scancel, scontrol requeue, a time limit or preemption) with a "
                    "complete checkpoint in %s; the job does not requeue itself. To continue, submit the "
                    "same command again (a job SLURM requeues resumes by itself).",
                    run_dir,
                )
            exit_process_at_exit(EXIT_STOPPED)
            sys.exit(EXIT_STOPPED)  # no traceback, no result file
        if dist_env.rank != 0:
            log.warning("checkpoint saved after %s; rank 0 requeues the job", preemption.stop_reason())
            exit_process_at_exit(0)
            sys.exit(0)  # no result file: the requeued attempt writes it
        if restarts >= self.max_requeues:
            raise JobFailed(
                f"stopped by {preemption.stop_reason()} with a complete checkpoint in {run_dir}, but not "
                f"requeued: the job was already restarted {restarts} time(s) (max_requeues="
                f"{self.max_requeues}). Submit the same command again to continue."
            )
        if not callable(deferred_handler):  # not under submitit's signal handling (e.g. a direct call)
            return {"rank": dist_env.rank, "run_dir": run_dir, "finished": False}
        log.warning(
            "checkpoint saved after %s: handing over to submitit to requeue", preemption.stop_reason()
        )
        # submitit: timeout accounting, checkpoint() -> re-dumped pickle, `scontrol requeue`, exit;
        # or UncompletedJobError ("timed-out too many times") -> the job fails with our checkpoint.
        deferred_handler(usr_sig, None)
        return {"rank": dist_env.rank, "run_dir": run_dir, "finished": False}  # not reached under submitit

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 (see the module docstring): resubmit the same job.

        The training state lives in the run directory, so there is nothing to save here. Submitit
        only calls this from inside its signal handler when USR2 arrives before ``__call__`` has
        taken over the signal (nothing trained yet); then the job requeues at once and resumes
        from the newest complete checkpoint.
        """
        import submitit

        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) >= self.max_requeues:
            return None  # submitit: "checkpoint function returned None" -> not requeued, the job fails
        return submitit.helpers.DelayedSubmission(
            PretrainJob(self.config_yaml, self.workdir, self.max_requeues, self.gpus_per_node)
        )


def ephemeral_port_range(path: Path = EPHEMERAL_PORT_RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's ephemeral (outgoing) port range ``(low, high)``, or None when it cannot be read."""
    try:
        low, high = (int(v) for v in path.read_text().split()[:2])
    except (OSError, ValueError):
        return None
    return (low, high) if 0 < low <= high <= 65535 else None


def master_port(job_id: str, restart_count: int, ephemeral: tuple[int, int] | None = None) -> int:
    """MASTER_PORT of one attempt of a job: the same on every rank, outside the ephemeral port range.

    Every rank knows the job id and ``SLURM_RESTART_COUNT``, so all derive the same port without
    talking to each other. A port inside the ephemeral range can already be held by any outgoing
    connection on the master node (the rendezvous then fails with EADDRINUSE), so the port is drawn
    from ``[MASTER_PORT_LOW, low)`` and ``(high, 65535]`` of that range (``ephemeral``, default: read from
    /proc on this node; nodes of one cluster share the setting). The restart count is part of the draw,
    so a requeued attempt does not reuse the port that its killed predecessor may still hold.
    Unreadable range, or no room outside it: ``MASTER_PORT_FALLBACK`` (below Linux's default range).
    """
    if ephemeral is None:
        ephemeral = ephemeral_port_range()
    spans: list[tuple[int, int]] = []  # inclusive ranges of allowed ports
    if ephemeral is not None:
        low, high = ephemeral
        if low - 1 >= MASTER_PORT_LOW:
            spans.append((MASTER_PORT_LOW, low - 1))
        if high + 1 <= 65535:
            spans.append((max(high + 1, MASTER_PORT_LOW), 65535))
    if not spans:
        spans = [MASTER_PORT_FALLBACK]
    total = sum(b - a + 1 for a, b in spans)
    digest = hashlib.sha256(f"{job_id}:{restart_count}".encode()).digest()
    index = int.from_bytes(digest[:8], "big") % total
    for a, b in spans:
        if index <= b - a:
            return a + index
        index -= b - a + 1
    raise AssertionError("unreachable")


def gpu_for_rank(visible: str | None, local_rank: int, local_world_size: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for one task: its own GPU among those SLURM made visible to the task.

    Unset (no GRES binding): GPU ``local_rank``. One entry: SLURM already bound the task; keep it.
    At least one entry per local rank: the ``local_rank``-th entry (an id, not an index: a job may hold
    GPUs 4-7 of a node). Otherwise None: leave it, ``pretrain.distributed`` takes local_rank modulo
    the visible count.
    """
    if visible is None or not visible.strip():
        return str(local_rank)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if len(entries) == 1:
        return entries[0]
    if len(entries) >= local_world_size and local_rank < len(entries):
        return entries[local_rank]
    return None


def eval_command(python: str, checkpoint: str, protocol: str) -> list[str]:
    """The command of an eval job: ``protocol`` on the export ``checkpoint``.

    ``checkpoint`` is ``<run dir>/exports/latest`` for evals that wait for pretraining (the export that
    is newest when they start), or a finished run's final ``exports/step_N``.
    """
    return [python, "-m", "evals.run", "--checkpoint", checkpoint, "--protocol", protocol]

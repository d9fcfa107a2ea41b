"""What runs inside every SLURM task: the submitit callables of a pretraining run and of its evals.

``PretrainJob`` is pickled by ``launch/slurm.py`` and called by submitit in every task (one task per
GPU). It exports submitit's ``TorchDistributedEnvironment`` to the usual variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and calls
``pretrain.train.run(cfg)``; never torchrun inside submitit.

Preemption and time limits (the sequence, see also README "Launch on SLURM"):

1. SLURM sends submitit's signal (USR2; ``#SBATCH --signal=USR2@<signal_delay_s>`` before the time
   limit, or ``scancel --signal=USR2``) to every task.
2. Before training, ``__call__`` replaced submitit's USR2 handler by one that only sets the stop
   flag (``pretrain.preemption``), on every rank. Submitit's own handler would call
   ``checkpoint()`` on rank 0 inside the signal handler and requeue at once, racing a sharded save.
3. The ranks agree on the flag at the next step boundary (a CPU all-reduce), all save that step
   together (DCP; ``COMPLETE`` is written after every shard), and ``run`` returns 3.
4. Only then rank 0 runs submitit's deferred handler: timeout accounting (``max_num_timeout``),
   re-dump of the job pickle with the remaining timeouts, ``scontrol requeue <same job id>``,
   exit. Other ranks exit 0 without a result. Requeues are bounded: time-limit requeues by
   ``max_timeouts``, every restart of the job by ``max_requeues`` (``SLURM_RESTART_COUNT``);
   past a bound the job fails cleanly, its newest checkpoint complete.
5. The requeued job (same id, same run directory, derived from ``run.name``) resumes from that step.

``scontrol requeue`` sends no USR2 (SIGTERM, then SIGKILL after KillWait; submitit ignores SIGTERM):
the next attempt resumes from the last periodic checkpoint. A rank that dies ends the job: srun runs
with ``--kill-on-bad-exit=1``, and the others would also fail at the collective timeout
(``engine.timeout_s``).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("launch")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3  # pretrain.train's exit codes


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
        # Keep submitit's handler: it runs later, after the save (step 4 of the module docstring).
        usr_sig = submitit.JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        deferred_handler = signal.getsignal(usr_sig)
        preemption.clear()
        preemption.install_handlers((usr_sig,))

        from data_pipelines.loader import CorruptDataError, ShardSpecError
        from pretrain.checkpoint import CheckpointError
        from pretrain.config import ConfigError, load_config
        from pretrain.distributed import exit_process_at_exit, shutdown
        from pretrain.train import run

        faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
        os.chdir(self.workdir)
        job_env = submitit.JobEnvironment()
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
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
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
        except (ConfigError, CheckpointError, ShardSpecError, CorruptDataError) as e:
            # Bad input (exit code 2 of pretrain.train): a requeue would fail the same way.
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
        # Stopped on the preemption signal: every rank has saved the same step (the save ends with a
        # barrier after the COMPLETE marker), so requeueing now cannot cut a save short.
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


class EvalJob:
    """submitit callable: one evaluation protocol on the run's latest export (``evals.run``)."""

    def __init__(self, command: list[str], workdir: str) -> None:
        self.command = command
        self.workdir = workdir

    def __call__(self) -> int:
        print("running:", " ".join(self.command), flush=True)
        proc = subprocess.run(self.command, cwd=self.workdir, check=False)
        if proc.returncode != 0:
            raise JobFailed(f"{' '.join(self.command)} exited with {proc.returncode}")
        return proc.returncode

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Preempted evals start over: they are pure functions of an export."""
        import submitit

        return submitit.helpers.DelayedSubmission(EvalJob(self.command, self.workdir))


def eval_command(python: str, run_dir: str, protocol: str) -> list[str]:
    """The command of an eval job: the protocol on the run's newest export (``exports/latest``)."""
    return [python, "-m", "evals.run", "--checkpoint", f"{run_dir}/exports/latest", "--protocol", protocol]

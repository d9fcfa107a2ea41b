"""Entry point of every rank: ``python -m pretrain.train --config RECIPE.yaml [key=value ...]``.

One process: ``python -m pretrain.train --config configs/mae/tiny_fmnist.yaml``.
N ranks (FSDP2; gloo on CPU, NCCL on GPU): ``torchrun --nproc_per_node N -m pretrain.train ...``.
Run the same command again after any interruption: it resumes from the newest COMPLETE
checkpoint in ``runs/<run.name>/`` and continues exactly where it was.

Exit codes: 0 finished (or already finished), 2 bad config or input, 3 stopped on request with a
checkpoint saved (run again to continue), 1 any other failure (non-finite loss, I/O, ...).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3

log = logging.getLogger("pretrain")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description=(
            "Pretrain a ViT with a self-supervised method (MAE, ...) on WebDataset shards. "
            "Resumes automatically from runs/<run.name>/checkpoints."
        ),
        epilog=(
            "examples:\n"
            "  python -m pretrain.train --config configs/mae/tiny_fmnist.yaml\n"
            "  python -m pretrain.train --config configs/mae/tiny_fmnist.yaml train.steps=50 run.name=try1\n"
            "  torchrun --nproc_per_node 2 -m pretrain.train --config configs/mae/tiny_fmnist.yaml\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/mae/vit_l16_in1k.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


class CollectiveError(RuntimeError):
    """A collective failed because a peer rank stalled (timeout) or died (its connection closed)."""


_PEER_LOST = re.compile(
    r"connection (reset|closed) by peer|broken pipe|remote process exited|socket closed|"
    r"ncclRemoteError|NCCL communicator was aborted",
    re.IGNORECASE,
)


def collective_failure(exc: BaseException) -> str | None:
    """``"timeout"`` or ``"peer lost"`` when ``exc`` is a process-group operation that failed because of
    another rank (gloo or NCCL), else None."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if not re.search(r"gloo|nccl|recv|send|collective|all_?reduce|all_?gather|barrier|Work|c10d", text, re.I):
        return None
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return "timeout"
    if _PEER_LOST.search(text):
        return "peer lost"
    return None


def _agree_or_raise(env: Any, error: BaseException | None, what: str) -> None:
    """All ranks learn whether rank 0's ``what`` failed; non-zero ranks then stop without waiting."""
    from pretrain.distributed import agree_each

    (failed,) = agree_each(env, [error is not None])
    if error is not None:
        raise error
    if failed:
        raise RankZeroFailedError(f"rank 0 could not {what} (its log says why)")


class RankZeroFailedError(RuntimeError):
    """Rank 0 failed a set-up step that every rank depends on; its own log holds the reason."""


def run(cfg: Any) -> int:
    """Train according to a resolved config inside an already configured process environment.

    Order: take the run directory (rank 0), check the saved config, build method, engine and
    loader, resume, and only then write ``config.yaml``: a config that cannot be built never
    locks the run name.
    """
    from pretrain.config import check_run_config
    from pretrain.distributed import init_distributed
    from pretrain.engines import needs_process_group
    from pretrain.run_lock import RunLock

    env = init_distributed(cfg.engine.timeout_s, require_group=needs_process_group(cfg.engine.name))
    run_dir = Path(cfg.run.root) / cfg.run.name
    lock = RunLock(run_dir) if env.is_main else None
    error: BaseException | None = None
    if lock is not None:
        try:
            lock.acquire()
            check_run_config(cfg, run_dir)
        except BaseException as e:
            lock.release()
            error = e
    _agree_or_raise(env, error, "take the run directory")
    try:
        return _run_owned(cfg, env, run_dir)
    finally:
        if lock is not None:
            lock.release()


def steps_per_epoch(cfg: Any) -> int | None:
    """``train.steps_per_epoch``, else the shard manifest's sample count // global batch (None: unknown)."""
    if cfg.train.steps_per_epoch:
        return int(cfg.train.steps_per_epoch)
    if cfg.data.backend == "synthetic":
        return None
    from data_pipelines.wds import resolve_shards

    manifest = resolve_shards(cfg.data.shards).manifest or {}
    samples = manifest.get("num_samples")
    if not isinstance(samples, int) or samples <= 0:
        return None
    return max(1, samples // int(cfg.train.global_batch_size))


def make_run_info(cfg: Any, env: Any) -> Any:
    """The run's facts as methods see them (:class:`pretrain.methods.context.RunInfo`)."""
    from pretrain.methods.context import RunInfo

    return RunInfo(
        total_steps=int(cfg.train.steps),
        steps_per_epoch=steps_per_epoch(cfg),
        global_batch_size=int(cfg.train.global_batch_size),
        accum_steps=int(cfg.train.accum_steps),
        world_size=env.world_size,
        rank=env.rank,
        seed=int(cfg.run.seed),
    )


def visual_batch(cfg: Any, views: list[Any]) -> dict[str, Any] | None:
    """The fixed batch a method visualises (``train.visualize_every``), the same on every rank.

    The first ``train.visualize_samples`` samples of a one-process, worker-less read of the run's data
    with its seed: a pure function of the config, so the same images are shown after a resume, at
    any world size. DALI runs read it through the CPU loader (same samples, no second DALI graph).
    """
    if not cfg.train.visualize_every:
        return None
    from dataclasses import replace

    from omegaconf import OmegaConf

    from data_pipelines.loader import LoaderConfig, build_loader

    data = LoaderConfig(**OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    data = replace(data, num_workers=0, backend="wds" if data.backend == "dali" else data.backend)
    batches = build_loader(
        data, views, batch_size=cfg.train.visualize_samples, rank=0, world_size=1, seed=cfg.run.seed
    )
    try:
        return next(batches)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _run_owned(cfg: Any, env: Any, run_dir: Path) -> int:
    from data_pipelines.loader import build_loader
    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import ConfigError, micro_batch_size, write_run_config
    from pretrain.distributed import barrier
    from pretrain.engines import build_engine
    from pretrain.methods import build_method
    from pretrain.metrics import MetricsWriter
    from pretrain.trainer import Trainer

    checkpoints = CheckpointManager(run_dir, env, cfg.train.keep_last, cfg.train.async_checkpoint)
    latest = checkpoints.latest()
    resume_step = int(latest.name.split("_")[1]) if latest else None
    ignored = checkpoints.incomplete_after(resume_step or 0)
    if env.is_main and ignored:
        log.warning(
            "ignoring %s: interrupted save%s without a %s marker (not a checkpoint); %s",
            ", ".join(str(p) for p in ignored),
            "s" if len(ignored) > 1 else "",
            "COMPLETE",
            f"resuming from {latest}" if latest else "starting from step 0",
        )

    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    method = build_method(cfg)
    run_info = make_run_info(cfg, env)
    try:
        method.configure(run_info)
    except ValueError as e:  # a recipe this run cannot follow (e.g. epochs without an epoch length)
        raise ConfigError(f"method.name={cfg.method.name}: {e}") from None
    init_report = None
    if cfg.init["from"]:
        if latest is None:
            from pretrain.init_weights import load_initial_weights

            init_report = load_initial_weights(method, cfg.init["from"])
        else:
            log.info(
                "init.from=%s not used: the run resumes from its checkpoint %s", cfg.init["from"], latest
            )
    engine = build_engine(cfg, env)
    engine.setup(method)

    start_step, resume_s = 0, None
    if latest is not None:
        t0 = time.perf_counter()
        state = checkpoints.load(latest, engine)
        resume_s = time.perf_counter() - t0
        start_step = int(state["step"])
        saved_world = state.get("data", {}).get("world_size", env.world_size)
        if saved_world != env.world_size:
            log.warning(
                "resuming a %d-rank checkpoint on %d ranks: weights and optimizer are resharded; the data "
                "stream continues at the same step but with the new rank/worker split (not the samples "
                "the %d-rank run would have read)",
                saved_world,
                env.world_size,
                saved_world,
            )
        log.info("resumed from %s at step %d (loaded in %.1fs)", latest, start_step, resume_s)
    if start_step >= cfg.train.steps:
        log.info(
            "run %s already finished at step %d (train.steps=%d)", cfg.run.name, start_step, cfg.train.steps
        )
        return EXIT_OK

    loader = build_loader(
        cfg.data,
        method.views(),
        batch_size=micro_batch_size(cfg, env.world_size),
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.run.seed,
        start_batch=start_step * cfg.train.accum_steps,
    )
    # The run is built: only now does its name get a config (a config that fails above locks nothing).
    if env.is_main:
        write_run_config(cfg, run_dir, resume_step)
        if init_report is not None:
            from pretrain.init_weights import write_report

            write_report(run_dir, init_report)
    barrier(env)
    writer = MetricsWriter(run_dir, start_step, env.is_main)
    writer.event(
        "start", step=start_step, world_size=env.world_size, resumed=latest is not None, resume_s=resume_s
    )
    if env.is_main:
        log.info(
            "run %s: %s on %s, %d rank(s) on %s, engine %s, %.2f GFLOP/sample, global batch %d, steps %d -> %d",
            cfg.run.name,
            cfg.method.name,
            cfg.model.name,
            env.world_size,
            env.device,
            type(engine).__name__,
            method.flops_per_sample() / 1e9,
            cfg.train.global_batch_size,
            start_step,
            cfg.train.steps,
        )
    trainer = Trainer(
        cfg, env, engine, iter(loader), checkpoints, writer, run_info, visual_batch(cfg, method.views())
    )
    finished_cleanly = False
    try:
        result = trainer.fit(start_step)
        finished_cleanly = True
    except RuntimeError as e:
        kind = collective_failure(e)
        if kind is None:
            raise
        log.debug("collective failure", exc_info=e)
        latest = checkpoints.latest()
        what = (
            f"a collective operation timed out after engine.timeout_s={cfg.engine.timeout_s} s"
            if kind == "timeout"
            else "a collective operation lost its connection to another rank"
        )
        raise CollectiveError(
            f"{what} during step {trainer.step + 1}: another rank stalled or died (its log says why). The "
            f"last complete checkpoint is {latest or 'none (the run restarts from step 0)'}; run the same "
            "command to resume from it."
        ) from None
    finally:
        # After an error a peer may be gone: complete a background save only if its write is done.
        checkpoints.close(wait=finished_cleanly)
        writer.close()
        close = getattr(loader, "close", None)  # stop loader worker processes now, not at exit
        if close is not None:
            close()
    if result.finished:
        writer.event("finished", step=result.step)
        log.info("finished: %d steps; backbone exported to %s", result.step, run_dir / "exports")
        return EXIT_OK
    return EXIT_STOPPED


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix the input" (exit code 2): a restart or requeue would fail the same way."""
    from data_pipelines.dali import DaliUnavailableError
    from data_pipelines.loader import CorruptDataError, ShardSpecError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.run_lock import RunOwnedError

    return (
        ConfigError,
        CheckpointError,
        ShardSpecError,
        CorruptDataError,
        DaliUnavailableError,
        RunOwnedError,
        RankZeroFailedError,
    )


def failure_errors() -> tuple[type[BaseException], ...]:
    """Errors reported in one line that end the run with exit code 1 (the message says what to do)."""
    from pretrain.checkpoint import CheckpointWriteError
    from pretrain.trainer import NonFiniteLossError

    return (NonFiniteLossError, CheckpointWriteError, CollectiveError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    from pretrain import preemption
    from pretrain.config import ConfigError, load_config, to_yaml
    from pretrain.distributed import shutdown, world_size_from_env

    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size_from_env())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.print_config:
        print(to_yaml(cfg))
        return EXIT_OK
    preemption.install_handlers()
    try:
        return run(cfg)
    except bad_input_errors() as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    except failure_errors() as e:
        log.error("%s", e)
        return EXIT_FAILED
    finally:
        shutdown()


if __name__ == "__main__":
    from pretrain.distributed import exit_process

    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
    exit_process(main())

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


def run(cfg: Any) -> int:
    """Train according to a resolved config inside an already configured process environment."""
    from data_pipelines.loader import build_loader
    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import micro_batch_size, write_or_check_run_config
    from pretrain.distributed import barrier, init_distributed
    from pretrain.engines import build_engine
    from pretrain.methods import build_method
    from pretrain.metrics import MetricsWriter
    from pretrain.trainer import Trainer

    env = init_distributed(cfg.engine.timeout_s, require_group=cfg.engine.name == "fsdp2")
    run_dir = Path(cfg.run.root) / cfg.run.name
    checkpoints = CheckpointManager(
        run_dir, env, cfg.train.keep_last, cfg.train.async_checkpoint, cfg.engine.timeout_s
    )
    latest = checkpoints.latest()
    resume_step = int(latest.name.split("_")[1]) if latest else None
    if env.is_main:
        write_or_check_run_config(cfg, run_dir, resume_step)
    barrier(env)

    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    method = build_method(cfg)
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
    trainer = Trainer(cfg, env, engine, iter(loader), checkpoints, writer)
    finished_cleanly = False
    try:
        result = trainer.fit(start_step)
        finished_cleanly = True
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    from data_pipelines.loader import CorruptDataError, ShardSpecError
    from pretrain import preemption
    from pretrain.checkpoint import CheckpointError, CheckpointWriteError
    from pretrain.config import ConfigError, load_config, to_yaml
    from pretrain.distributed import shutdown, world_size_from_env
    from pretrain.trainer import NonFiniteLossError

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
    except (ConfigError, CheckpointError, ShardSpecError, CorruptDataError) as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    except (NonFiniteLossError, CheckpointWriteError) as e:
        log.error("%s", e)
        return EXIT_FAILED
    finally:
        shutdown()


if __name__ == "__main__":
    from pretrain.distributed import exit_process

    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
    exit_process(main())

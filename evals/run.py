"""Evaluate one exported checkpoint with one protocol.

    python -m evals.run --checkpoint runs/<name>/exports/step_00000300 --protocol knn --data data/fmnist
    python -m evals.run --checkpoint runs/<name>/exports/latest --protocol linear \\
        --train-data data/fmnist/train --test-data data/fmnist/test linear.epochs=20
    python -m evals.run ... --protocol knn --labels-fraction 0.01      # few-label (1 % of the labels)
    python -m evals.run ... --protocol knn --baseline random            # same architecture, random init
    torchrun --nproc_per_node 8 -m evals.run ... --protocol knn         # ranks split the feature extraction

A separate program: it reads only the export (``backbone.safetensors`` + ``backbone.json``, ``COMPLETE``
written last) and the shards, and imports nothing of the trainer. Results go to
``runs/<name>/evals/step_N/<result>.json`` and TensorBoard (``runs/<name>/evals/tb``), see
:mod:`evals.results`.

Exit codes: 0 done; 2 bad input (not a complete export, unknown protocol or key, unusable data, image
size mismatch; the message says what is valid); 4 the export was purged or rewritten while being read
(nothing written; ``evals.watch`` skips it); 1 other failures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from data_pipelines.sequential import EvalTransform, ShardSequence, data_identity
from data_pipelines.wds import ShardSpecError
from evals.config import load_eval_config, protocol_names, section
from evals.context import EvalContext, get_protocol
from evals.distributed import DistEnv, init_distributed, shutdown
from evals.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EvalInputError, ExportVanishedError
from evals.export import Export, load_export, random_init_export
from evals.results import (
    RESULT_FORMAT,
    ResultKey,
    make_recipe,
    recipe_summary,
    results_dir,
    setup_logging,
    tensorboard_dir,
    write_result,
    write_tensorboard,
)

log = logging.getLogger("evals")

EXIT_VANISHED = 4
SIZE_PROBES = 3

EPILOG = """\
data:
  --data DIR            DIR/train and DIR/test (each a shard directory with manifest.json); or, when DIR is
                        itself a shard directory, the test split only (zeroshot, retrieval)
  --train-data/--test-data   the two splits explicitly
  default               data.train/data.test of the config, else the run's config.yaml data.shards (train)
                        and its sibling test/ directory
  build shards: python -m data_pipelines.build_shards fashion-mnist data/fmnist/train --split train
                python -m data_pipelines.build_shards fashion-mnist data/fmnist/test --split test

exit codes: 0 done, 2 bad input, 4 export purged while reading, 1 other failures
"""


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m evals.run",
        description="Evaluate an exported checkpoint (k-NN, linear probe, fine-tuning, zero-shot, retrieval).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="export directory: runs/<name>/exports/step_N or exports/latest"
    )
    p.add_argument(
        "--protocol", help=f"protocol name (a file in configs/eval/): {', '.join(protocol_names())}"
    )
    p.add_argument("--config", help="protocol YAML instead of configs/eval/<protocol>.yaml")
    p.add_argument(
        "--data", help="directory with train/ and test/ shard directories (or a test shard directory)"
    )
    p.add_argument(
        "--train-data", help="labelled training shards (k-NN memory, probe and fine-tuning training set)"
    )
    p.add_argument("--test-data", help="evaluation shards")
    p.add_argument(
        "--labels-fraction",
        type=float,
        help="few-label: keep this fraction of the training labels (0.01, 0.1)",
    )
    p.add_argument(
        "--baseline",
        choices=["random"],
        help="evaluate a randomly initialised encoder of the same architecture",
    )
    p.add_argument(
        "--seed", type=int, help="random-init seed of --baseline random (default: the config's seed)"
    )
    p.add_argument(
        "--resize",
        choices=["auto", "center_crop", "resize", "none"],
        help="data.resize: how images reach the checkpoint's size",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--output", help="results directory (default: runs/<name>/evals/step_N)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard scalars")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="show progress bars"
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. knn.k=[10,20] linear.epochs=5",
    )
    return p


def _shard_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "manifest.json").is_file() or any(path.glob("*.tar")))


def _check_exists(spec: str, what: str) -> None:
    path = Path(spec).expanduser()
    if not path.exists() and not any(ch in spec for ch in "*{"):
        raise EvalInputError(
            f"{what} {spec} does not exist; give a shard directory built by python -m data_pipelines.build_shards "
            f"(e.g. python -m data_pipelines.build_shards fashion-mnist data/fmnist/test --split test)"
        )


def _open(spec: str, what: str) -> ShardSequence:
    _check_exists(spec, what)
    try:
        return ShardSequence(spec)
    except ShardSpecError as exc:
        raise EvalInputError(f"{what} {spec}: {exc}") from None


def identify_data(spec: str, what: str) -> dict[str, Any]:
    """``data_identity`` of a shard spec without opening every shard (for naming a result before running).

    Raises:
        EvalInputError: the shards do not exist or cannot be resolved (same message as ``evals.run``).
    """
    _check_exists(spec, what)
    try:
        return data_identity(spec)
    except (ShardSpecError, OSError) as exc:
        raise EvalInputError(f"{what} {spec}: {exc}") from None


def resolve_data_specs(
    data: str | None,
    train_data: str | None,
    test_data: str | None,
    cfg: Any,
    run_dir: Path | None,
) -> tuple[str | None, str, str]:
    """Which shards an evaluation reads: ``(train spec or None, test spec, how they were found)``.

    See the ``data`` section of ``--help``. Shared with ``evals.watch``, which names a result before
    running it (the data's content is part of the result's key).

    Args:
        data: ``--data``.
        train_data: ``--train-data``.
        test_data: ``--test-data``.
        cfg: the resolved protocol config (``data.train`` / ``data.test``).
        run_dir: the export's run directory (its ``config.yaml`` names the training shards), or ``None``.

    Raises:
        EvalInputError: no test data, or ``--data`` is not a shard directory.
    """
    train, test, how = train_data, test_data, "--train-data/--test-data"
    if data:
        root = Path(data).expanduser()
        if (root / "train").is_dir() or (root / "test").is_dir():
            train = train or (str(root / "train") if _shard_dir(root / "train") else None)
            test = test or (str(root / "test") if _shard_dir(root / "test") else None)
            how = f"--data {data} (train/ and test/)"
        elif _shard_dir(root):
            test = test or str(root)
            how = f"--data {data} (test split)"
        else:
            raise EvalInputError(
                f"--data {data}: expected a directory containing train/ and test/ shard directories, or a shard "
                "directory (manifest.json + shard-*.tar); build them with python -m data_pipelines.build_shards "
                "fashion-mnist DIR/train --split train (and DIR/test --split test)"
            )
    if train is None and cfg.data.train:
        train, how = cfg.data.train, "config data.train/data.test"
    if test is None and cfg.data.test:
        test, how = cfg.data.test, "config data.train/data.test"
    if (train is None or test is None) and run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        try:
            run_cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            run_cfg = {}
        shards = (run_cfg.get("data") or {}).get("shards")
        if shards and Path(shards).is_dir():
            sibling = Path(shards).parent / "test"
            if train is None:
                train, how = shards, f"the run's data.shards ({shards}) and its sibling test/"
            if test is None and Path(shards).name == "train" and _shard_dir(sibling):
                test = str(sibling)
    if test is None:
        raise EvalInputError(
            "no evaluation data: pass --data DIR (with train/ and test/), or --train-data and --test-data "
            "(shard directories built by python -m data_pipelines.build_shards)"
        )
    return train, test, how


def resolve_data(
    args: argparse.Namespace, cfg: Any, export: Export
) -> tuple[ShardSequence | None, ShardSequence, str]:
    """(train, test, how they were found); see :func:`resolve_data_specs`."""
    train, test, how = resolve_data_specs(args.data, args.train_data, args.test_data, cfg, export.run_dir)
    return (_open(train, "training data") if train else None), _open(test, "test data"), how


def result_key(
    name: str,
    cfg: Any,
    train: dict[str, Any] | None,
    test: dict[str, Any],
    random_init_seed: int | None = None,
) -> ResultKey:
    """The key (file name) of a result: protocol, recipe (resolved config + data content), encoder.

    Args:
        name: the protocol name.
        cfg: the resolved protocol config.
        train: ``data_identity`` of the training split, or ``None``.
        test: ``data_identity`` of the test split.
        random_init_seed: the seed of a random-init baseline (``None``: the pretrained encoder).
    """
    impl = str(cfg.protocol)
    sections = {s: section(cfg, s) for s in ("data", "features", impl)}
    recipe = make_recipe(name, impl, sections, train, test)
    return ResultKey(name, recipe, cfg.data.labels_fraction, random_init_seed)


def resolve_transform(
    mode: str, cfg: Any, export: Export, splits: list[tuple[str, ShardSequence]]
) -> EvalTransform:
    """The evaluation transform; ``auto`` picks none / center_crop, and refuses to upsample silently.

    Raises:
        EvalInputError: the data's image size does not match the checkpoint's and no resize mode allows it.
    """
    size = export.img_size
    for what, data in splits:
        n = len(data)
        probes = sorted({0, n // 2, n - 1}) if n else []
        sizes = data.image_sizes(probes[:SIZE_PROBES])
        if not sizes:
            continue
        exact = sizes == {(size, size)}
        larger = all(w >= size and h >= size for w, h in sizes)
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        if (mode == "none" and not exact) or (mode == "auto" and not exact and not larger):
            raise EvalInputError(
                f"image size mismatch: the {what} ({data.shard_set.origin}) has {shown} images but the checkpoint "
                f"{export.path} was trained at {size}x{size}. Pass --resize resize (stretch to {size}x{size}) or "
                f"--resize center_crop (shorter side to {int(size / cfg.data.crop_pct)}, centre crop {size}) to "
                "evaluate anyway, or use data at the checkpoint's size"
            )
        if mode == "auto":
            mode = "none" if exact else "center_crop"
            if mode == "center_crop":
                log.info(
                    "%s images are %s: using the standard resize + centre-crop transform to %d",
                    what,
                    shown,
                    size,
                )
    if mode == "auto":
        mode = "center_crop"
    return EvalTransform(
        size=size,
        resize=mode,
        crop_pct=float(cfg.data.crop_pct),
        interpolation=str(cfg.data.interpolation),
        mean=export.mean,
        std=export.std,
    )


def evaluate(args: argparse.Namespace, env: DistEnv) -> Path | None:
    """Run one evaluation; return the result file on rank 0.

    Raises:
        EvalInputError / ExportVanishedError: bad input.
    """
    overrides = list(args.overrides)
    if args.labels_fraction is not None:
        overrides.append(f"data.labels_fraction={args.labels_fraction}")
    if args.resize is not None:
        overrides.append(f"data.resize={args.resize}")
    name, cfg = load_eval_config(args.protocol, args.config, overrides)
    protocol_fn = get_protocol(cfg.protocol)
    export = load_export(args.checkpoint)
    if args.baseline == "random":
        export = random_init_export(export, seed=cfg.seed if args.seed is None else args.seed)
    train, test, how = resolve_data(args, cfg, export)
    splits = [("test data", test)] + ([("training data", train)] if train is not None else [])
    transform = resolve_transform(str(cfg.data.resize), cfg, export, splits)
    out_dir = results_dir(export.path, args.output)
    train_ident = data_identity(train) if train is not None else None
    test_ident = data_identity(test)
    key = result_key(name, cfg, train_ident, test_ident, export.random_init_seed)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    ctx = EvalContext(
        name=name,
        cfg=cfg,
        export=export,
        env=env,
        transform=transform,
        train_data=train,
        test_data=test,
        cache_dir=None if args.no_cache or not cfg.features.cache else out_dir / "cache",
        progress=progress,
    )
    if env.is_main:
        log.info(
            "%s on %s (%s, step %s%s) | data: %s | %d rank(s) on %s",
            name,
            export.path,
            export.meta.get("arch"),
            export.step,
            ", random init" if export.random_init_seed is not None else "",
            how,
            env.world_size,
            env.device,
        )
    started = time.perf_counter()
    result = protocol_fn(ctx)
    if not env.is_main:
        return None
    assert result is not None
    impl = str(cfg.protocol)
    payload = {
        "format": RESULT_FORMAT,
        "name": key.stem,
        "protocol": name,
        "implementation": impl,
        "source": cfg.source,
        "checkpoint": export.describe(),
        "recipe": key.recipe.describe(),
        "data": {"train": train_ident, "test": test_ident, "found_by": how},
        "transform": transform.describe(),
        "settings": {
            "data": section(cfg, "data"),
            "features": section(cfg, "features"),
            impl: section(cfg, impl),
        },
        "labels_subset": ctx.info.pop("labels_subset", None),
        "metrics": result.pop("metrics"),
        "details": result,
        "info": ctx.info,
        "world_size": env.world_size,
        "device": str(env.device),
        "time_s": round(time.perf_counter() - started, 3),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__},
        "command": " ".join([Path(sys.executable).name, "-m", "evals.run", *sys.argv[1:]]),
    }
    payload["recipe"]["summary"] = recipe_summary(payload)
    path = key.path(out_dir)
    write_result(path, payload)
    if not args.no_tensorboard and export.step is not None:
        write_tensorboard(tensorboard_dir(out_dir), export.step, key, payload["metrics"])
    shown = ", ".join(f"{k} {v:.2f}" for k, v in payload["metrics"].items() if isinstance(v, float))
    print(
        f"{key.stem} @ step {export.step}: {shown}\nrecipe: {payload['recipe']['summary']}\nresults: {path}",
        flush=True,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = parser().parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(f"[rank{rank}] ", logging.INFO if rank == 0 else logging.WARNING)
    env: DistEnv | None = None
    code = EXIT_OK
    try:
        env = init_distributed(args.device)
        # No closing barrier: after the distributed part (feature extraction, or DDP fine-tuning) ranks > 0
        # leave while rank 0 trains a probe or writes results, which may outlast any collective timeout.
        evaluate(args, env)
    except ExportVanishedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_VANISHED
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except Exception:
        log.exception("evaluation failed")
        code = EXIT_FAILED
    finally:
        if env is not None:
            shutdown(env)
    return code


if __name__ == "__main__":
    sys.exit(main())

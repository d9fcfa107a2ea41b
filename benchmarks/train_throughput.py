"""Training throughput: images/s, step time, MFU and peak memory of the real training loop.

Runs ``pretrain.train`` itself (the same loop, engine and loader users run) in subprocesses with a
log interval as the measuring window; the first interval (warm-up, compilation, worker start) is
discarded and the median of the others is reported. With ``--compare-synthetic`` each run is
repeated with ``data.backend=synthetic``, alternating A/B in one invocation; the ratio of step
times (real loader / synthetic data) of each back-to-back pair cancels drift of the machine's
speed between repeats, and the median over pairs tells whether the loader keeps up (target
<= 1.05). ``--variant NAME=OVERRIDES`` (repeatable) compares configurations the same way, e.g. the engines
side by side on one machine: each variant's step time and peak memory, and its step-time ratio to the
first variant within each round.

Examples::

    python benchmarks/train_throughput.py --config configs/mae/tiny_fmnist.yaml --compare-synthetic
    python benchmarks/train_throughput.py --config configs/mae/vit_l16_in1k.yaml --nproc 1 \\
        train.global_batch_size=256 data.backend=synthetic          # one GPU, bf16
    python benchmarks/train_throughput.py --config configs/mae/vit_l16_in1k.yaml --nproc 2 \
        --variant fsdp2="engine.name=fsdp2" \
        --variant zero3="engine.name=deepspeed engine.deepspeed.zero_stage=3" \
        model.img_size=64 train.global_batch_size=8 data.backend=synthetic   # engines, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import train_records


def run_once(args: argparse.Namespace, extra: list[str], workdir: Path, tag: str) -> list[dict]:
    steps = args.interval * (args.windows + 1)
    overrides = [
        f"train.steps={steps}",
        f"train.log_every={args.interval}",
        f"train.ckpt_every={steps}",
        "optim.warmup_steps=0",
        *args.overrides,
        *extra,
    ]
    records = train_records(args.config, overrides, workdir, tag, nproc=args.nproc)
    return [r for r in records if "perf/step_time_s" in r][1:]  # drop the warm-up window


def summarize(windows: list[dict]) -> dict[str, float]:
    def med(key: str) -> float | None:
        vals = [w[key] for w in windows if key in w]
        return statistics.median(vals) if vals else None

    return {
        "images_per_s": med("perf/images_per_s"),
        "step_time_s": med("perf/step_time_s"),
        "mfu": med("perf/mfu"),
        "data_wait_frac": med("perf/data_wait_frac"),
        "memory_gib": med("perf/memory_gib"),
        "tflops_per_s": (med("perf/flops_per_s") or 0) / 1e12,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML (method x model)")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) on this machine")
    p.add_argument("--interval", type=int, default=10, help="steps per measuring window")
    p.add_argument("--windows", type=int, default=3, help="measured windows per run (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, alternated A/B")
    p.add_argument("--compare-synthetic", action="store_true", help="also run data.backend=synthetic")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a configuration to compare (space-separated key=value overrides); repeat for each",
    )
    p.add_argument("--json", help="write the results here too")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    if args.variant and args.compare_synthetic:
        p.error("--variant and --compare-synthetic: one comparison at a time")
    variants: dict[str, list[str]] = {"real": []}
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, sep, overrides = spec.partition("=")
            if not sep or not name:
                p.error(f"--variant {spec!r}: expected NAME=key=value [key=value ...]")
            variants[name] = overrides.split()
    if args.compare_synthetic:
        variants["synthetic"] = ["data.backend=synthetic"]
    results: dict[str, list[dict]] = {k: [] for k in variants}
    per_run: dict[str, list[float]] = {k: [] for k in variants}  # median step time of each run
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(variants.items())
            for name, extra in order if r % 2 == 0 else order[::-1]:  # ABBA: linear drift cancels
                t0 = time.time()
                windows = run_once(args, extra, Path(tmp), f"{name}{r}")
                results[name] += windows
                per_run[name].append(summarize(windows)["step_time_s"])
                print(
                    f"  {name} run {r + 1}/{args.repeats}: {time.time() - t0:.0f}s, "
                    f"median step {per_run[name][-1]:.4f}s",
                    file=sys.stderr,
                )
    summary: dict = {k: summarize(v) for k, v in results.items()}
    if args.variant:  # each variant's step time over the first variant's, run by run (same round)
        first = next(iter(variants))
        for name in variants:
            pairs = [a / b for a, b in zip(per_run[name], per_run[first], strict=True)]
            summary[name][f"ratio_step_time_to_{first}"] = round(statistics.median(pairs), 4)
    if args.compare_synthetic:
        # Paired design: run r of each variant ran back to back (in alternating order), so drift of
        # the machine's speed between repeats cancels in their ratio; the median over pairs is reported.
        pairs = [a / b for a, b in zip(per_run["real"], per_run["synthetic"], strict=True)]
        summary["ratio_real_over_synthetic_step_time"] = statistics.median(pairs)
        summary["ratio_per_repeat"] = [round(x, 4) for x in pairs]
    summary["machine"] = {
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "config": args.config,
        "nproc": args.nproc,
        "overrides": args.overrides,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import torch

        if torch.cuda.is_available():
            summary["machine"]["gpu"] = torch.cuda.get_device_name(0)
        summary["machine"]["torch"] = torch.__version__
    except ImportError:
        pass
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

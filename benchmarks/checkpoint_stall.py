"""Checkpoint cost in the real training loop: training stall per save (async vs blocking) and resume time.

Runs ``pretrain.train`` in subprocesses with a checkpoint every ``--every`` steps, once with
``train.async_checkpoint=true`` and once with ``false``, alternated A/B ``--repeats`` times. Each
save's cost comes from the run's own ``checkpoint`` events in ``metrics.jsonl``: ``stall_s`` is the
time the training loop was stopped for it (staging, waiting for the previous save and writing the
markers for async saves; the whole write for blocking ones), ``total_s`` the time until it was
COMPLETE. The final save of a run is blocking in both modes and is left out; the first save (which
also allocates the reused staging buffers) is reported on its own, the median of the others as the
pause per save. Then each run is resumed for one more step and the load time (``resume_s`` of its
``start`` event) is reported. Also reported: the wall time of each run's training steps, saves
included, as images/s (the step time with a background write running, too).

Examples::

    python benchmarks/checkpoint_stall.py --config configs/mae/tiny_fmnist.yaml \\
        model.name=vit_base_patch16 model.img_size=32 model.patch_size=16
    python benchmarks/checkpoint_stall.py --config configs/mae/vit_l16_in1k.yaml \\
        train.global_batch_size=256 data.backend=synthetic     # one GPU: ViT-L, bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

from harness import train_records

MODES = {"async": "true", "blocking": "false"}


def _train(args: argparse.Namespace, workdir: Path, tag: str, steps: int, extra: list[str]) -> list[dict]:
    overrides = [
        f"train.steps={steps}",
        f"train.ckpt_every={args.every}",
        f"train.log_every={args.every}",
        f"train.keep_last={args.keep_last}",
        "optim.warmup_steps=0",
        "data.backend=synthetic",
        *args.overrides,
        *extra,
    ]
    return train_records(args.config, overrides, workdir, tag)


def measure(args: argparse.Namespace, workdir: Path, mode: str, repeat: int) -> dict[str, float]:
    tag = f"{mode}{repeat}"
    steps = args.every * (args.saves + 1)
    records = _train(args, workdir, tag, steps, [f"train.async_checkpoint={MODES[mode]}"])
    saves = [r for r in records if r.get("event") == "checkpoint" and r["step"] < steps]
    windows = [r for r in records if "perf/step_time_s" in r][1:]  # the first window warms up
    batch = windows[0]["perf/images_per_s"] * windows[0]["perf/step_time_s"] if windows else 0.0
    step_times = [w["perf/step_time_s"] for w in windows]
    resumed = _train(args, workdir, tag, steps + 1, [f"train.async_checkpoint={MODES[mode]}"])
    start = [r for r in resumed if r.get("event") == "start" and r.get("resumed")][-1]
    size = checkpoint_bytes(workdir / tag)
    shutil.rmtree(workdir / tag)  # a ViT-L run keeps ~11 GB of checkpoints: free the disk for the next
    # The first save also allocates (on CUDA: pins) the staging buffers the later ones reuse.
    steady = saves[1:] or saves
    return {
        "checkpoint_gib": size / 2**30,
        "first_stall_s": saves[0]["stall_s"],
        "stall_s": statistics.median(s["stall_s"] for s in steady),
        "complete_s": statistics.median(s["total_s"] for s in steady),
        "window_step_time_s": statistics.median(step_times),
        "images_per_s": batch / statistics.median(step_times) if step_times else 0.0,
        "resume_s": float(start["resume_s"]),
        "saves": len(saves),
    }


def checkpoint_bytes(run_dir: Path) -> int:
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    return sum(f.stat().st_size for f in steps[-1].rglob("*") if f.is_file()) if steps else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML (method x model)")
    p.add_argument("--every", type=int, default=10, help="steps between checkpoints (one log window each)")
    p.add_argument("--saves", type=int, default=4, help="periodic saves per run (the first reported apart)")
    p.add_argument("--keep-last", type=int, default=2, help="train.keep_last")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternated async/blocking")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as tmp:
        for r in range(args.repeats):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                res = measure(args, Path(tmp), mode, r)
                results[mode].append(res)
                print(f"repeat {r} {mode:8s} " + " ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)

    summary = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in results.items() if rs}
    out = {
        "config": args.config,
        "overrides": args.overrides,
        "host": platform.node(),
        "every": args.every,
        "summary": summary,
        "runs": results,
    }
    a, b = summary["async"], summary["blocking"]
    print(
        f"checkpoint {a['checkpoint_gib']:.2f} GiB | first save: async {a['first_stall_s']:.3f}s | "
        f"pause per later save: async {a['stall_s']:.3f}s vs blocking "
        f"{b['stall_s']:.3f}s ({b['stall_s'] / max(a['stall_s'], 1e-9):.1f}x less) | complete after "
        f"{a['complete_s']:.2f}s (async) | images/s {a['images_per_s']:.1f} vs {b['images_per_s']:.1f} | "
        f"resume {a['resume_s']:.2f}s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

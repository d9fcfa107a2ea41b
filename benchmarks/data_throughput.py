"""Data-loader throughput: images/s per backend (wds, dali) x recipe (mae, dino, clip) on the same shards.

Every measurement runs ``data_pipelines.build_loader`` -- what training uses -- in a fresh
subprocess pinned to the same CPU cores, with the same number of workers for both backends (the
DataLoader's ``num_workers`` processes for ``wds``, DALI's ``num_threads`` for ``dali``). Runs
alternate (for each repeat: every recipe, every backend), the first batches of each run are
discarded, and the median of the repeats is reported with the ratio dali / wds. Output: a Markdown
table and a JSON record (command, machine, date, every run).

Shards: ``--shards DIR`` (any shards built by ``data_pipelines.build_shards``; captions are used
for CLIP when the shards have them), or ``--make-shards DIR`` to synthesise realistic JPEGs
(``--num-images`` at ``--image-size``, default 500 x 375 like ImageNet's typical photo, quality
90, each with a caption) from seed photos: ``--photos DIR`` or, if not given, the ImageNet
validation JPEGs bundled in the ``foolbox`` wheel, the Tux Paint stamps, or Fashion-MNIST
(upscaled), whichever is found first. Crops of different position, scale and flip make the images
distinct.

Examples::

    # CPU (the numbers in BENCHMARKS.md): 2 cores for both backends
    python benchmarks/data_throughput.py --make-shards data/bench_jpeg --cpus 0-1 --workers 2
    # GPU target: MAE at 224 on one H100 with at most 4 cores, mixed (nvJPEG / hardware) decoding
    python benchmarks/data_throughput.py --shards /datasets/imagenet/shards/train --device gpu \\
        --recipes mae --backends dali --cpus 0-3 --workers 4 --batch-size 256 --batches 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import ROOT, child_env

sys.path.insert(0, str(ROOT))

RECIPES = ("mae", "dino", "clip")
BACKENDS = ("wds", "dali")


# ------------------------------------------------------------------------------------------------
# Shards of realistic JPEGs


def _seed_images(photos: str | None) -> list[Any]:
    """Seed pictures (PIL images) to cut the benchmark JPEGs from."""
    from PIL import Image

    candidates: list[Path] = []
    if photos:
        candidates = sorted(
            p for p in Path(photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        )
    else:
        try:
            import importlib.util

            spec = importlib.util.find_spec("foolbox")
            if spec and spec.submodule_search_locations:
                data = Path(next(iter(spec.submodule_search_locations))) / "data"
                candidates = sorted(data.glob("imagenet_*.jpg"))
        except (ImportError, ValueError):
            candidates = []
        if not candidates:
            stamps = Path("/usr/share/tuxpaint/stamps")
            candidates = sorted(stamps.rglob("*.png"))[:200] if stamps.is_dir() else []
    seeds = [Image.open(p).convert("RGB") for p in candidates]
    large = [im for im in seeds if min(im.size) >= 128]  # photos, not thumbnails
    if large or seeds:
        return large or seeds
    from data_pipelines import datasets, sources

    directory = datasets.locate_dataset("fashion-mnist")
    images = sources.read_idx(directory / "train-images-idx3-ubyte.gz")[:200]
    return [Image.fromarray(a).convert("RGB") for a in images]


def make_shards(
    out: Path, photos: str | None, num_images: int, size: tuple[int, int], shard_size: int
) -> Path:
    """Synthesise ``num_images`` JPEGs with captions and build shards from them (skipped if done)."""
    import numpy as np
    from PIL import Image

    from data_pipelines.build_shards import build_shards

    shards = out / "shards"
    if (shards / "manifest.json").exists():
        return shards
    seeds = _seed_images(photos)
    rng = np.random.default_rng(0)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["path,caption"]
    w, h = size
    for i in range(num_images):
        src = seeds[i % len(seeds)]
        scale = rng.uniform(0.5, 1.0)
        cw = max(8, int(src.width * scale))
        ch = max(8, min(src.height, int(cw * h / w)))
        x0, y0 = rng.integers(0, src.width - cw + 1), rng.integers(0, src.height - ch + 1)
        crop = src.crop((int(x0), int(y0), int(x0) + cw, int(y0) + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(images / f"{i:06d}.jpg", quality=90)
        rows.append(f"images/{i:06d}.jpg,synthetic photo number {i}")
    (out / "pairs.csv").write_text("\n".join(rows) + "\n")
    build_shards(out / "pairs.csv", shards, shard_size=shard_size, image_format="jpg", progress=False)
    return shards


# ------------------------------------------------------------------------------------------------
# One measurement (runs in a child process)


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Throughput of one (backend, recipe) on ``job["shards"]``; returns images/s and details."""
    import torch

    from data_pipelines.augment import view_recipe
    from data_pipelines.loader import LoaderConfig, build_loader
    from data_pipelines.wds import resolve_shards

    if job.get("cpus"):
        os.sched_setaffinity(0, job["cpus"])
    torch.set_num_threads(1)
    manifest = resolve_shards(job["shards"]).manifest or {}
    text_key = "txt" if job["recipe"] == "clip" and "txt" in manifest.get("members", []) else ""
    cfg = LoaderConfig(
        backend=job["backend"],
        shards=job["shards"],
        num_workers=job["workers"],
        prefetch_factor=job["prefetch"],
        text_key=text_key,
        dali_device=job["device"],
        dali_threads=job["workers"],
        **({"mix_shards": job["mix_shards"]} if job.get("mix_shards") else {}),
    )
    size, sizes = job.get("view_size"), {}
    if size and job["recipe"] == "dino":
        sizes = {"global_size": size, "local_size": max(1, size * 96 // 224)}
    elif size:
        sizes = {"size": size}
    views = view_recipe(job["recipe"], **sizes)
    loader = build_loader(cfg, views, batch_size=job["batch_size"], rank=0, world_size=1, seed=job["seed"])
    sync = torch.cuda.synchronize if job["device"] == "gpu" else (lambda: None)
    try:
        for _ in range(job["warmup"]):
            next(loader)
        sync()
        start = time.perf_counter()
        for _ in range(job["batches"]):
            next(loader)
        sync()
        elapsed = time.perf_counter() - start
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return {
        **job,
        "images_per_s": job["batches"] * job["batch_size"] / elapsed,
        "seconds": elapsed,
        "text": bool(text_key),
        "views": [v.size for v in views],
    }


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"measurement {job['backend']}/{job['recipe']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return cpus


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints a Markdown table and a JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--shards", help="existing shards (directory with manifest.json, glob or brace pattern)"
    )
    where.add_argument(
        "--make-shards", help="directory to synthesise realistic JPEG shards into (kept for reuse)"
    )
    parser.add_argument(
        "--photos", help="seed photos for --make-shards (default: foolbox/Tux Paint/Fashion-MNIST)"
    )
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--image-size", default="500x375", help="WxH of synthesised JPEGs")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="DALI device (wds always uses the CPU)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers (wds) = DALI threads (dali)"
    )
    parser.add_argument("--cpus", help="pin every measurement to these cores, e.g. 0-1 or 0,2")
    parser.add_argument(
        "--view-size",
        type=int,
        default=None,
        help="output side of the views (default: the recipes' 224; DINO's local views scale by 96/224)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=3, help="discarded batches per run")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument(
        "--mix-shards", type=int, default=None, help="data.mix_shards (default: the loader's default)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per (backend, recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the JSON record here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0

    if args.shards:
        shards = args.shards
    else:
        out = Path(args.make_shards) if args.make_shards else Path(tempfile.mkdtemp(prefix="data_bench_"))
        w, h = (int(x) for x in args.image_size.lower().split("x"))
        shards = str(make_shards(out, args.photos, args.num_images, (w, h), args.shard_size))
    recipes = [r for r in args.recipes.split(",") if r]
    backends = [b for b in args.backends.split(",") if b]
    base = {
        "shards": shards,
        "device": args.device,
        "workers": args.workers,
        "cpus": _cpu_list(args.cpus),
        "batch_size": args.batch_size,
        "batches": args.batches,
        "warmup": args.warmup,
        "prefetch": args.prefetch,
        "seed": args.seed,
        "view_size": args.view_size,
        "mix_shards": args.mix_shards,
    }
    runs: list[dict[str, Any]] = []
    for repeat, recipe, backend in itertools.product(range(args.repeats), recipes, backends):
        result = _run_child({**base, "recipe": recipe, "backend": backend, "repeat": repeat})
        runs.append(result)
        print(
            f"  {recipe:5s} {backend:4s} run {repeat + 1}: {result['images_per_s']:8.1f} img/s",
            file=sys.stderr,
        )

    medians = {
        (r, b): statistics.median(x["images_per_s"] for x in runs if x["recipe"] == r and x["backend"] == b)
        for r in recipes
        for b in backends
    }
    header = "| recipe | views | " + " | ".join(f"{b} img/s" for b in backends)
    header += " | dali / wds |" if {"wds", "dali"} <= set(backends) else " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in recipes:
        views = next(x["views"] for x in runs if x["recipe"] == r)
        row = f"| {r} | {len(views)} ({'/'.join(str(v) for v in sorted(set(views), reverse=True))} px) | "
        row += " | ".join(f"{medians[(r, b)]:.1f}" for b in backends)
        if {"wds", "dali"} <= set(backends):
            row += f" | {medians[(r, 'dali')] / medians[(r, 'wds')]:.2f}x"
        lines.append(row + " |")
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {**base, "repeats": args.repeats},
        "medians": {f"{r}/{b}": v for (r, b), v in medians.items()},
        "runs": runs,
    }
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A Markdown table of every run's evaluation results, compared only where they are comparable.

    python -m evals.report runs/*
    python -m evals.report runs/mae_tiny_fmnist --paper configs/paper_results.yaml --json rows.json

One row per result file (``runs/<name>/evals/step_N/<result>.json``): the run, its pretraining
(method, architecture, steps of the export / steps of the run, epochs over its training data), the
encoder (pretrained or random init), the protocol with its recipe (one line, and the recipe id of
:mod:`evals.results`: a hash of the resolved settings and the evaluation data's content), the
evaluation data (train -> test, sample counts) and the headline metric.

Rows are compared only at the same recipe: rows of one recipe are printed together, and the
``vs random init`` cell of a pretrained row is its difference to the random-initialised encoder
evaluated at the *same* export, recipe and data (``--baseline random``); a baseline at another recipe
is never used. The ``paper`` cell shows a published number from ``configs/paper_results.yaml`` only
where method, architecture (name and size), evaluation data (the data set's class and sample counts)
and protocol (all labels) match; otherwise ``-``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from evals.config import REPO_ROOT
from evals.results import headline, load_results, recipe_of, recipe_summary
from pretrain.models import vit_architecture

PAPER_RESULTS = REPO_ROOT / "configs" / "paper_results.yaml"
PROTOCOLS = ("knn", "linear", "finetune", "zeroshot", "retrieval")
SIZE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def load_paper_results(path: Path = PAPER_RESULTS) -> list[dict[str, Any]]:
    """Flatten ``paper_results.yaml``: one dict per published number (method, arch, dataset, protocol,
    eval, metric, value, ...; ``dataset_spec``: the data set's counts from its ``datasets`` section)."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    datasets = tree.get("datasets") or {}
    out = []
    for method, archs in (tree.get("results") or {}).items():
        for arch, entries in (archs or {}).items():
            for key, entry in (entries or {}).items():
                parts = key.split("_")
                protocol = next((p for p in parts if p in PROTOCOLS), None)
                if protocol is None or not isinstance(entry, dict):
                    continue
                i = parts.index(protocol)
                dataset = "_".join(parts[:i])
                out.append(
                    {
                        "method": method,
                        "arch": arch,
                        "key": key,
                        "dataset": dataset,
                        "protocol": protocol,
                        "eval": entry.get("eval", protocol),
                        "metric": parts[i + 1] if len(parts) > i + 1 else "top1",
                        "dataset_spec": datasets.get(dataset),
                        **entry,
                    }
                )
    return out


def _run_info(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    train, data, model = cfg.get("train") or {}, cfg.get("data") or {}, cfg.get("model") or {}
    samples = None
    shards = data.get("shards")
    if shards:
        try:
            samples = json.loads((Path(shards) / "manifest.json").read_text()).get("num_samples")
        except (OSError, ValueError):
            samples = None
    return {
        "steps": train.get("steps"),
        "batch": train.get("global_batch_size"),
        "shards": shards,
        "train_samples": samples,
        "model": model.get("name"),
    }


def _data_cell(result: dict[str, Any]) -> str:
    def one(d: dict[str, Any] | None) -> str:
        if not d:
            return "-"
        name = Path(d.get("manifest") or d.get("origin") or "?")
        label = f"{name.parent.parent.name}/{name.parent.name}" if name.name == "manifest.json" else name.name
        return f"{label} ({d.get('num_samples')})"

    data = result.get("data") or {}
    train = data.get("train")
    return f"{one(train)} -> {one(data.get('test'))}" if train else one(data.get("test"))


def _metric_cell(metrics: dict[str, Any]) -> tuple[str, float | None]:
    if "top1" in metrics:
        text = f"{metrics['top1']:.2f}"
        if "top5" in metrics:
            text += f" (top-5 {metrics['top5']:.2f})"
        return text, float(metrics["top1"])
    if "rsum" in metrics:
        r1 = f"i2t R@1 {metrics.get('i2t_r1', float('nan')):.1f}, t2i R@1 {metrics.get('t2i_r1', float('nan')):.1f}"
        return f"{r1}, rsum {metrics['rsum']:.1f}", None
    return ", ".join(f"{k} {v}" for k, v in metrics.items()), None


def _registered_size(arch: str | None) -> dict[str, Any] | None:
    try:
        return vit_architecture(str(arch))
    except ValueError:
        return None


def _data_matches(spec: dict[str, Any] | None, data: dict[str, Any]) -> bool:
    """The result's evaluation data has the data set's class and sample counts."""
    if not spec:
        return False
    wanted = {"test": spec.get("test_samples"), "train": spec.get("train_samples")}
    for split, num_samples in wanted.items():
        d = data.get(split)
        if d is None and split == "train":  # zero-shot and retrieval read no training split
            continue
        if not d or d.get("num_samples") != num_samples or d.get("num_classes") != spec.get("num_classes"):
            return False
    return True


def paper_matches(papers: list[dict[str, Any]], result: dict[str, Any]) -> list[dict[str, Any]]:
    """The published top-1 numbers comparable with ``result`` (see the module docstring), best match first."""
    ckpt = result.get("checkpoint") or {}
    if ckpt.get("encoder") == "random_init":
        return []
    arch = ckpt.get("arch")
    size = _registered_size(arch)
    shape = ckpt.get("architecture") or {}
    if size is None or any(shape.get(k) != size.get(k) for k in SIZE_KEYS):
        return []
    fraction = (result.get("labels_subset") or {}).get("fraction")
    out = []
    for p in papers:
        if (
            p["method"] == ckpt.get("method")
            and p["arch"] == arch
            and p["metric"] == "top1"
            and p["eval"] == result.get("protocol")
            and p.get("labels_fraction") == fraction
            and _data_matches(p.get("dataset_spec"), result.get("data") or {})
        ):
            out.append(p)
    return out


def _paper_cell(matches: list[dict[str, Any]]) -> str:
    if not matches:
        return "-"
    p = matches[0]
    where = [p["arch"], p["dataset"]]
    if p.get("epochs"):
        where.append(f"{p['epochs']} ep")
    if p.get("data"):
        where.append(str(p["data"]))
    return f"{p['value']} ({', '.join(where)}; {p.get('source', '?')})"


def _vs_random(value: float | None, baselines: list[float]) -> str:
    if value is None or not baselines:
        return "-"
    mean = sum(baselines) / len(baselines)
    seeds = f"mean of {len(baselines)} seeds " if len(baselines) > 1 else ""
    return f"{value - mean:+.2f} (vs {seeds}{mean:.2f})"


def collect_rows(run_dirs: list[Path], papers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per result file of the given runs, rows of one recipe together (see the module docstring)."""
    rows = []
    for run_dir in run_dirs:
        info = _run_info(run_dir)
        for result in load_results(run_dir):
            ckpt = result.get("checkpoint") or {}
            arch = ckpt.get("arch")
            shape = ckpt.get("architecture") or {}
            step = ckpt.get("step")
            pretrain = f"{ckpt.get('method')} {step}/{info['steps'] or '?'} steps"
            if step and info["batch"] and info["train_samples"]:
                pretrain += f" ({step * info['batch'] / info['train_samples']:.3g} ep)"
            metric, _ = _metric_cell(result.get("metrics") or {})
            recipe = recipe_of(result)
            stored = (result.get("recipe") or {}).get("sha256")
            rows.append(
                {
                    "run": run_dir.name,
                    "pretraining": pretrain,
                    "arch": f"{arch} (D {shape.get('embed_dim')}, depth {shape.get('depth')}, p{shape.get('patch_size')}, "
                    f"{shape.get('img_size')} px)",
                    "encoder": "random init" if ckpt.get("encoder") == "random_init" else "pretrained",
                    "protocol": result.get("protocol"),
                    "recipe": recipe_summary(result),
                    "recipe_id": (result.get("recipe") or {}).get("id") or recipe.id,
                    "_recipe_sha": stored or recipe.sha256,
                    "labels_fraction": (result.get("labels_subset") or {}).get("fraction"),
                    "data": _data_cell(result),
                    "result": metric,
                    "value": headline(result.get("metrics") or {})[1],
                    "paper": _paper_cell(paper_matches(papers, result)),
                    "step": step or 0,
                    "file": result.get("_file"),
                }
            )
    baselines: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        if r["encoder"] == "random init" and r["value"] is not None:
            baselines.setdefault((r["run"], r["step"], r["_recipe_sha"]), []).append(r["value"])
    for r in rows:
        same = baselines.get((r["run"], r["step"], r["_recipe_sha"]), [])
        r["vs_random"] = _vs_random(r["value"], same) if r["encoder"] == "pretrained" else "-"
    rows.sort(
        key=lambda r: (
            r["run"],
            r["step"],
            str(r["protocol"]),
            -1.0 if r["labels_fraction"] is None else r["labels_fraction"],
            r["recipe_id"],
            r["encoder"] != "pretrained",
            str(r["file"]),
        )
    )
    for r in rows:
        del r["_recipe_sha"]
    return rows


COLUMNS = [
    ("run", "run"),
    ("pretraining", "pretraining (export/run steps)"),
    ("arch", "encoder"),
    ("encoder", "init"),
    ("protocol", "protocol"),
    ("recipe_id", "recipe id"),
    ("recipe", "recipe"),
    ("data", "eval data (train -> test)"),
    ("result", "result (%)"),
    ("vs_random", "vs random init (same recipe)"),
    ("paper", "paper (same arch, data, protocol)"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The Markdown table."""
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(esc(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m evals.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (runs/*), or a directory of runs")
    p.add_argument(
        "--paper", default=str(PAPER_RESULTS), help="published numbers (default configs/paper_results.yaml)"
    )
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    run_dirs: list[Path] = []
    for spec in args.runs:
        path = Path(spec)
        if (path / "evals").is_dir() or (path / "exports").is_dir():
            run_dirs.append(path)
        elif path.is_dir():
            run_dirs += sorted(c for c in path.iterdir() if (c / "evals").is_dir())
    if not run_dirs:
        print(f"error: no run directories with results among {' '.join(args.runs)}", file=sys.stderr)
        return 2
    rows = collect_rows(run_dirs, load_paper_results(Path(args.paper)))
    if not rows:
        print(
            "no results yet: run python -m evals.run --checkpoint runs/<name>/exports/latest --protocol knn ..."
        )
        return 0
    print(markdown(rows))
    print(
        "\nRows with the same recipe id were evaluated with the same settings on the same data; 'vs random init' "
        "compares a pretrained row only with the random-init encoder at its recipe. A paper number is shown only "
        "where method, architecture, evaluation data and protocol match (configs/paper_results.yaml); its "
        "pretraining budget may still differ."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

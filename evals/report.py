"""A Markdown table of every run's evaluation results beside the papers' numbers.

    python -m evals.report runs/*
    python -m evals.report runs/mae_tiny_fmnist --paper configs/paper_results.yaml --json rows.json

One row per result file (``runs/<name>/evals/step_N/<result>.json``): the run, its pretraining
(method, architecture, steps of the export / steps of the run, epochs over its training data), the
encoder (pretrained or random init), the protocol with its recipe (k, T; head, optimizer, epochs;
labels fraction), the evaluation data (train -> test, sample counts) and the headline metric, then
the published number of the same method and protocol from ``configs/paper_results.yaml`` (same
architecture when listed, else the method's first one, named in the cell) with its source.
A published number is a *reference*, comparable only when architecture, data and budget match.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from evals.config import REPO_ROOT
from evals.results import load_results

PAPER_RESULTS = REPO_ROOT / "configs" / "paper_results.yaml"
PROTOCOLS = ("knn", "linear", "finetune", "zeroshot", "retrieval")


def load_paper_results(path: Path = PAPER_RESULTS) -> list[dict[str, Any]]:
    """Flatten ``paper_results.yaml``: one dict per published number (method, arch, dataset, protocol, ...)."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    out = []
    for method, archs in tree.items():
        for arch, entries in (archs or {}).items():
            for key, entry in (entries or {}).items():
                parts = key.split("_")
                protocol = next((p for p in parts if p in PROTOCOLS), None)
                if protocol is None or not isinstance(entry, dict):
                    continue
                i = parts.index(protocol)
                out.append(
                    {
                        "method": method,
                        "arch": arch,
                        "key": key,
                        "dataset": "_".join(parts[:i]),
                        "protocol": protocol,
                        "metric": parts[i + 1] if len(parts) > i + 1 else "top1",
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


def _recipe(result: dict[str, Any]) -> str:
    impl = result.get("implementation")
    s = (result.get("settings") or {}).get(impl) or {}
    details = result.get("details") or {}
    actual = details.get("actual") or {}
    if impl == "knn":
        text = f"k={details.get('report_k', s.get('report_k'))}, T={s.get('temperature')}"
    elif impl == "linear":
        feats = f"last {s.get('n_last_blocks')} CLS" if s.get("n_last_blocks", 1) > 1 else "CLS"
        if s.get("avgpool"):
            feats += "+avgpool"
        text = f"{s.get('recipe')}: {s.get('head')}/{s.get('optimizer')} on {feats}, blr {s.get('blr')}, {s.get('epochs')} ep"
        if actual.get("batch_size"):
            text += f", batch {actual['batch_size']}"
    elif impl == "finetune":
        ep = actual.get("epochs_completed")
        done = f"{ep:.3g}" if isinstance(ep, int | float) else "?"
        text = f"mae: {done}/{s.get('epochs')} ep, layer decay {s.get('layer_decay')}, mixup {s.get('mixup')}/cutmix {s.get('cutmix')}"
    elif impl == "zeroshot":
        text = f"{details.get('num_templates')} templates"
    else:
        text = impl or "?"
    subset = result.get("labels_subset")
    if subset:
        text += f"; {100 * subset['fraction']:g}% labels ({subset['num_samples']}, seed {subset['seed']})"
    return text


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


def _paper_cell(papers: list[dict[str, Any]], method: str, arch: str | None, protocol: str | None) -> str:
    matches = [
        p for p in papers if p["method"] == method and p["protocol"] == protocol and p["metric"] == "top1"
    ]
    if not matches:
        return "-"
    same = [p for p in matches if p["arch"] == arch]
    p = (same or matches)[0]
    where = [p["arch"], p["dataset"]]
    if p.get("epochs"):
        where.append(f"{p['epochs']} ep")
    if p.get("data"):
        where.append(str(p["data"]))
    return f"{p['value']} ({', '.join(where)}; {p.get('source', '?')})"


def collect_rows(run_dirs: list[Path], papers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per result file of the given runs."""
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
            metric, value = _metric_cell(result.get("metrics") or {})
            rows.append(
                {
                    "run": run_dir.name,
                    "pretraining": pretrain,
                    "arch": f"{arch} (D {shape.get('embed_dim')}, depth {shape.get('depth')}, p{shape.get('patch_size')}, "
                    f"{shape.get('img_size')} px)",
                    "encoder": "random init" if ckpt.get("encoder") == "random_init" else "pretrained",
                    "protocol": result.get("protocol"),
                    "recipe": _recipe(result),
                    "data": _data_cell(result),
                    "result": metric,
                    "value": value,
                    "paper": _paper_cell(papers, str(ckpt.get("method")), arch, result.get("implementation")),
                    "step": step or 0,
                    "file": result.get("_file"),
                }
            )
    rows.sort(
        key=lambda r: (r["run"], r["step"], str(r["protocol"]), r["encoder"] != "pretrained", r["recipe"])
    )
    return rows


COLUMNS = [
    ("run", "run"),
    ("pretraining", "pretraining (export/run steps)"),
    ("arch", "encoder"),
    ("encoder", "init"),
    ("protocol", "protocol"),
    ("recipe", "recipe"),
    ("data", "eval data (train -> test)"),
    ("result", "result (%)"),
    ("paper", "paper (reference)"),
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
        "\nPaper numbers are the published result of the same method and protocol (ImageNet-scale models and data); "
        "they are references, comparable only at the same architecture, data and budget."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

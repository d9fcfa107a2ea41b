"""Where results go and how they are written: JSON per protocol and TensorBoard scalars.

Layout (one directory per evaluated export)::

    runs/<name>/evals/step_00001000/<result>.json     one file per protocol variant (below)
    runs/<name>/evals/step_00001000/cache/            cached frozen features
    runs/<name>/evals/tb/                             TensorBoard: eval/<result>_<metric> at the export's step

``<result>`` is the protocol name, then ``_frac<F>`` for a few-label run (``linear_frac0.01``), then
``_random`` for the random-initialised baseline (``knn_random``). For an export outside a run directory
results go to ``<export>/../evals/<export dir name>/`` unless ``--output`` says otherwise.
Files are written atomically (temporary file + rename), so a reader never sees half a result, and the
presence of ``<result>.json`` is what marks an export as evaluated for ``evals.watch``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULT_FORMAT = 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (robust to stream swaps, e.g. in tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(prefix: str = "", level: int = logging.INFO) -> None:
    """Log to stderr with timestamps (idempotent; keeps handlers others installed)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(level)


def result_name(protocol: str, labels_fraction: float | None = None, random_init: bool = False) -> str:
    """File stem of a result: ``knn``, ``linear_frac0.01``, ``knn_random``, ``linear_frac0.1_random``."""
    name = protocol
    if labels_fraction is not None:
        name += f"_frac{labels_fraction:g}"
    if random_init:
        name += "_random"
    return name


def results_dir(export_path: Path, output: str | os.PathLike[str] | None = None) -> Path:
    """Directory of an export's results (see the module docstring)."""
    if output is not None:
        return Path(output)
    export_path = Path(export_path)
    return (
        export_path.parent.parent / "evals" / export_path.name
        if export_path.parent.name == "exports"
        else (export_path.parent / "evals" / export_path.name)
    )


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def write_tensorboard(tb_dir: Path, step: int, name: str, metrics: dict[str, Any]) -> None:
    """Scalars ``eval/<name>_<metric>`` at ``step`` (skipped with a warning when TensorBoard is missing)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard not installed
        log.warning("TensorBoard unavailable (%s); scalars not written", exc)
        return
    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for key, value in scalar_metrics(metrics).items():
            writer.add_scalar(f"eval/{name}_{key}", value, global_step=step)
    finally:
        writer.close()


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every result file of a run (``evals/step_*/*.json``), each with ``"_file"`` added; unreadable ones skipped."""
    out = []
    for path in sorted((Path(run_dir) / "evals").glob("step_*/*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable result %s: %s", path, exc)
            continue
        if isinstance(payload, dict) and "metrics" in payload:
            payload["_file"] = str(path)
            out.append(payload)
    return out

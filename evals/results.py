"""Where results go, what identifies them, how they are written, and how to list a run's results.

Layout (one directory per evaluated export)::

    runs/<name>/evals/step_00001000/<result>.json       one file per protocol, recipe and data (below)
    runs/<name>/evals/step_00001000/<result>.log        evals.watch: the evaluation's log
    runs/<name>/evals/step_00001000/<result>.failed.json / .submitted.json   evals.watch's records
    runs/<name>/evals/step_00001000/cache/              cached frozen features
    runs/<name>/evals/tb/<result>/                      TensorBoard: eval/<protocol>/<metric> at the export's step

``<result>`` is ``<protocol>[_frac<F>][_random[_seed<S>]]-<recipe id>``, e.g. ``knn-3fa2c1d0``,
``linear_frac0.01_random-9b0e77aa``. The *recipe id* is a short hash of everything that decides the
number: the protocol, its resolved settings (configuration file and ``key=value`` overrides: the
protocol's section, the data preprocessing and label subset, the feature precision) and the content
of the evaluation data (manifest SHA-256 of the train and test shards). Settings that only change how
fast the number is computed (extraction batch size, loader workers, the feature cache, k-NN's chunk
size, the corrupt-sample threshold, where the shards live) are left out. The random-init baseline of
the same recipe shares the id, so the pair reads ``knn-3fa2c1d0`` / ``knn_random-3fa2c1d0``.

A different recipe or other data therefore never replaces a result; re-running the same recipe on the
same export replaces its own file only (and the recipe it holds is checked first: a hash collision
would be refused, not overwritten). The file holds the readable recipe under ``"recipe"``.

Files are written atomically and durably (:mod:`pretrain.fileio`), so a reader never sees half a
result; the presence of ``<result>.json`` marks the export as evaluated for ``evals.watch``.

TensorBoard: one event directory per result key, and a step that directory already holds is not
written again (a re-run updates the JSON file, never adds a second point at the same step).

For an export outside a run directory results go to ``<export>/../evals/<export dir name>/`` unless
``--output`` says otherwise. Results written before recipe ids existed (``knn.json``) are still read;
their recipe id is computed from the settings they hold.

Listing (the stable interface for other tools, e.g. ``launch/status.py``): :func:`list_results`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.fileio import atomic_write_text

log = logging.getLogger(__name__)

RESULT_FORMAT = 2  # 2: recipe-keyed file names and the "recipe" record; 1: <protocol>[_frac][_random].json
RECIPE_ID_CHARS = 8

# Settings that change how fast a number is computed, not the number: left out of the recipe.
# (data.train/data.test are replaced by the content hashes of the data they name.)
OPERATIONAL_KEYS: dict[str, frozenset[str]] = {
    "data": frozenset({"train", "test", "batch_size", "num_workers", "max_corrupt_fraction"}),
    "features": frozenset({"cache"}),
    "knn": frozenset({"chunk_size"}),
}

_KEYED = re.compile(r"^(?P<base>.+)-(?P<id>[0-9a-f]{8,64})$")
_MARKERS = (".failed", ".submitted")


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


# ------------------------------------------------------------------------------------------- identity
def result_name(
    protocol: str,
    labels_fraction: float | None = None,
    random_init: bool = False,
    random_init_seed: int | None = None,
) -> str:
    """Readable part of a result's name: ``knn``, ``linear_frac0.01``, ``knn_random``, ``knn_random_seed3``.

    Args:
        protocol: the protocol name (a ``configs/eval`` stem).
        labels_fraction: few-label fraction, or ``None`` for all labels.
        random_init: the random-initialised baseline.
        random_init_seed: its seed; named only when it is not 0 (the default).
    """
    name = protocol
    if labels_fraction is not None:
        name += f"_frac{labels_fraction:g}"
    if random_init or random_init_seed is not None:
        name += "_random"
        if random_init_seed:
            name += f"_seed{random_init_seed}"
    return name


def data_key(identity: Mapping[str, Any] | None) -> str | None:
    """The content part of a data identity (``data_pipelines.sequential.data_identity``): manifest SHA-256,
    else the hash of the shard list; ``None`` for no data."""
    if not identity:
        return None
    return identity.get("manifest_sha256") or identity.get("shards_sha256") or identity.get("id")


def recipe_settings(protocol: str, implementation: str, sections: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide a result: protocol, implementation, and the ``data``, ``features`` and
    implementation sections without :data:`OPERATIONAL_KEYS`.

    Args:
        protocol: the protocol name (e.g. ``linear_dino``).
        implementation: the implementation it runs (e.g. ``linear``).
        sections: plain dicts by section name (a resolved config, or a result's ``settings``).
    """
    out: dict[str, Any] = {"protocol": protocol, "implementation": implementation}
    for name in ("data", "features", implementation):
        values = dict(sections.get(name) or {})
        out[name] = {k: v for k, v in sorted(values.items()) if k not in OPERATIONAL_KEYS.get(name, ())}
    return out


@dataclass(frozen=True)
class Recipe:
    """What a result is keyed by.

    Attributes:
        settings: :func:`recipe_settings`.
        data: ``{"train": key or None, "test": key}`` (:func:`data_key`).
        sha256: hash of both (canonical JSON).
    """

    settings: dict[str, Any]
    data: dict[str, str | None]
    sha256: str

    @property
    def id(self) -> str:
        """The short id in file names."""
        return self.sha256[:RECIPE_ID_CHARS]

    def describe(self) -> dict[str, Any]:
        """The ``"recipe"`` record of a result file."""
        return {"id": self.id, "sha256": self.sha256, "settings": self.settings, "data": self.data}


def make_recipe(
    protocol: str,
    implementation: str,
    sections: Mapping[str, Any],
    train: Mapping[str, Any] | None,
    test: Mapping[str, Any] | None,
) -> Recipe:
    """The recipe of an evaluation (see the module docstring).

    Args:
        protocol: the protocol name.
        implementation: the implementation it runs.
        sections: resolved config sections as plain dicts (``data``, ``features``, the implementation's).
        train: identity of the training split (``None`` when there is none).
        test: identity of the test split.
    """
    settings = recipe_settings(protocol, implementation, sections)
    data = {"train": data_key(train), "test": data_key(test)}
    canonical = json.dumps({"settings": settings, "data": data}, sort_keys=True, separators=(",", ":"))
    return Recipe(settings, data, hashlib.sha256(canonical.encode()).hexdigest())


def recipe_of(payload: Mapping[str, Any]) -> Recipe:
    """The recipe of a result payload: its ``"recipe"`` record, or (files written before recipe ids)
    the one its settings and data describe."""
    data = payload.get("data") or {}
    return make_recipe(
        str(payload.get("protocol")),
        str(payload.get("implementation")),
        payload.get("settings") or {},
        data.get("train"),
        data.get("test"),
    )


@dataclass(frozen=True)
class ResultKey:
    """The name of one result: protocol, recipe, label fraction, encoder.

    Attributes:
        protocol: the protocol name.
        recipe: its :class:`Recipe`.
        labels_fraction: few-label fraction (``None``: all labels).
        random_init_seed: seed of the random-init baseline (``None``: the pretrained encoder).
    """

    protocol: str
    recipe: Recipe
    labels_fraction: float | None = None
    random_init_seed: int | None = None

    @property
    def base(self) -> str:
        """The readable part (``knn_frac0.1_random``); the file name of results written before recipe ids."""
        return result_name(self.protocol, self.labels_fraction, random_init_seed=self.random_init_seed)

    @property
    def stem(self) -> str:
        """``<base>-<recipe id>``: the file stem of the result and its logs, markers and TensorBoard run."""
        return f"{self.base}-{self.recipe.id}"

    def path(self, out_dir: Path) -> Path:
        """The result file in ``out_dir``."""
        return Path(out_dir) / f"{self.stem}.json"

    def existing(self, out_dir: Path) -> Path | None:
        """This key's result in ``out_dir``: its own file, or a result written before recipe ids with the
        same base name whose settings give the same recipe; ``None`` when there is none."""
        own = self.path(out_dir)
        if own.is_file():
            return own
        legacy = Path(out_dir) / f"{self.base}.json"
        if legacy.is_file():
            payload = _read(legacy)
            if payload is not None and recipe_of(payload).sha256 == self.recipe.sha256:
                return legacy
        return None


# ------------------------------------------------------------------------------------------- writing
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


def tensorboard_dir(out_dir: Path) -> Path:
    """The TensorBoard root of a results directory: ``runs/<name>/evals/tb`` (else ``<out_dir>/tb``)."""
    out_dir = Path(out_dir)
    return out_dir.parent / "tb" if out_dir.parent.name == "evals" else out_dir / "tb"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` atomically and durably (creating its directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_result(path: Path, payload: dict[str, Any]) -> None:
    """Write a result file; refuse to replace a file that holds another recipe.

    Raises:
        RuntimeError: ``path`` holds a result of a different recipe (a recipe-id collision).
    """
    path = Path(path)
    if path.is_file():
        old = _read(path)
        new_sha = (payload.get("recipe") or {}).get("sha256")
        old_sha = ((old or {}).get("recipe") or {}).get("sha256")
        if old is not None and old_sha is not None and old_sha != new_sha:
            raise RuntimeError(
                f"{path} holds another recipe (sha256 {old_sha} != {new_sha}); not replaced. Move it away "
                "or pass --output DIR"
            )
    write_json_atomic(path, payload)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def written_steps(event_dir: Path) -> set[tuple[str, int]]:
    """``(tag, step)`` of every scalar already in the event files of ``event_dir``."""
    if not any(Path(event_dir).glob("events.out.tfevents.*")):
        return set()
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return {(tag, int(e.step)) for tag in acc.Tags().get("scalars", []) for e in acc.Scalars(tag)}


def write_tensorboard(tb_root: Path, step: int, key: ResultKey, metrics: dict[str, Any]) -> int:
    """Scalars ``eval/<protocol>/<metric>`` at ``step`` in ``<tb_root>/<result stem>/``.

    One event directory per result key: the pretrained and random-init runs of one recipe are two
    curves of the same chart. A ``(tag, step)`` that directory already holds is skipped, so re-running
    an evaluation never adds a second point at a step (the JSON file holds the latest value).

    Returns:
        The number of scalars written (0 also when TensorBoard is not installed, with a warning).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard not installed
        log.warning("TensorBoard unavailable (%s); scalars not written", exc)
        return 0
    event_dir = Path(tb_root) / key.stem
    done = written_steps(event_dir)
    todo = {
        f"eval/{key.protocol}/{name}": value
        for name, value in scalar_metrics(metrics).items()
        if (f"eval/{key.protocol}/{name}", step) not in done
    }
    if len(todo) < len(scalar_metrics(metrics)):
        log.info(
            "TensorBoard %s already has step %d; not written again (the JSON file is updated)",
            event_dir,
            step,
        )
    if not todo:
        return 0
    writer = SummaryWriter(log_dir=str(event_dir))
    try:
        for tag, value in todo.items():
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return len(todo)


# ------------------------------------------------------------------------------------------- reading
def _read(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("skipping unreadable result %s: %s", path, exc)
        return None
    return payload if isinstance(payload, dict) else None


def _is_result_file(path: Path) -> bool:
    return path.suffix == ".json" and not path.name.startswith(".") and not path.stem.endswith(_MARKERS)


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every result payload of a run (``evals/step_*/*.json``, markers excluded), each with ``"_file"``
    added; unreadable ones are skipped with a warning."""
    out = []
    for path in sorted((Path(run_dir) / "evals").glob("step_*/*.json")):
        if not _is_result_file(path):
            continue
        payload = _read(path)
        if payload is not None and "metrics" in payload:
            payload["_file"] = str(path)
            out.append(payload)
    return out


def recipe_summary(payload: Mapping[str, Any]) -> str:
    """One line saying how a result was obtained (``k=20, T=0.07``; ``mae: bn_linear/lars on CLS, ...``)."""
    impl = payload.get("implementation")
    s = (payload.get("settings") or {}).get(impl) or {}
    details = payload.get("details") or {}
    actual = details.get("actual") or {}
    if impl == "knn":
        text = f"k={details.get('report_k', s.get('report_k'))}, T={s.get('temperature')}"
    elif impl == "linear":
        feats = f"last {s.get('n_last_blocks')} CLS" if (s.get("n_last_blocks") or 1) > 1 else "CLS"
        if s.get("avgpool"):
            feats += "+avgpool"
        chosen = actual.get("blr", s.get("blr"))
        grid = actual.get("blr_grid") or ([s["blr"]] if s.get("blr") is not None else s.get("blr_grid"))
        if grid and len(grid) > 1:
            lr = f"blr {chosen:g} of {len(grid)} ({min(grid):g}-{max(grid):g}, picked on {actual.get('num_val', '?')} held out)"
        else:
            lr = f"blr {chosen:g}" if isinstance(chosen, int | float) else "blr ?"
        epochs = actual.get("epochs", s.get("epochs"))
        epochs_text = f"{epochs:.3g}" if isinstance(epochs, int | float) else "?"
        text = f"{s.get('recipe')}: {s.get('head')}/{s.get('optimizer')} on {feats}, {lr}, {epochs_text} ep"
        if actual.get("batch_size"):
            text += f", batch {actual['batch_size']}"
    elif impl == "finetune":
        ep = actual.get("epochs_completed")
        done = f"{ep:.3g}" if isinstance(ep, int | float) else "?"
        text = (
            f"mae: {done}/{s.get('epochs')} ep, layer decay {s.get('layer_decay')}, "
            f"mixup {s.get('mixup')}/cutmix {s.get('cutmix')}"
        )
    elif impl == "zeroshot":
        text = f"{details.get('num_templates')} templates"
    else:
        text = str(impl or "?")
    subset = payload.get("labels_subset")
    if subset:
        text += f"; {100 * subset.get('fraction', 0):g}% labels ({subset.get('num_samples')}, seed {subset.get('seed')})"
    return text


def headline(metrics: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """The metric a result is quoted by: ``top1`` (classification) or ``rsum`` (retrieval)."""
    for name in ("top1", "rsum"):
        if isinstance(metrics.get(name), int | float):
            return name, float(metrics[name])
    return None, None


@dataclass(frozen=True)
class EvalEntry:
    """One evaluation of a run, as :func:`list_results` reports it.

    Attributes:
        step: the export's step (``None`` when the directory name has none).
        name: the file stem (``knn_random-3fa2c1d0``).
        protocol: the protocol name (``knn``, ``linear_dino``, ...).
        state: ``done`` (a result file), ``failed`` (``evals.watch`` recorded a failure) or ``submitted``
            (``evals.watch --submit`` handed it to SLURM and no result is there yet).
        encoder: ``pretrained`` or ``random_init``.
        labels_fraction: few-label fraction (``None``: all labels, or not known).
        recipe_id: the recipe id (see the module docstring).
        recipe: one line saying how the result was obtained (empty when not known).
        headline: the metric the result is quoted by (``top1``; ``rsum`` for retrieval).
        value: its value, in percent.
        metrics: every metric of the result.
        file: the result or marker file.
        detail: failed: ``exit code N: <last log line>``; submitted: ``job <id>``; done: ``""``.
        job_id: the SLURM job of a submitted evaluation.
    """

    step: int | None
    name: str
    protocol: str
    state: str
    encoder: str | None
    labels_fraction: float | None
    recipe_id: str | None
    recipe: str
    headline: str | None
    value: float | None
    metrics: dict[str, Any] = field(default_factory=dict)
    file: Path = Path()
    detail: str = ""
    job_id: str | None = None


def _step_of(step_dir: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", step_dir.name)
    return int(m.group(1)) if m else None


def _parse_base(base: str) -> tuple[str, float | None]:
    """``linear_frac0.01_random_seed3`` -> (``linear``, 0.01)."""
    m = re.fullmatch(r"(?P<protocol>.+?)(?:_frac(?P<frac>[0-9.e-]+))?(?:_random(?:_seed\d+)?)?", base)
    assert m is not None
    frac = m.group("frac")
    return m.group("protocol"), (float(frac) if frac else None)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def list_results(run_dir: str | os.PathLike[str]) -> list[EvalEntry]:
    """Every evaluation of a run: results, and ``evals.watch``'s failed / submitted records.

    The stable way for other tools (``launch/status.py``) to show a run's evaluations. Ordered by
    step, protocol, labels fraction, recipe id, pretrained before random init. A submitted record
    whose result has arrived is not listed twice.

    Args:
        run_dir: ``runs/<name>``.

    Returns:
        One :class:`EvalEntry` per result or record.
    """
    entries: list[EvalEntry] = []
    for step_dir in sorted(Path(run_dir, "evals").glob("step_*")):
        if not step_dir.is_dir():
            continue
        step = _step_of(step_dir)
        done_stems = set()
        for path in sorted(step_dir.glob("*.json")):
            if not _is_result_file(path):
                continue
            payload = _read(path)
            if payload is None or "metrics" not in payload:
                continue
            done_stems.add(path.stem)
            ckpt = payload.get("checkpoint") or {}
            subset = payload.get("labels_subset") or {}
            metrics = payload.get("metrics") or {}
            name, value = headline(metrics)
            rec = payload.get("recipe") or {}
            entries.append(
                EvalEntry(
                    step=ckpt.get("step", step),
                    name=path.stem,
                    protocol=str(payload.get("protocol")),
                    state="done",
                    encoder=ckpt.get("encoder"),
                    labels_fraction=subset.get("fraction"),
                    recipe_id=rec.get("id") or recipe_of(payload).id,
                    recipe=recipe_summary(payload),
                    headline=name,
                    value=value,
                    metrics=metrics,
                    file=path,
                )
            )
        for kind in ("failed", "submitted"):
            for path in sorted(step_dir.glob(f"*.{kind}.json")):
                stem = path.name[: -len(f".{kind}.json")]
                if kind == "submitted" and stem in done_stems:
                    continue
                record = _read(path) or {}
                m = _KEYED.match(stem)
                protocol, fraction = _parse_base(m.group("base") if m else stem)
                detail = (
                    f"exit code {record.get('exit_code')}: {_last_line(record.get('log_tail', ''))}"
                    if kind == "failed"
                    else f"job {record.get('job_id')}"
                )
                entries.append(
                    EvalEntry(
                        step=step,
                        name=stem,
                        protocol=protocol,
                        state=kind,
                        encoder="random_init"
                        if "_random" in (m.group("base") if m else stem)
                        else "pretrained",
                        labels_fraction=fraction,
                        recipe_id=m.group("id") if m else None,
                        recipe="",
                        headline=None,
                        value=None,
                        file=path,
                        detail=detail.rstrip(": "),
                        job_id=str(record["job_id"]) if record.get("job_id") is not None else None,
                    )
                )
    entries.sort(
        key=lambda e: (
            e.step if e.step is not None else -1,
            e.protocol,
            -1.0 if e.labels_fraction is None else e.labels_fraction,
            e.recipe_id or "",
            e.encoder != "pretrained",
            e.name,
        )
    )
    return entries

"""Reading exported checkpoints: the contract between training and evaluation.

An export is a directory written by the trainer (``runs/<name>/exports/step_XXXXXXXX/``)::

    backbone.safetensors   the image encoder, timm ViT parameter names (cls_token, pos_embed,
                           patch_embed.proj.*, [norm_pre.*,] blocks.N.*, norm.*); float32
    backbone.json          method, arch, img_size, patch_size, embed_dim, depth, num_heads,
                           mlp_ratio, pos_embed, [pre_norm, norm_eps,] feature ("cls"), mean, std, step, run
    COMPLETE               written last: an export without it does not exist; lists every file
                           with its size and SHA-256
    clip.safetensors       CLIP exports only: projections and text tower (see evals/clip.py)

The names, the step-directory pattern and the writer are :mod:`pretrain.export`'s: training and
evaluation share one definition.

Reading is *consistent*: the ``COMPLETE`` marker is read before and after every file, each file
is read fully into memory, and a marker that disappeared or changed in between (the export was
purged or rewritten while we read) raises :class:`ExportVanishedError`, so a partial or mixed
export is never evaluated; the files read must be the ones the marker lists (sizes and SHA-256).
Nothing is unpickled: weights are safetensors, metadata is JSON.

The encoder is rebuilt from the JSON with ``pretrain.models.create_vit`` (timm's CLIP layout through
``pretrain.models.clip.create_image_tower`` when ``pre_norm``; a pure model package;
evaluations never import trainer internals) and loaded with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from evals.errors import EvalInputError, ExportVanishedError
from pretrain.export import BACKBONE_JSON, BACKBONE_WEIGHTS, COMPLETE, STEP_DIR, WEIGHTS_SUFFIX
from pretrain.models import VisionTransformer
from pretrain.models.clip import create_image_tower

__all__ = [
    "BACKBONE_JSON",
    "BACKBONE_WEIGHTS",
    "COMPLETE",
    "Export",
    "check_export",
    "is_complete_export",
    "list_complete_exports",
    "load_export",
    "random_init_export",
]

REQUIRED_META = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads")


def vit_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """``create_vit`` keyword arguments described by an export's JSON."""
    kwargs = {k: meta[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    for key in ("mlp_ratio", "pos_embed", "pre_norm", "norm_eps"):
        if meta.get(key) is not None:
            kwargs[key] = meta[key]
    return kwargs


@dataclass
class Export:
    """One export read into memory.

    Attributes:
        path: the export directory (symlinks such as ``exports/latest`` resolved).
        meta: ``backbone.json``.
        state: the encoder's state dict (timm names).
        sha256: SHA-256 of ``backbone.safetensors`` (identifies the weights in caches and results).
        marker: contents of the ``COMPLETE`` marker.
        extra: other weight files of the export by stem (e.g. ``"clip"``).
        random_init_seed: set for a random-initialised baseline built from this export's JSON.
    """

    path: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    sha256: str
    marker: str = ""
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    random_init_seed: int | None = None

    @property
    def step(self) -> int | None:
        """Training step of the export (from the JSON, else the directory name)."""
        if isinstance(self.meta.get("step"), int):
            return int(self.meta["step"])
        m = STEP_DIR.match(self.path.name)
        return int(m.group(1)) if m else None

    @property
    def run_dir(self) -> Path | None:
        """``runs/<name>`` when the export lives at ``runs/<name>/exports/step_N``."""
        return self.path.parent.parent if self.path.parent.name == "exports" else None

    @property
    def method(self) -> str:
        """Pretraining method of the export (``mae``, ``dino``, ``clip``, ...)."""
        return str(self.meta.get("method", "unknown"))

    @property
    def img_size(self) -> int:
        """Image side the encoder was trained at."""
        return int(self.meta["img_size"])

    @property
    def mean(self) -> tuple[float, float, float]:
        """Normalization mean of the training data pipeline (ImageNet's when not recorded)."""
        return tuple(self.meta.get("mean") or (0.485, 0.456, 0.406))  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        """Normalization std of the training data pipeline (ImageNet's when not recorded)."""
        return tuple(self.meta.get("std") or (0.229, 0.224, 0.225))  # type: ignore[return-value]

    @property
    def encoder_id(self) -> str:
        """What identifies the encoder's weights (feature-cache key)."""
        if self.random_init_seed is not None:
            return f"random_init:{self.meta['arch']}:{json.dumps(vit_kwargs(self.meta), sort_keys=True)}:seed{self.random_init_seed}"
        return self.sha256

    def build_encoder(self, **overrides: Any) -> VisionTransformer:
        """The ViT described by the JSON, with the exported weights (``strict=True``).

        Args:
            **overrides: extra ``create_vit`` arguments that add no parameters (e.g. ``drop_path_rate``).

        Raises:
            EvalInputError: the weights do not fit the architecture (names the missing/unexpected keys).
        """
        try:
            model = create_image_tower(self.meta["arch"], **vit_kwargs(self.meta), **overrides)
        except (ValueError, TypeError) as exc:
            raise EvalInputError(f"{self.path / BACKBONE_JSON}: cannot build the encoder: {exc}") from None
        result = model.load_state_dict(self.state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise EvalInputError(
                f"{self.path / BACKBONE_WEIGHTS} does not match the architecture in {BACKBONE_JSON} "
                f"({self.meta['arch']}, {vit_kwargs(self.meta)}): missing keys {result.missing_keys[:8]}, "
                f"unexpected keys {result.unexpected_keys[:8]}"
            )
        try:
            model.load_state_dict(self.state, strict=True)  # shapes
        except RuntimeError as exc:
            raise EvalInputError(f"{self.path / BACKBONE_WEIGHTS}: {exc}") from None
        return model

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the evaluated encoder (for result files)."""
        out = {
            "path": str(self.path),
            "step": self.step,
            "run": self.meta.get("run"),
            "method": self.method,
            "arch": self.meta.get("arch"),
            "architecture": vit_kwargs(self.meta),
            "sha256": self.sha256,
            "encoder": "pretrained",
        }
        if self.random_init_seed is not None:
            out.update(encoder="random_init", random_init_seed=self.random_init_seed, sha256=None)
        return out


def _expected() -> str:
    return (
        f"an export directory (runs/<name>/exports/step_N or exports/latest) with {BACKBONE_WEIGHTS}, "
        f"{BACKBONE_JSON} and the {COMPLETE} marker written last"
    )


def check_export(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a complete export; return it with symlinks resolved.

    Args:
        path: the export directory (``exports/latest`` is fine).

    Returns:
        The resolved directory.

    Raises:
        EvalInputError: the message names the path, what is missing and what is expected (with a hint
            when a run directory or a training checkpoint was given instead).
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise EvalInputError(f"checkpoint {given} does not exist; expected {_expected()}")
    real = given.resolve()
    if not real.is_dir():
        raise EvalInputError(f"checkpoint {given} is a file, not a directory; expected {_expected()}")
    if (real / "exports").is_dir() and not (real / BACKBONE_JSON).exists():
        steps = list_complete_exports(real / "exports")
        hint = (
            f" (complete exports: {', '.join(p.name for p in steps[-5:])})"
            if steps
            else " (it has no complete export yet)"
        )
        raise EvalInputError(
            f"{given} is a run directory, not an export: pass {given}/exports/latest or {given}/exports/step_N{hint}"
        )
    if (real / "trainer_state.json").exists() or (real / ".metadata").exists():
        raise EvalInputError(
            f"{given} is a training checkpoint (DCP shards), not an export: evaluations read "
            f"runs/<name>/exports/step_N; expected {_expected()}"
        )
    missing = [name for name in (BACKBONE_WEIGHTS, BACKBONE_JSON, COMPLETE) if not (real / name).is_file()]
    if missing:
        why = (
            f"no {COMPLETE} marker: the export is being written or was interrupted; it does not exist for evals"
            if missing == [COMPLETE]
            else f"missing {', '.join(missing)}"
        )
        raise EvalInputError(f"checkpoint {given} is not a complete export ({why}); expected {_expected()}")
    return real


def is_complete_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a complete export (without raising)."""
    try:
        check_export(path)
    except EvalInputError:
        return False
    return True


def list_complete_exports(exports_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete ``step_N`` export directories under ``exports_dir``, by ascending step."""
    root = Path(exports_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and not child.is_symlink() and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def _read_marker(directory: Path, given: Path) -> str:
    try:
        return (directory / COMPLETE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExportVanishedError(
            f"export {given} lost its {COMPLETE} marker while being read (purged or rewritten); skipped"
        ) from None


def _check_listed_files(directory: Path, marker: str, read: dict[str, bytes]) -> None:
    """The files read must be the ones ``COMPLETE`` lists, with the same sizes and SHA-256.

    Markers written before the listing existed (``{"step", "time"}`` only) are accepted as they are.
    """
    try:
        listing = json.loads(marker).get("files")
    except (json.JSONDecodeError, AttributeError):
        listing = None
    if not isinstance(listing, dict):
        return
    where = directory / COMPLETE
    unlisted = sorted(set(read) - set(listing))
    missing = sorted(set(listing) - set(read))
    if unlisted or missing:
        raise EvalInputError(
            f"{directory}: the files do not match {where} (not listed there: {unlisted or 'none'}; listed but "
            f"absent: {missing or 'none'}); a file was added or removed after the export was written"
        )
    for name, data in read.items():
        want = listing[name]
        if len(data) != want.get("bytes") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise EvalInputError(
                f"{directory / name}: size or SHA-256 differs from {where}; the file changed after the export "
                "was written (corrupted or overwritten)"
            )


def load_export(path: str | os.PathLike[str]) -> Export:
    """Read an export consistently (see the module docstring).

    Args:
        path: the export directory.

    Returns:
        The export in memory.

    Raises:
        EvalInputError: not a complete export, unreadable JSON, missing keys, bad weights file.
        ExportVanishedError: the export was purged or rewritten while it was read.
    """
    given = Path(path)
    real = check_export(given)
    before = _read_marker(real, given)
    try:
        meta_text = (real / BACKBONE_JSON).read_text(encoding="utf-8")
        raw = (real / BACKBONE_WEIGHTS).read_bytes()
        extra_raw = {
            p.stem: p.read_bytes()
            for p in sorted(real.glob(f"*{WEIGHTS_SUFFIX}"))
            if p.name != BACKBONE_WEIGHTS
        }
    except FileNotFoundError as exc:
        if not (real / COMPLETE).is_file():
            raise ExportVanishedError(
                f"export {given} was purged while being read ({exc.filename}); skipped"
            ) from None
        raise EvalInputError(f"export {given}: {exc.filename} is missing") from None
    after = _read_marker(real, given)
    if after != before:
        raise ExportVanishedError(
            f"export {given} was rewritten while being read ({COMPLETE} changed); skipped"
        )
    _check_listed_files(
        real,
        before,
        {BACKBONE_JSON: meta_text.encode("utf-8"), BACKBONE_WEIGHTS: raw}
        | {f"{stem}{WEIGHTS_SUFFIX}": data for stem, data in extra_raw.items()},
    )
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"{real / BACKBONE_JSON} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise EvalInputError(f"{real / BACKBONE_JSON} must hold a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise EvalInputError(
            f"{real / BACKBONE_JSON} lacks {', '.join(missing)}; an export JSON needs {', '.join(REQUIRED_META)} "
            "(and mlp_ratio, pos_embed, mean, std, method, step)"
        )
    try:
        state = load_safetensors_bytes(raw)
        extra = {stem: load_safetensors_bytes(data) for stem, data in extra_raw.items()}
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise EvalInputError(f"{real}: a weights file is not valid safetensors: {exc}") from None
    return Export(
        path=real,
        meta=meta,
        state=state,
        sha256=hashlib.sha256(raw).hexdigest(),
        marker=before,
        extra=extra,
    )


def random_init_export(export: Export, seed: int = 0) -> Export:
    """A randomly initialised encoder of the same architecture (the baseline of every protocol).

    The weights come from ``create_vit``'s own initialisation (timm's default ViT init) under
    ``torch.manual_seed(seed)``; everything else (image size, normalization) is the export's.

    Args:
        export: the export whose JSON describes the architecture.
        seed: initialisation seed.

    Returns:
        An :class:`Export` with the random weights, ``random_init_seed`` set and no extra towers.
    """
    state = torch.random.fork_rng(devices=[])
    with state:
        torch.manual_seed(seed)
        model = create_image_tower(export.meta["arch"], **vit_kwargs(export.meta))
    return Export(
        path=export.path,
        meta=dict(export.meta),
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        sha256="",
        marker=export.marker,
        random_init_seed=seed,
    )

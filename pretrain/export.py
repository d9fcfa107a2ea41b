"""The export bundle: what a run hands to evaluations, and the one writer of it.

An export is a directory ``runs/<name>/exports/step_XXXXXXXX/`` holding named safetensors files and one
JSON::

    backbone.safetensors   the image encoder with timm's names (every method)
    <stem>.safetensors     further tensor files of a method (CLIP: ``clip.safetensors``, its text tower,
                           projections and logit scale; see :mod:`pretrain.models.clip`)
    backbone.json          the description evaluations rebuild the encoder from
    COMPLETE               written last: step, time and, for every file above, its size and SHA-256

A method's :meth:`~pretrain.methods.base.Method.export_backbone` returns either the original
``(tensors, meta)`` -- one backbone file (MAE, DINO) -- or the bundle form
``({"backbone": tensors, "<stem>": tensors, ...}, meta)``; :func:`as_bundle` accepts both, so MAE and
DINO exports are byte for byte what they were (``backbone.safetensors`` + ``backbone.json``, same bytes).

Writing (:func:`write_export`) is atomic and durable: every file goes to a hidden temporary directory
beside the target, each is fsynced, ``COMPLETE`` is written last (it lists every file), the directory is
fsynced and renamed to its ``step_N`` name, and the parent is fsynced. A reader therefore sees no export
or a whole one; a kill at any point leaves at most a hidden ``.step_N.tmp.*`` directory that no reader
lists and the next write of the same step removes. Evaluations (:mod:`evals.export`) read with the same
constants and check the files against the marker.

This module is light (torch, safetensors, the project's fileio): evaluation jobs import it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pretrain.fileio import atomic_symlink, atomic_write_text, fsync_dir, fsync_file, sha256_file

__all__ = [
    "BACKBONE_JSON",
    "BACKBONE_STEM",
    "BACKBONE_WEIGHTS",
    "CLIP_STEM",
    "CLIP_WEIGHTS",
    "COMPLETE",
    "LATEST",
    "STEP_DIR",
    "WEIGHTS_SUFFIX",
    "ExportBundle",
    "as_bundle",
    "publish_export",
    "step_dir_name",
    "vit_backbone_meta",
    "write_export",
]

COMPLETE = "COMPLETE"
LATEST = "latest"
WEIGHTS_SUFFIX = ".safetensors"
BACKBONE_STEM = "backbone"
BACKBONE_WEIGHTS = BACKBONE_STEM + WEIGHTS_SUFFIX
BACKBONE_JSON = "backbone.json"
CLIP_STEM = "clip"
CLIP_WEIGHTS = CLIP_STEM + WEIGHTS_SUFFIX
# One step-directory pattern for checkpoints and exports, writers and readers: step_ + 8 digits.
STEP_DIR = re.compile(r"^step_(\d{8})$")
_STEM = re.compile(r"^[a-z][a-z0-9_]*$")


def step_dir_name(step: int) -> str:
    """``step_00001000`` for step 1000 (the name every checkpoint and export directory has)."""
    if step < 0 or step >= 10**8:
        raise ValueError(f"step {step} does not fit the step directory pattern step_XXXXXXXX")
    return f"step_{step:08d}"


def vit_backbone_meta(method: str, arch: str, encoder: torch.nn.Module, view: Any) -> dict[str, Any]:
    """What ``backbone.json`` says about a ViT encoder, for the evaluations to rebuild it.

    Args:
        method: the pretraining method (``mae``, ``dino``, ...).
        arch: the registered model name the run was configured with.
        encoder: the exported ViT (``pretrain.models.vit.VisionTransformer`` or the CLIP image tower).
        view: the first training view (``data_pipelines.augment.ViewSpec``): size and normalisation.

    Returns:
        The description, keys in a fixed order; a method adds its own keys after them.
    """
    return {
        "method": method,
        "arch": arch,
        "img_size": view.size,
        "patch_size": encoder.patch_size,
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "num_heads": encoder.blocks[0].attn.num_heads,
        "mlp_ratio": encoder.mlp_ratio,
        "pos_embed": encoder.pos_embed_type,
        "feature": "cls",
        "mean": list(view.mean),
        "std": list(view.std),
    }


@dataclass(frozen=True)
class ExportBundle:
    """What one export holds: tensor files by stem (``backbone`` first and required) and the JSON.

    Attributes:
        files: ``{stem: {tensor name: tensor}}``; ``backbone`` is the image encoder (timm names).
        meta: the content of ``backbone.json``.
    """

    files: Mapping[str, Mapping[str, torch.Tensor]]
    meta: Mapping[str, Any]

    def __post_init__(self) -> None:
        if BACKBONE_STEM not in self.files:
            raise ValueError(f"an export bundle needs a '{BACKBONE_STEM}' file; got {sorted(self.files)}")
        for stem, tensors in self.files.items():
            if not _STEM.match(stem):
                raise ValueError(f"export file stem {stem!r} must be lower-case letters, digits and '_'")
            bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise ValueError(f"export file {stem}{WEIGHTS_SUFFIX}: entries {bad[:4]} are not tensors")


def as_bundle(result: Any) -> ExportBundle:
    """Normalise what ``Method.export_backbone`` returned.

    Args:
        result: ``(tensors, meta)`` (one backbone file), ``({"backbone": tensors, stem: tensors}, meta)``
            (the bundle form) or an :class:`ExportBundle`.

    Returns:
        The bundle.
    """
    if isinstance(result, ExportBundle):
        return result
    try:
        tensors, meta = result
    except (TypeError, ValueError):
        raise TypeError(
            "export_backbone must return (tensors, meta), ({stem: tensors}, meta) or an ExportBundle; "
            f"got {type(result).__name__}"
        ) from None
    if tensors and all(isinstance(v, Mapping) for v in tensors.values()):
        return ExportBundle(dict(tensors), dict(meta))
    return ExportBundle({BACKBONE_STEM: dict(tensors)}, dict(meta))


def _as_saved(t: torch.Tensor) -> torch.Tensor:
    """Float tensors as contiguous float32 on the CPU (what every export has held); others unchanged."""
    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.float32)
    return t.contiguous().cpu()


def write_export(directory: str | os.PathLike[str], bundle: ExportBundle, step: int | None = None) -> Path:
    """Write ``bundle`` as the export ``directory`` (replacing one already there), atomically.

    Args:
        directory: the export directory, e.g. ``runs/<name>/exports/step_00001000``.
        bundle: tensor files and JSON.
        step: the training step recorded in ``COMPLETE`` (None: the JSON's ``step``).

    Returns:
        The directory.
    """
    final = Path(directory)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{final.name}.tmp.{os.getpid()}"
    for stale in parent.glob(f".{final.name}.tmp.*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        listing: dict[str, dict[str, Any]] = {}
        for stem, tensors in bundle.files.items():
            path = tmp / f"{stem}{WEIGHTS_SUFFIX}"
            save_file({k: _as_saved(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
            fsync_file(path)  # durable before COMPLETE says it is there
            listing[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        atomic_write_text(tmp / BACKBONE_JSON, json.dumps(dict(bundle.meta), indent=2))
        listing[BACKBONE_JSON] = {
            "bytes": (tmp / BACKBONE_JSON).stat().st_size,
            "sha256": sha256_file(tmp / BACKBONE_JSON),
        }
        if step is None:
            step = bundle.meta.get("step")
        marker = {"step": step, "time": time.time(), "files": listing}
        atomic_write_text(tmp / COMPLETE, json.dumps(marker))
        if final.exists():  # an earlier export of this step (a resumed run exporting it again)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def publish_export(exports_dir: str | os.PathLike[str], step: int, bundle: ExportBundle) -> Path:
    """Write the export of ``step`` under ``exports_dir`` and move ``exports_dir/latest`` to it.

    Args:
        exports_dir: ``runs/<name>/exports``.
        step: training step.
        bundle: what to write.

    Returns:
        ``exports_dir/step_XXXXXXXX``.
    """
    out = write_export(Path(exports_dir) / step_dir_name(step), bundle, step)
    atomic_symlink(out.name, Path(exports_dir) / LATEST)
    return out

"""Start a run from pretrained weights: ``init.from=PATH``.

Researchers continue pretraining, or compare against released weights. ``PATH`` may be

* an export of this project: ``runs/<name>/exports/step_N`` (or ``exports/latest``, or its
  ``backbone.safetensors``);
* a timm ViT checkpoint: a ``.safetensors``, ``.pth``/``.pt``/``.bin`` state dict with timm's names
  (``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...), possibly wrapped in
  ``{"state_dict": ...}`` / ``{"model": ...}`` or prefixed ``module.``;
* the MAE authors' released format (facebookresearch/mae: ``{"model": state_dict, ...}`` with the
  encoder under timm's names and the decoder as ``decoder_embed``, ``mask_token``,
  ``decoder_blocks.N``, ``decoder_norm``, ``decoder_pred``), e.g. ``mae_pretrain_vit_large.pth``.

What is loaded: the method's backbone strictly -- every encoder tensor must be in the file with the
same shape (a position embedding of another grid is resampled bicubically, as timm does), else the
run stops with a message naming the tensor, both shapes and the file's architecture. Other tensors
of the file that the method has under the same name and shape (MAE's decoder) are loaded too; the
rest (a classifier head, a decoder this method lacks) are reported, never silently dropped.

Safety: pickles are read with ``torch.load(weights_only=True)`` (plain tensors and containers; the
authors' files may also hold an ``argparse.Namespace``, which is admitted); never arbitrary code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.config import ConfigError

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model", "module", "model_ema")
_PREFIXES = ("module.", "encoder.", "backbone.", "model.")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class InitWeightsError(ConfigError):
    """``init.from`` names weights that cannot start this run (the message says what and why)."""


def resolve(path: str | Path) -> Path:
    """The weights file ``init.from`` names (an export directory resolves to its safetensors)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "backbone.safetensors").is_file():
            raise InitWeightsError(
                f"init.from={path}: a directory must be an export of a run (runs/<name>/exports/step_N with "
                "backbone.safetensors); give a weights file otherwise"
            )
        if not (p / "COMPLETE").is_file():
            raise InitWeightsError(f"init.from={path}: the export has no COMPLETE marker (interrupted write)")
        return p / "backbone.safetensors"
    if not p.is_file():
        raise InitWeightsError(f"init.from={path}: no such file or directory")
    return p


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a safetensors or (safely unpickled) PyTorch file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise InitWeightsError(f"init.from={path}: not a readable safetensors file ({e})") from None
    if path.suffix not in _PICKLE_SUFFIXES:
        raise InitWeightsError(
            f"init.from={path}: unknown weights format '{path.suffix}'; valid: .safetensors, "
            f"{', '.join(_PICKLE_SUFFIXES)} (PyTorch state dicts) or an export directory"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InitWeightsError(
            f"init.from={path}: refused to load: not plain tensors ({str(e).splitlines()[0]}). Only state "
            "dicts are read (torch.load(weights_only=True)); convert the file to safetensors if it holds more"
        ) from None
    for _ in range(3):  # {"model": {...}} / {"state_dict": {...}} / {"module": ...}
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise InitWeightsError(f"init.from={path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``encoder.``, ...) when that makes more names match."""
    best = state
    for prefix in _PREFIXES:
        stripped = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
        if len(wanted & set(stripped)) > len(wanted & set(best)):
            best = stripped
    return best


def describe_architecture(state: dict[str, torch.Tensor]) -> str:
    """What a file's ViT looks like: width, depth, patch size, token grid (from its tensor shapes)."""
    parts = []
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        parts.append(f"embed_dim {proj.shape[0]}, patch {proj.shape[-1]}, {proj.shape[1]} input channels")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if depth:
        parts.append(f"depth {depth}")
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        parts.append(f"{pos.shape[1]} position embeddings")
    return ", ".join(parts) or "no ViT encoder tensors found"


def _resample_pos_embed(pos: torch.Tensor, target: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Bicubic resampling of the patch part of ``pos`` [1, P + N, D] to ``target``'s grid."""
    n_old, n_new = pos.shape[1] - num_prefix, target.shape[1] - num_prefix
    g_old, g_new = math.isqrt(n_old), math.isqrt(n_new)
    if g_old * g_old != n_old or g_new * g_new != n_new:
        raise ValueError("not a square grid")
    grid = pos[:, num_prefix:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(
        grid, size=(g_new, g_new), mode="bicubic", align_corners=False, antialias=g_new < g_old
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, n_new, -1).to(pos.dtype)
    return torch.cat([pos[:, :num_prefix], grid], dim=1)


def load_initial_weights(method: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load ``init.from`` weights into ``method`` (before any engine wraps it); return what was done.

    Raises:
        InitWeightsError: unreadable or unsafe file, or a backbone tensor missing or of another size.
    """
    file = resolve(path)
    state = read_state(file)
    backbone = method.backbone()
    expected = backbone.state_dict()
    state = _strip_prefixes(state, set(expected))
    missing = sorted(k for k in expected if k not in state)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise InitWeightsError(
            f"init.from={file}: the file lacks {len(missing)} of this model's {len(expected)} backbone tensors "
            f"({shown}); the file holds: {describe_architecture(state)}. Is it a ViT with timm's names?"
        )
    loaded: dict[str, torch.Tensor] = {}
    resampled = []
    for name, want in expected.items():
        have = state[name]
        if (
            have.shape != want.shape
            and name == "pos_embed"
            and have.ndim == 3
            and have.shape[-1] == want.shape[-1]
        ):
            prefix = int(getattr(backbone, "num_prefix_tokens", 1))
            try:
                have = _resample_pos_embed(have, want, prefix)
                resampled.append(name)
            except ValueError:
                pass
        if have.shape != want.shape:
            raise InitWeightsError(
                f"init.from={file}: backbone tensor '{name}' has shape {list(have.shape)} in the file but "
                f"{list(want.shape)} in this model. The file holds: {describe_architecture(state)}; this model: "
                f"{describe_architecture(expected)}. Set model.* (name, embed_dim, depth, patch_size, img_size) "
                "to the file's architecture"
            )
        loaded[name] = have.to(want.dtype)
    method.load_backbone(loaded)

    # The rest of the method (e.g. MAE's decoder) by name and shape; everything else is reported.
    prefix = _module_path(method, backbone)
    rest = {
        k: v
        for k, v in (dict(method.named_parameters()) | dict(method.named_buffers())).items()
        if not (prefix and k.startswith(prefix + "."))
    }
    rest_loaded, unused = [], []
    with torch.no_grad():
        for name, tensor in state.items():
            if name in expected:
                continue
            target = rest.get(name)
            if target is not None and target.shape == tensor.shape:
                target.copy_(tensor.to(target.dtype))
                rest_loaded.append(name)
            else:
                unused.append(name)
    report = {
        "path": str(file),
        "backbone_tensors": len(loaded),
        "resampled": resampled,
        "other_tensors_loaded": sorted(rest_loaded),
        "unused_tensors": sorted(unused),
    }
    log.info(
        "initialised from %s: %d backbone tensors%s, %d other tensors of the method%s",
        file,
        len(loaded),
        f" ({', '.join(resampled)} resampled to this grid)" if resampled else "",
        len(rest_loaded),
        f"; not used ({len(unused)}): {', '.join(sorted(unused)[:8])}{' ...' if len(unused) > 8 else ''}"
        if unused
        else "",
    )
    return report


def _module_path(method: torch.nn.Module, module: torch.nn.Module) -> str:
    """Where ``module`` sits inside ``method`` (e.g. ``encoder``; empty when it is the method itself)."""
    for name, child in method.named_modules():
        if child is module:
            return name
    return ""


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Keep what the run started from beside its config (``init.json``)."""
    from pretrain.fileio import atomic_write_text

    atomic_write_text(Path(run_dir) / "init.json", json.dumps(report, indent=1))

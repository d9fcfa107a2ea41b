"""Convert a CLIP export into an OpenCLIP model directory, so OpenCLIP's own tools run on it.

Usage::

    python -m evals.export_openclip runs/<name>/exports/latest OUT

writes ``OUT/open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``, the format of
OpenCLIP's hub configs) and ``OUT/open_clip_model.safetensors`` (the state dict of ``open_clip.CLIP``),
which OpenCLIP loads with ``strict=True``::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")   # the same OpenAI BPE, context 77

(e.g. for CLIP_benchmark or OpenCLIP's zero-shot evaluation). The mapping is exact: our blocks are
OpenCLIP's residual attention blocks with timm's names (``qkv`` = ``in_proj``, ``proj`` = ``out_proj``,
``fc1/fc2`` = ``c_fc/c_proj``), the image tower's ``norm_pre``/``norm`` are ``ln_pre``/``ln_post``, the class
token and position table are ``class_embedding`` / ``positional_embedding``, the projections are
transposed into ``visual.proj`` / ``text_projection``, and ``logit_scale [1]`` becomes OpenCLIP's ``[]``.
The image and text embeddings of both models agree to float32 rounding (tests/test_clip_openclip.py).

Exit codes: 0 written, 2 bad input (not a CLIP export, a layout OpenCLIP cannot express).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evals.clip import CLIP_STEM, text_spec_from_meta
from evals.errors import EXIT_BAD_INPUT, EXIT_OK, EvalInputError
from evals.export import BACKBONE_JSON, Export, load_export
from pretrain.fileio import atomic_write_text, fsync_file

__all__ = ["OPENCLIP_CONFIG", "OPENCLIP_WEIGHTS", "convert", "main", "openclip_config", "openclip_state_dict"]

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
_BLOCK = {  # ours (timm names) -> OpenCLIP's ResidualAttentionBlock
    "norm1": "ln_1",
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _block_key(rest: str) -> str:
    for ours, theirs in _BLOCK.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    raise EvalInputError(f"unexpected block tensor '{rest}' (not a CLIP export of this project?)")


def _check(export: Export) -> None:
    where = export.path / BACKBONE_JSON
    if CLIP_STEM not in export.extra:
        raise EvalInputError(f"{export.path} is not a CLIP export (no clip.safetensors); nothing to convert")
    if not export.meta.get("pre_norm"):
        raise EvalInputError(f"{where}: the image tower lacks pre_norm (OpenCLIP's ln_pre); cannot convert")
    if export.meta.get("pos_embed", "learned") != "learned":
        raise EvalInputError(
            f"{where}: pos_embed={export.meta['pos_embed']!r}; OpenCLIP's ViT learns its positions"
        )
    spec, _ = text_spec_from_meta(export.meta, str(where))
    if spec.pool not in ("eot", "first") or not spec.causal or spec.tokenizer != "openai-bpe":
        raise EvalInputError(
            f"{where}: clip.text pool={spec.pool!r}, causal={spec.causal}, tokenizer={spec.tokenizer!r}: OpenCLIP's "
            "CLIP text tower needs pool eot or first, a causal mask and the openai-bpe tokenizer"
        )
    for what, eps in (("norm_eps", export.meta.get("norm_eps", 1e-6)), ("clip.text.norm_eps", spec.norm_eps)):
        if abs(float(eps) - 1e-5) > 1e-12:
            raise EvalInputError(f"{where}: {what}={eps}; OpenCLIP's LayerNorms use eps 1e-5")


def openclip_state_dict(export: Export) -> dict[str, torch.Tensor]:
    """The ``open_clip.CLIP`` state dict holding the export's weights (see the module docstring)."""
    _check(export)
    out: dict[str, torch.Tensor] = {}
    for name, t in export.state.items():
        if name == "patch_embed.proj.weight":
            out["visual.conv1.weight"] = t
        elif name == "cls_token":
            out["visual.class_embedding"] = t.reshape(-1)  # [1, 1, D] -> [D]
        elif name == "pos_embed":
            out["visual.positional_embedding"] = t[0]  # [1, 1+L, D] -> [1+L, D]
        elif name.startswith("norm_pre."):
            out["visual.ln_pre." + name[len("norm_pre.") :]] = t
        elif name.startswith("norm."):
            out["visual.ln_post." + name[len("norm.") :]] = t
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            out[f"visual.transformer.resblocks.{i}.{_block_key(rest)}"] = t
        else:
            raise EvalInputError(f"{export.path}: image tensor '{name}' has no OpenCLIP counterpart")
    for name, t in export.extra[CLIP_STEM].items():
        if name == "visual_proj.weight":
            out["visual.proj"] = t.T.contiguous()  # [E, D] -> [D, E]
        elif name == "text_proj.weight":
            out["text_projection"] = t.T.contiguous()  # [E, W] -> [W, E]
        elif name == "logit_scale":
            out["logit_scale"] = t.reshape(())
        elif name.startswith("text.blocks."):
            _, _, i, rest = name.split(".", 3)
            out[f"transformer.resblocks.{i}.{_block_key(rest)}"] = t
        elif name.startswith("text."):
            out[name[len("text.") :]] = t  # token_embedding.weight, positional_embedding, ln_final.*
        else:
            raise EvalInputError(f"{export.path}: clip tensor '{name}' has no OpenCLIP counterpart")
    return out


def openclip_config(export: Export) -> dict[str, Any]:
    """``{"model_cfg": ..., "preprocess_cfg": ...}`` as in OpenCLIP's ``open_clip_config.json``."""
    _check(export)
    meta = export.meta
    spec, embed_dim = text_spec_from_meta(meta, str(export.path / BACKBONE_JSON))
    width, heads = int(meta["embed_dim"]), int(meta["num_heads"])
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": int(meta["img_size"]),
            "layers": int(meta["depth"]),
            "width": width,
            "head_width": width // heads,
            "mlp_ratio": float(meta.get("mlp_ratio", 4.0)),
            "patch_size": int(meta["patch_size"]),
        },
        "text_cfg": {
            "context_length": spec.context_length,
            "vocab_size": spec.vocab_size,
            "width": spec.width,
            "heads": spec.num_heads,
            "layers": spec.depth,
            "mlp_ratio": spec.mlp_ratio,
            "pool_type": "argmax" if spec.pool == "eot" else "first",
        },
    }
    preprocess_cfg = {
        "size": int(meta["img_size"]),
        "mode": "RGB",
        "mean": list(export.mean),
        "std": list(export.std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def convert(export_path: str | Path, out: str | Path) -> Path:
    """Write ``OUT/open_clip_config.json`` and ``OUT/open_clip_model.safetensors`` from a CLIP export.

    Raises:
        EvalInputError: not a complete CLIP export, or a layout OpenCLIP cannot express.
    """
    export = load_export(export_path)
    state = {k: v.detach().float().contiguous() for k, v in openclip_state_dict(export).items()}
    config = openclip_config(export)
    config["source"] = {"export": str(export.path), "step": export.step, "sha256": export.sha256}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{OPENCLIP_WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    fsync_file(tmp)
    tmp.replace(out_dir / OPENCLIP_WEIGHTS)
    atomic_write_text(out_dir / OPENCLIP_CONFIG, json.dumps(config, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m evals.export_openclip",
        description="Convert a CLIP export into an OpenCLIP model directory (open_clip.create_model('local-dir:OUT')).",
    )
    p.add_argument("export", help="a CLIP export: runs/<name>/exports/latest or .../step_N")
    p.add_argument("out", help="output directory")
    args = p.parse_args(argv)
    try:
        out = convert(args.export, args.out)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"wrote {out / OPENCLIP_CONFIG} and {out / OPENCLIP_WEIGHTS}; load with open_clip.create_model('local-dir:{out}')"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

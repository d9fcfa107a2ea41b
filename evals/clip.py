"""The CLIP export contract, and the model evaluations rebuild from it.

A CLIP export (``runs/<name>/exports/step_N/``, written by :mod:`pretrain.export` for
:mod:`pretrain.methods.clip`) is an ordinary image export plus a text tower::

    backbone.safetensors   image tower: the ViT with timm names in timm's CLIP layout (norm_pre, final
                           norm; k-NN, linear probe and fine-tuning read it like every other export, and it
                           loads strict into timm's vit_*_clip_* model of the same size)
    clip.safetensors       visual_proj.weight            [E, D]   image CLS (after the ViT's final norm) -> E
                           text_proj.weight              [E, W]   pooled text token -> E
                           logit_scale                   [1]      log of the inverse temperature (ln(1/0.07) at init)
                           text.token_embedding.weight   [V, W]
                           text.positional_embedding     [T, W]   learned, T = context length
                           text.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
                                                                  pre-norm causal blocks, the ViT's Block layout
                           text.ln_final.{weight,bias}   [W]
    backbone.json          the image fields of every export ("method": "clip", arch, img_size, ...,
                           "pre_norm": true, "norm_eps": 1e-5, "feature": "cls", mean, std, step, run) plus
                           "clip": {"embed_dim": E,
                                    "text": {"vocab_size": V, "context_length": T, "width": W,
                                             "depth": L, "num_heads": H, "mlp_ratio": 4.0,
                                             "norm_eps": 1e-5, "causal": true,
                                             "pool": "eot" | "first" | "last",
                                             "tokenizer": "openai-bpe"}}
    COMPLETE               written last, listing every file above

The model is :class:`pretrain.models.clip.ClipModel` (semantics in its docstring), the text tower and
the tokenizer :mod:`pretrain.models.text` -- the very modules training uses, so an export is evaluated
by the code that trained it. ``tokenizer: "openai-bpe"`` is CLIP's byte-level BPE with a 49,408-token
vocabulary, provided by ``open_clip``'s bundled ``SimpleTokenizer`` (offline; the ``[clip]`` extra).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evals.errors import EvalInputError
from evals.export import Export
from pretrain.export import BACKBONE_JSON, CLIP_STEM, CLIP_WEIGHTS, ExportBundle, write_export
from pretrain.models.clip import ClipModel
from pretrain.models.text import POOLS, TextSpec, TextTokenizer, TextTransformer

__all__ = [
    "CLIP_STEM",
    "CLIP_WEIGHTS",
    "POOLS",
    "ClipModel",
    "TextSpec",
    "TextTransformer",
    "Tokenizer",
    "load_clip",
    "text_spec_from_meta",
    "write_clip_export",
]


class Tokenizer(TextTokenizer):
    """The tokenizer an export names, with evaluation errors (:class:`EvalInputError`).

    Args:
        kind: ``openai-bpe``.
        context_length: ``T``.
    """

    def __init__(self, kind: str, context_length: int) -> None:
        try:
            super().__init__(kind, context_length)
        except ValueError:
            raise EvalInputError(
                f"unknown tokenizer {kind!r} in the export's clip.text.tokenizer; known: openai-bpe"
            ) from None
        except ImportError:
            raise EvalInputError(
                "the openai-bpe tokenizer needs open_clip (pip install -e '.[clip]' or open_clip_torch)"
            ) from None


def text_spec_from_meta(meta: dict[str, Any], where: str) -> tuple[TextSpec, int]:
    """``(TextSpec, embed_dim)`` from an export JSON's ``clip`` object."""
    clip = meta.get("clip")
    if not isinstance(clip, dict) or "embed_dim" not in clip or not isinstance(clip.get("text"), dict):
        raise EvalInputError(
            f"{where}: a CLIP export needs a 'clip' object with 'embed_dim' and 'text' "
            "(vocab_size, context_length, width, depth, num_heads, ...); see evals/clip.py"
        )
    valid = set(TextSpec.__dataclass_fields__)
    unknown = set(clip["text"]) - valid
    if unknown:
        raise EvalInputError(f"{where}: unknown clip.text keys {sorted(unknown)}; valid: {sorted(valid)}")
    spec = TextSpec(**clip["text"])
    problems = spec.validate()
    if problems:
        raise EvalInputError(f"{where}: clip.text is not a valid text tower: {'; '.join(problems)}")
    return spec, int(clip["embed_dim"])


def load_clip(export: Export) -> tuple[ClipModel, Tokenizer]:
    """Rebuild the CLIP model of an export (strict loading of both weight files).

    Raises:
        EvalInputError: not a CLIP export (names what is missing), or weights that do not fit.
    """
    where = str(export.path / BACKBONE_JSON)
    if export.random_init_seed is not None:
        raise EvalInputError(
            "zero-shot and retrieval need a trained text tower; --baseline random does not apply"
        )
    if CLIP_STEM not in export.extra:
        raise EvalInputError(
            f"{export.path} is not a CLIP export (method {export.method!r}, no {CLIP_WEIGHTS}); zero-shot and "
            "retrieval need the text tower and projections described in evals/clip.py"
        )
    spec, embed_dim = text_spec_from_meta(export.meta, where)
    model = ClipModel(export.build_encoder(), spec, embed_dim)
    state = {f"visual.{k}": v for k, v in export.state.items()} | export.extra[CLIP_STEM]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EvalInputError(
            f"{export.path / CLIP_WEIGHTS} does not match clip in {BACKBONE_JSON}: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    try:
        model.load_state_dict(state, strict=True)  # shapes
    except RuntimeError as exc:
        raise EvalInputError(f"{export.path / CLIP_WEIGHTS}: {exc}") from None
    return model.eval(), Tokenizer(spec.tokenizer, spec.context_length)


def write_clip_export(path: str | os.PathLike[str], model: ClipModel, meta: dict[str, Any]) -> Path:
    """Write a CLIP export of ``model`` with the one export writer (:func:`pretrain.export.write_export`).

    For models built outside a training run (tests, conversions); a run's exports are written by
    :meth:`pretrain.checkpoint.CheckpointManager.export`.

    Args:
        path: the export directory (created).
        model: the model.
        meta: the image fields of ``backbone.json`` (arch, img_size, ..., step, run); ``method`` and
            ``clip`` are filled in here.

    Returns:
        The directory.
    """
    full = {
        **meta,
        "method": "clip",
        "clip": {"embed_dim": model.embed_dim, "text": asdict(model.text.spec)},
    }
    files = {"backbone": model.visual.state_dict(), CLIP_STEM: model.head_state_dict()}
    return write_export(path, ExportBundle(files, full), meta.get("step"))

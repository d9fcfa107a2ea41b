"""The CLIP export contract, and the model evaluations rebuild from it.

A CLIP export (``runs/<name>/exports/step_N/``) is an ordinary image export plus a text tower::

    backbone.safetensors   image tower: the ViT with timm names, exactly as for every other method
                           (so k-NN, linear probe and fine-tuning work on CLIP checkpoints unchanged)
    clip.safetensors       visual_proj.weight            [E, D]   image CLS (after the ViT's final norm) -> E
                           text_proj.weight              [E, W]   pooled text token -> E
                           logit_scale                   []       log of the inverse temperature (CLIP: ln(1/0.07) at init)
                           text.token_embedding.weight   [V, W]
                           text.positional_embedding     [T, W]   learned, T = context length
                           text.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
                                                                  pre-norm blocks, the ViT's Block layout
                           text.ln_final.{weight,bias}   [W]
    backbone.json          the image fields of every export ("method": "clip", arch, img_size, ...,
                           "feature": "cls", mean, std, step, run) plus
                           "clip": {"embed_dim": E,
                                    "text": {"vocab_size": V, "context_length": T, "width": W,
                                             "depth": L, "num_heads": H, "mlp_ratio": 4.0,
                                             "norm_eps": 1e-5, "causal": true,
                                             "pool": "eot" | "first" | "last",
                                             "tokenizer": "openai-bpe"}}
    COMPLETE               written last, covering every file above

Semantics (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): ``image_embedding = normalize(visual_proj(norm(vit(x))[:, 0]))``;
``text_embedding = normalize(text_proj(ln_final(blocks(tok_emb + pos_emb))[eot]))`` where the blocks use
a causal mask and ``eot`` is the position of the end-of-text token (the largest token id with the
OpenAI BPE, as in CLIP; ``first``/``last`` pool the first / last non-padding token). Texts are
``[start] + BPE(text)[: T - 2] + [end]``, zero-padded to ``T``. Projections have no bias.

``tokenizer: "openai-bpe"`` is CLIP's byte-level BPE with a 49,408-token vocabulary, provided here by
``open_clip``'s bundled ``SimpleTokenizer`` (offline; install the ``[clip]`` extra).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from evals.errors import EvalInputError
from evals.export import BACKBONE_JSON, BACKBONE_WEIGHTS, COMPLETE, Export
from pretrain.models import Block, VisionTransformer

CLIP_STEM = "clip"
CLIP_WEIGHTS = f"{CLIP_STEM}.safetensors"
POOLS = ("eot", "first", "last")


@dataclass(frozen=True)
class TextSpec:
    """Text tower hyper-parameters (the ``clip.text`` object of ``backbone.json``)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    causal: bool = True
    pool: str = "eot"
    tokenizer: str = "openai-bpe"


class TextTransformer(nn.Module):
    """CLIP's text encoder with the ViT's pre-norm blocks.

    Args:
        spec: hyper-parameters.
    """

    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        if spec.pool not in POOLS:
            raise ValueError(f"text pool {spec.pool!r} is not valid; choose one of {POOLS}")
        self.spec = spec
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.positional_embedding = nn.Parameter(torch.zeros(spec.context_length, spec.width))  # [T, W]
        self.blocks = nn.ModuleList(
            Block(spec.width, spec.num_heads, spec.mlp_ratio, norm_eps=spec.norm_eps)
            for _ in range(spec.depth)
        )
        self.ln_final = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` (0 = padding) -> pooled features ``[B, W]``."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [B, T, W]
        for block in self.blocks:
            x = block(x, is_causal=self.spec.causal)
        x = self.ln_final(x)
        if self.spec.pool == "eot":
            pos = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        elif self.spec.pool == "last":
            pos = (tokens != 0).sum(dim=-1) - 1
        else:
            pos = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)
        return x[torch.arange(x.shape[0], device=x.device), pos]  # [B, W]


class ClipModel(nn.Module):
    """Image tower + text tower + projections (see the module docstring).

    Args:
        visual: the image ViT.
        text_spec: text tower hyper-parameters.
        embed_dim: joint embedding width ``E``.
    """

    def __init__(self, visual: VisionTransformer, text_spec: TextSpec, embed_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.visual_proj = nn.Linear(visual.embed_dim, embed_dim, bias=False)
        self.text = TextTransformer(text_spec)
        self.text_proj = nn.Linear(text_spec.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` -> L2-normalised embeddings ``[B, E]``."""
        return F.normalize(self.visual_proj(self.visual.forward_features(images)[:, 0]).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> L2-normalised embeddings ``[B, E]``."""
        return F.normalize(self.text_proj(self.text(tokens)).float(), dim=-1)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of ``clip.safetensors`` (everything but the image ViT)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("visual.")}


class Tokenizer:
    """Texts -> zero-padded token ids ``[B, T]`` (``[start] + BPE + [end]``, truncated to ``T``).

    Args:
        kind: ``openai-bpe``.
        context_length: ``T``.
    """

    def __init__(self, kind: str, context_length: int) -> None:
        if kind != "openai-bpe":
            raise EvalInputError(
                f"unknown tokenizer {kind!r} in the export's clip.text.tokenizer; known: openai-bpe"
            )
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError:
            raise EvalInputError(
                "the openai-bpe tokenizer needs open_clip (pip install -e '.[clip]' or open_clip_torch)"
            ) from None
        self._bpe = SimpleTokenizer()
        self.sot = self._bpe.encoder["<start_of_text>"]
        self.eot = self._bpe.encoder["<end_of_text>"]
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.int64)
        for i, text in enumerate(texts):
            ids = [self.sot, *self._bpe.encode(text)[: self.context_length - 2], self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


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
    return TextSpec(**clip["text"]), int(clip["embed_dim"])


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
    result = model.load_state_dict(
        {f"visual.{k}": v for k, v in export.state.items()} | export.extra[CLIP_STEM], strict=False
    )
    if result.missing_keys or result.unexpected_keys:
        raise EvalInputError(
            f"{export.path / CLIP_WEIGHTS} does not match clip in {BACKBONE_JSON}: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model.eval(), Tokenizer(spec.tokenizer, spec.context_length)


def write_clip_export(path: str | os.PathLike[str], model: ClipModel, meta: dict[str, Any]) -> Path:
    """Write a CLIP export following the contract (reference writer; ``COMPLETE`` last).

    Args:
        path: the export directory (created).
        model: the model.
        meta: the image fields of ``backbone.json`` (arch, img_size, ..., step, run); ``method`` and
            ``clip`` are filled in here.

    Returns:
        The directory.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    visual = {k: v.detach().float().contiguous() for k, v in model.visual.state_dict().items()}
    heads = {k: v.detach().float().contiguous() for k, v in model.head_state_dict().items()}
    save_file(visual, str(out / BACKBONE_WEIGHTS), metadata={"format": "pt"})
    save_file(heads, str(out / CLIP_WEIGHTS), metadata={"format": "pt"})
    full = {
        **meta,
        "method": "clip",
        "clip": {"embed_dim": model.visual_proj.out_features, "text": asdict(model.text.spec)},
    }
    (out / BACKBONE_JSON).write_text(json.dumps(full, indent=2), encoding="utf-8")
    (out / COMPLETE).write_text(json.dumps({"step": meta.get("step")}), encoding="utf-8")
    return out

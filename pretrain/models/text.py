"""CLIP's text encoder and its tokenizer (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision", §2.4), shared by training (:mod:`pretrain.methods.clip`) and evaluation
(:mod:`evals.clip`).

The text tower is a causal (masked self-attention) Transformer over byte-level BPE tokens: token embedding
plus a learned position embedding of ``context_length`` positions, pre-norm blocks (the ViT's
:class:`~pretrain.models.vit.Block`, GELU MLP, LayerNorm eps 1e-5 as in CLIP/OpenCLIP), a final LayerNorm,
and the feature of the end-of-text token (the highest id in each sequence, as CLIP's ``argmax`` pooling).
Sizes of the published models (OpenCLIP ``model_configs``): ViT-B/32 and ViT-B/16 use width 512, 8 heads,
12 layers; ViT-L/14 width 768, 12 heads, 12 layers; all with context 77 and a 49,408-token vocabulary.

The parameter layout maps one to one onto OpenCLIP's (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
``ln_final``): see :mod:`evals.export_openclip`.

Tokens: ``[<start_of_text>] + BPE(caption) + [<end_of_text>]``, zero-padded to ``context_length``; a
caption that is too long is truncated and keeps ``<end_of_text>`` as its last token. One implementation,
:func:`data_pipelines.tokenizer.tokenize` (OpenAI's BPE through open_clip's bundled ``SimpleTokenizer``,
offline), used by the training loader and, through :class:`TextTokenizer`, by evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.vit import Block

__all__ = ["POOLS", "TOKENIZERS", "TextSpec", "TextTokenizer", "TextTransformer"]

POOLS = ("eot", "first", "last")
TOKENIZERS = ("openai-bpe",)


@dataclass(frozen=True)
class TextSpec:
    """Text tower hyper-parameters (the ``clip.text`` object of an export's ``backbone.json``).

    Attributes:
        vocab_size: BPE vocabulary (49,408 for CLIP's tokenizer).
        context_length: tokens per caption (77 in CLIP).
        width: token width ``W``.
        depth: blocks.
        num_heads: attention heads (``W / 64`` in CLIP).
        mlp_ratio: MLP hidden width as a multiple of ``W``.
        norm_eps: LayerNorm epsilon (PyTorch's default 1e-5, as CLIP).
        causal: masked self-attention (CLIP §2.4).
        pool: ``eot`` (the end-of-text token: the largest id), ``first`` or ``last`` non-padding token.
        tokenizer: ``openai-bpe``.
    """

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

    def validate(self) -> list[str]:
        """Problems with these values (empty when valid), phrased with the field names."""
        errors = []
        for key in ("vocab_size", "width", "depth", "num_heads"):
            if getattr(self, key) < 1:
                errors.append(f"{key}={getattr(self, key)} must be >= 1")
        if self.context_length < 2:
            errors.append(f"context_length={self.context_length} must be >= 2 (start and end tokens)")
        if self.num_heads >= 1 and self.width % self.num_heads:
            errors.append(f"num_heads={self.num_heads} must divide width={self.width}")
        if self.mlp_ratio <= 0:
            errors.append(f"mlp_ratio={self.mlp_ratio} must be > 0")
        if self.pool not in POOLS:
            errors.append(f"pool={self.pool!r} is not valid; choose one of {', '.join(POOLS)}")
        if self.tokenizer not in TOKENIZERS:
            errors.append(f"tokenizer={self.tokenizer!r} is not valid; known: {', '.join(TOKENIZERS)}")
        return errors


class TextTransformer(nn.Module):
    """CLIP's causal text Transformer: token ids ``[B, T]`` -> pooled features ``[B, W]``.

    Args:
        spec: hyper-parameters.
    """

    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        errors = spec.validate()
        if errors:
            raise ValueError("text tower: " + "; ".join(errors))
        self.spec = spec
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.positional_embedding = nn.Parameter(torch.zeros(spec.context_length, spec.width))  # [T, W]
        self.blocks = nn.ModuleList(
            Block(spec.width, spec.num_heads, spec.mlp_ratio, norm_eps=spec.norm_eps)
            for _ in range(spec.depth)
        )
        self.ln_final = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenCLIP's text initialisation (``open_clip/transformer.py`` ``TextTransformer.init_parameters``).

        Token embedding N(0, 0.02), position embedding N(0, 0.01); per block ``qkv`` N(0, W^-1/2),
        ``attn.proj`` and ``mlp.fc2`` N(0, W^-1/2 (2 depth)^-1/2), ``mlp.fc1`` N(0, (2W)^-1/2); biases zero,
        LayerNorms one/zero.
        """
        width, depth = self.spec.width, self.spec.depth
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (activation checkpointing, non-reentrant)."""
        self.grad_checkpointing = enable

    def pool_positions(self, tokens: Tensor) -> Tensor:
        """Index of the pooled token of each sequence ``[B]`` (see :attr:`TextSpec.pool`)."""
        if self.spec.pool == "eot":
            return tokens.argmax(dim=-1)  # <end_of_text> has the largest id (CLIP's argmax pooling)
        if self.spec.pool == "last":
            return ((tokens != 0).sum(dim=-1) - 1).clamp(min=0)
        return torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids ``[B, T]`` (0 = padding, ``T <= context_length``) -> pooled features ``[B, W]``."""
        if tokens.ndim != 2 or tokens.shape[1] > self.spec.context_length:
            raise ValueError(
                f"expected token ids [B, T] with T <= {self.spec.context_length}, got shape {tuple(tokens.shape)}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [B, T, W]
        causal = self.spec.causal
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, causal, use_reentrant=False)
            else:
                x = block(x, is_causal=causal)
        x = self.ln_final(x)  # [B, T, W]
        return x[torch.arange(x.shape[0], device=x.device), self.pool_positions(tokens)]  # [B, W]


class TextTokenizer:
    """Captions -> token ids ``[B, context_length]``: the tokenizer an export's ``clip.text.tokenizer`` names.

    Args:
        kind: ``openai-bpe``.
        context_length: tokens per caption.

    Raises:
        ValueError: unknown tokenizer kind.
        ImportError: open_clip (which ships the BPE vocabulary) is not installed.
    """

    def __init__(self, kind: str = "openai-bpe", context_length: int = 77) -> None:
        if kind not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {kind!r}; known: {', '.join(TOKENIZERS)}")
        from data_pipelines.tokenizer import EOT_TOKEN, SOT_TOKEN, get_tokenizer

        self._bpe = get_tokenizer()  # fails early (ImportError) if open_clip is missing
        self.kind, self.context_length = kind, context_length
        self.sot, self.eot = SOT_TOKEN, EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens (lower-cased, whitespace-cleaned as CLIP does)."""
        return list(self._bpe.encode(text))

    def __call__(self, texts: str | list[str]) -> Tensor:
        """int64 ``[N, context_length]``: start, BPE ids, end, zeros (the training loader's function)."""
        from data_pipelines.tokenizer import tokenize

        return tokenize(texts, self.context_length)


def default_logit_scale() -> float:
    """CLIP's initial logit scale: ``ln(1 / 0.07)`` (temperature 0.07, §2.5)."""
    return math.log(1 / 0.07)

"""Caption tokenizer for CLIP: OpenAI CLIP's byte-level BPE through open_clip's ``SimpleTokenizer``.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML
2021: lower-cased byte-pair encoding with a 49,408-token vocabulary, sequences wrapped in
``<start_of_text>`` (49406) and ``<end_of_text>`` (49407), truncated or zero-padded to a context
of 77 tokens (a truncated caption keeps ``<end_of_text>`` as its last token). The vocabulary file
ships inside the ``open_clip_torch`` wheel, so this works offline.

open_clip's package ``__init__`` imports its whole model zoo (timm, hub clients: seconds per
process). The tokenizer module itself only needs ``ftfy`` and ``regex``, so it is loaded from the
installed package's file without running that ``__init__``; when that is not possible (an
unusual install), the regular import is used.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407
VOCAB_SIZE = 49408

_lock = threading.Lock()
_tokenizer: Any = None


def _tokenizer_module() -> ModuleType:
    if "open_clip.tokenizer" in sys.modules:  # already imported by someone: reuse it
        return sys.modules["open_clip.tokenizer"]
    spec = importlib.util.find_spec("open_clip")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "captions need open_clip's tokenizer: pip install 'open_clip_torch>=2.24' (or the [clip] extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    if not path.is_file():
        from open_clip import tokenizer  # layout changed: fall back to the regular import

        return tokenizer
    file_spec = importlib.util.spec_from_file_location("_ssl_open_clip_tokenizer", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def get_tokenizer() -> Any:
    """The process-wide ``open_clip.tokenizer.SimpleTokenizer`` (built on first use, ~0.5 s).

    Returns:
        A callable ``(texts, context_length) -> LongTensor[N, context_length]``.

    Raises:
        ImportError: ``open_clip_torch`` is not installed.
    """
    global _tokenizer
    with _lock:
        if _tokenizer is None:
            _tokenizer = _tokenizer_module().SimpleTokenizer()
        return _tokenizer


def tokenize(texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """Tokenize captions for CLIP.

    Args:
        texts: one caption or a list of captions.
        context_length: tokens per caption (77 for CLIP).

    Returns:
        int64 tensor [N, context_length]: ``<start_of_text>``, BPE ids, ``<end_of_text>``, zeros.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
    if isinstance(texts, str):
        texts = [texts]
    tokens = get_tokenizer()(list(texts), context_length=context_length)
    return tokens.to(torch.int64)

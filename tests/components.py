"""The suite's one rule for missing components: skip on a developer's machine, fail under ``CI=true``.

CI installs everything the tests need (``make test``: the venv, Debian's data sets, the SLURM
packages), so a component missing there is a broken install step, never a reason to skip. Only
GPU-marked tests may skip under CI (no CUDA on the CI machines); ``tests/conftest.py`` turns any
other skip under ``CI=true`` into a failure, so a new ``pytest.importorskip`` cannot hide one.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip a test whose component is missing; under CI=true a missing component is a failure."""
    if IN_CI:
        pytest.fail(f"CI=true and a required component is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, install_hint: str) -> ModuleType:
    """Import ``name`` or :func:`skip_or_fail` saying how to install it (``install_hint``)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"{name} not importable ({exc}); install it: {install_hint}")
        raise  # not reached: skip_or_fail raises


def require_cuda() -> None:
    """GPU-only tests skip without CUDA, also under CI (the CI machines have no GPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

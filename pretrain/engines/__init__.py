"""Engines: how a method's parameters are placed, sharded, cast and updated (chosen by ``engine.name``)."""

from __future__ import annotations

from typing import Any

from pretrain.distributed import DistEnv
from pretrain.engines.base import Engine
from pretrain.engines.fsdp import FSDP2Engine
from pretrain.engines.single import SingleEngine

ENGINES: dict[str, type[Engine]] = {"single": SingleEngine, "fsdp2": FSDP2Engine}


def build_engine(cfg: Any, env: DistEnv) -> Engine:
    """The engine named by ``cfg.engine.name`` (``auto``: fsdp2 on several ranks, else single)."""
    name = cfg.engine.name
    if name == "auto":
        name = "fsdp2" if env.world_size > 1 else "single"
    if name not in ENGINES:
        raise ValueError(f"engine.name={name!r}: valid engines are {', '.join(sorted(ENGINES))}, auto")
    return ENGINES[name](cfg, env)


__all__ = ["ENGINES", "Engine", "build_engine"]

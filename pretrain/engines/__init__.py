"""Engines: how a method's parameters are placed, sharded, cast and updated (chosen by ``engine.name``).

A registry like the methods': each engine registers itself with a name and, optionally, a dataclass of
its options, which becomes the config section ``engine.<name>`` (unknown keys there are refused with the
nearest valid one, as everywhere). Nothing outside this package branches on an engine's name: the config
validator, the process-group set-up and the trainer ask the engine class.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from pretrain.distributed import DistEnv
from pretrain.engines.base import Engine

AUTO = "auto"  # fsdp2 on several ranks, else single
ENGINES: dict[str, type[Engine]] = {}
ENGINE_OPTIONS: dict[str, type] = {}


def register_engine(name: str, options: type | None = None) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: make ``engine.name=<name>`` build this engine; ``options`` types ``engine.<name>``."""

    def deco(cls: type[Engine]) -> type[Engine]:
        if name in ENGINES or name == AUTO:
            raise ValueError(f"engine {name!r} is already registered")
        ENGINES[name] = cls
        if options is not None:
            ENGINE_OPTIONS[name] = options
        return cls

    return deco


def resolve_engine_name(name: str, world_size: int) -> str:
    """``auto`` -> ``fsdp2`` on several ranks, ``single`` on one; other names unchanged."""
    if name == AUTO:
        return "fsdp2" if world_size > 1 else "single"
    return name


def engine_class(name: str, world_size: int = 1) -> type[Engine]:
    """The engine class for ``engine.name`` (after resolving ``auto``); ValueError lists the valid names."""
    resolved = resolve_engine_name(name, world_size)
    if resolved not in ENGINES:
        raise ValueError(f"engine.name={name!r}: valid engines are {', '.join(sorted(ENGINES))}, {AUTO}")
    return ENGINES[resolved]


def needs_process_group(name: str) -> bool:
    """Whether the engine ``name`` needs torch.distributed initialised even in one process."""
    return name != AUTO and name in ENGINES and ENGINES[name].needs_process_group(1)


def validate_engine_config(cfg: Any, world_size: int, errors: list[str]) -> None:
    """The engine name (the nearest valid one when unknown), then the chosen engine's own checks."""
    name = str(cfg.engine.name)
    valid = [AUTO, *sorted(ENGINES)]
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        errors.append(f"engine.name={name!r} is not valid{hint} Valid values: {', '.join(valid)}")
        return
    engine_class(name, world_size).validate_config(cfg, world_size, errors)


def build_engine(cfg: Any, env: DistEnv) -> Engine:
    """The engine named by ``cfg.engine.name`` for this process's distributed environment."""
    return engine_class(str(cfg.engine.name), env.world_size)(cfg, env)


# Self-registration (each module decorates its class); their heavy imports (DeepSpeed) are deferred.
from pretrain.engines import deepspeed_zero, fsdp, single  # noqa: E402,F401

__all__ = [
    "ENGINES",
    "ENGINE_OPTIONS",
    "Engine",
    "build_engine",
    "engine_class",
    "needs_process_group",
    "register_engine",
    "resolve_engine_name",
    "validate_engine_config",
]

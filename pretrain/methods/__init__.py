"""Pretraining methods, registered by name (the name used in configs as ``method.name``).

A method is one file in this package plus one config. It registers itself with
:func:`register_method` and is found by :func:`build_method`; nothing else in the code base
branches on the method's name.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from pretrain.methods.base import Method, MethodConfigBase

_METHODS: dict[str, tuple[type[Method], type]] = {}
_DISCOVERED = False


def register_method(name: str, config: type) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` available as ``method.name: <name>`` with config dataclass ``config``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name][0] is not cls:
            raise ValueError(f"method '{name}' is registered twice ({_METHODS[name][0]} and {cls})")
        _METHODS[name] = (cls, config)
        cls.method_name = name
        return cls

    return wrap


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",):
            importlib.import_module(f"{__name__}.{info.name}")
    _DISCOVERED = True


def list_methods() -> list[str]:
    _discover()
    return sorted(_METHODS)


def _lookup(name: str) -> tuple[type[Method], type]:
    _discover()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown method.name '{name}'{hint}. Valid methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_class(name: str) -> type[Method]:
    """The class of method ``name`` (raises KeyError naming the valid methods)."""
    return _lookup(name)[0]


def method_config_class(name: str) -> type:
    """The config dataclass of method ``name`` (raises KeyError naming the valid methods)."""
    return _lookup(name)[1]


def build_method(cfg: Any) -> Method:
    """Instantiate the method named by ``cfg.method.name`` from the whole resolved config."""
    cls, _ = _lookup(cfg.method.name)
    return cls(cfg)


__all__ = [
    "Method",
    "MethodConfigBase",
    "build_method",
    "list_methods",
    "method_class",
    "method_config_class",
    "register_method",
]

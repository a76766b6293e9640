"""Method registry: ``build_method("mean_teacher", network, options, ctx)``; one file per method."""
from __future__ import annotations

from ..errors import SemiSegError
from .base import Method, MethodContext, NoOptions

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise SemiSegError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _discover() -> None:
    """Import every module of this package: each method file registers itself (no list to edit)."""
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        if not info.ispkg and info.name not in ("base", "common") and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = ["METHODS", "Method", "MethodContext", "NoOptions", "get_method", "register_method"]

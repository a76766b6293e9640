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


from . import supervised, mean_teacher, ua_mt  # noqa: E402,F401  (registration side effect)

__all__ = ["METHODS", "Method", "MethodContext", "NoOptions", "get_method", "register_method"]

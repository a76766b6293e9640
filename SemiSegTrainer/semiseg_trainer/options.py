"""Command-line options generated from the typed configuration (``TrainConfig`` and each method's
``Options`` dataclass), so every hyper-parameter is an option with its documented default."""
from __future__ import annotations

import argparse
import dataclasses

from semiseg.config import PRESETS, TrainConfig
from semiseg.fields import field_choices, field_kind, scalar_type
from semiseg.methods import METHODS

METHOD_PREFIX = "opt__"


def _add_field(group, f: dataclasses.Field, dest: str, default_text: str) -> None:
    meta = f.metadata or {}
    # a field may name its option differently (metadata "flag"); its own name stays an alias
    flags = ["--" + f.name.replace("_", "-")]
    if meta.get("flag"):
        flags.insert(0, "--" + meta["flag"])
    help_text = f"{meta.get('help', '')} [{default_text}]"
    kw: dict = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    kind = field_kind(f)
    if kind == "bool":
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        return
    if kind in ("ints", "floats"):
        group.add_argument(*flags, nargs="+", type=scalar_type(f), metavar="N", **kw)
        return
    if kind == "dict":
        return
    kw["type"] = scalar_type(f)
    kw["metavar"] = f.name.upper()
    if field_choices(f):
        kw["choices"] = [c for c in field_choices(f) if c != ""]
    group.add_argument(*flags, **kw)


def add_config_options(parser: argparse.ArgumentParser, title: str, skip: tuple[str, ...] = (),
                       only: tuple[str, ...] = ()) -> None:
    """One option per ``TrainConfig`` field (``only`` these if given, except ``skip``), in a group ``title``."""
    g = parser.add_argument_group(title)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip or (only and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        _add_field(g, f, f.name, "preset" if default in (0, "", ()) else f"default {default}")


def add_train_options(parser: argparse.ArgumentParser, method: str) -> None:
    add_config_options(parser, "training configuration (defaults from the preset; see `semiseg presets`)")
    cls = METHODS[method]
    g = parser.add_argument_group(f"method '{method}' hyper-parameters ({cls.description})")
    for f in dataclasses.fields(cls.Options):
        d = f.default if f.default is not dataclasses.MISSING else None
        presets = {p: v[f.name] for p, v in cls.option_presets.items() if f.name in v}
        extra = "; " + ", ".join(f"{p}: {v}" for p, v in presets.items()) if presets else ""
        _add_field(g, f, METHOD_PREFIX + f.name, f"default {d}{extra}")


def split_args(ns: argparse.Namespace) -> dict:
    """Explicitly given options -> the ``explicit`` layer of ``resolve_config``."""
    values = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    opts = {k[len(METHOD_PREFIX):]: v for k, v in vars(ns).items() if k.startswith(METHOD_PREFIX)}
    if opts:
        values["method_options"] = opts
    for k, v in list(values.items()):
        if isinstance(v, list):
            values[k] = tuple(v)
    return values


def describe_presets() -> str:
    lines = []
    for name, p in PRESETS.items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items()))
    return "\n".join(lines)

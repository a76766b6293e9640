"""Command-line options generated from the typed configuration (``TrainConfig`` and each method's
``Options`` dataclass), so every hyper-parameter is an option with its documented default."""
from __future__ import annotations

import argparse
import dataclasses

from semiseg.config import PRESETS, TrainConfig
from semiseg.fields import field_choices, field_kind, parse_text, scalar_type
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


def build_train_config(ns: argparse.Namespace):
    """The ``TrainConfig`` of parsed ``train`` options (``--config FILE`` values under the command line's)."""
    from semiseg.config import load_config_file, resolve_config
    file_values = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    return resolve_config(split_args(ns), file_values)


def parse_method_sets(items: list[str], methods: list[str]) -> dict[str, dict]:
    """``--set METHOD.OPTION=VALUE`` (one method) or ``--set OPTION=VALUE`` (every listed method that has it)."""
    from semiseg.config import matched_method
    from semiseg.errors import SemiSegError
    from semiseg.methods import get_method
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SemiSegError(f"--set {item}: expected [METHOD.]OPTION=VALUE")
        target, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        targets = [target] if target else methods
        if target and target not in methods:
            raise SemiSegError(f"--set {item}: method '{target}' is not in --methods ({', '.join(methods)})")
        hit = False
        for m in targets:  # supervised@X takes X's options (its baseline is derived from X's run)
            fields = {f.name: f for f in dataclasses.fields(get_method(matched_method(m)).Options)}
            if name not in fields:
                if target:
                    raise SemiSegError(f"--set {item}: method '{m}' has no option '{name}' "
                                       f"(options: {', '.join(fields) or 'none'})")
                continue
            try:
                out.setdefault(m, {})[name] = parse_text(fields[name], value)
            except ValueError as e:
                raise SemiSegError(f"--set {item}: {e}") from None
            hit = True
        if not hit:
            raise SemiSegError(f"--set {item}: none of {', '.join(methods)} has an option '{name}'")
    return out


def describe_presets() -> str:
    lines = []
    for name, p in PRESETS.items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items()))
    return "\n".join(lines)

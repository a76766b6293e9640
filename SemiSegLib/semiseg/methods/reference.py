"""What each method's reference ran, as data: its paper and code, the values of its runs, its published
evaluation protocol, and why SemiSeg's default differs where it does.

One record per method (``Method.reference``) feeds three things, so they cannot drift apart:
``--protocol paper`` applies ``protocol``; ``semiseg methods --deviations`` (and the README section it
generates) lists every field where the resolved SemiSeg default differs from ``runs``/``protocol``; and a
test fails when such a difference has no declared reason (``ours``) or a declared one no longer holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROTOCOL_FIELDS = ("selection", "val_every", "val_from", "lcc", "empty")
PAPER_PROTOCOL_LABEL = "paper protocol"
# SemiSeg's own protocol on every preset: the reported checkpoint is chosen without the test set
HONEST = "SemiSeg never selects a checkpoint on the test set by default (final or validation selection)"


@dataclass(frozen=True)
class Differs:
    """A declared difference: SemiSeg's default value ``ours`` and why."""
    ours: Any
    reason: str


@dataclass(frozen=True)
class Note:
    """A difference no configuration field expresses."""
    what: str
    reason: str
    restore: str = "not offered"


@dataclass(frozen=True)
class Reference:
    paper: str
    code: str  # repository and files read
    # preset -> the reference's values of TrainConfig fields or method options; "2d" = every 2D preset
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # preset -> the published evaluation protocol (PROTOCOL_FIELDS), applied by --protocol paper
    protocol: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "field" (any preset) or "preset:field" -> the declared difference from the reference
    differs: dict[str, Differs] = field(default_factory=dict)
    notes: tuple[Note, ...] = ()
    # named variants of the recipe (--recipe NAME): fields set on every preset
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


VAL_TEST = Note("selection and evaluation on val + test (60 ACDC volumes)",
                "SemiSeg keeps the test set out of selection",
                "`--protocol paper --test-split LIST` with LIST naming the 20 val and 40 test volumes")
ACDC_VAL = {"selection": "val", "val_every": 200}  # SSL4MIS lineage: best on val (20 volumes) every 200 it
LA_FINAL = {"selection": "final", "lcc": False, "empty": "zero"}  # UA-MT, CAML: final iteration, no LCC


def _presets_of(key: str) -> list[str]:
    from ..presets import PRESETS
    if key in ("2d", "3d"):
        return [p for p, v in PRESETS.items() if v["dim"] == int(key[0])]
    return [key]


def _value(cfg, name: str):
    v = getattr(cfg, name) if hasattr(cfg, name) else cfg.method_options.get(name)
    return list(v) if isinstance(v, tuple) else v


def flag(name: str, value) -> str:
    """The command-line option that sets ``name`` to ``value``."""
    opt = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return opt if value else "--no-" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        return f"{opt} {' '.join(map(str, value))}"
    return f"{opt} {value}"


def deviations(method: str) -> list[dict]:
    """Every field where the method's resolved default differs from its reference, one row per
    (preset, field): reference value, SemiSeg's value, the declared reason (or None when undeclared)
    and the option that restores the reference."""
    from ..config import resolve_config
    from . import get_method
    ref: Reference | None = get_method(method).reference
    if ref is None:
        return []
    rows = []
    for kind, table in (("recipe", ref.runs), ("protocol", ref.protocol)):
        for key, values in table.items():
            for preset in _presets_of(key):
                cfg = resolve_config({"method": method, "preset": preset})
                for name, theirs in values.items():
                    ours = _value(cfg, name)
                    if ours == (list(theirs) if isinstance(theirs, tuple) else theirs):
                        continue
                    declared = ref.differs.get(f"{preset}:{name}") or ref.differs.get(name)
                    restore = "--protocol paper" if kind == "protocol" else flag(name, theirs)
                    rows.append({"method": method, "preset": preset, "kind": kind, "field": name,
                                 "reference": theirs, "ours": ours, "declared": declared, "restore": restore})
    return rows


def undeclared(method: str) -> list[str]:
    """Differences without a matching declaration, and declarations that match no difference."""
    from . import get_method
    ref = get_method(method).reference
    problems, used = [], set()
    for row in deviations(method):
        key = f"{row['preset']}:{row['field']}"
        name = key if key in ref.differs else row["field"]
        d = row["declared"]
        if d is None:
            problems.append(f"{method} {key}: default {row['ours']!r} differs from the reference's "
                            f"{row['reference']!r} without a declared reason")
        elif d.ours != row["ours"]:
            problems.append(f"{method} {key}: declared default {d.ours!r}, resolved {row['ours']!r}")
        used.add(name)
    for name in set(ref.differs if ref else ()) - used:
        problems.append(f"{method} {name}: declared difference no longer differs from the reference")
    return problems


def paper_protocol(method: str, preset: str) -> dict[str, Any] | None:
    """The published protocol of ``method`` on ``preset`` data, or None when no paper ran it there."""
    from . import get_method
    ref = get_method(method).reference
    if ref is None:
        return None
    for key, values in ref.protocol.items():
        if preset in _presets_of(key):
            return dict(values)
    return None


def protocol_label(protocol: str, selection: str) -> str:
    """How a results header names the protocol: "paper protocol (test-selected)", "SemiSeg protocol
    (val-selected)", ... so a test-selected figure is never mistaken for an honest one."""
    who = PAPER_PROTOCOL_LABEL if protocol == "paper" else "SemiSeg protocol"
    return f"{who} ({selection}-selected)"


def table_lines(methods: list[str]) -> list[str]:
    """The deviations table as Markdown lines (``semiseg methods --deviations`` and the README)."""
    from . import get_method
    lines = []
    for m in methods:
        ref = get_method(m).reference
        if ref is None:
            continue
        lines += [f"#### {m}", "", f"Reference: {ref.paper}; code: {ref.code}.", ""]
        rows = deviations(m)
        merged: dict[tuple, list[str]] = {}
        for r in rows:
            d = r["declared"]
            key = (r["field"], repr(r["reference"]), repr(r["ours"]), d.reason if d else "UNDECLARED", r["restore"])
            merged.setdefault(key, []).append(r["preset"])
        if merged or ref.notes:
            lines += ["| data | difference | reference | SemiSeg | why | restores the reference |",
                      "|---|---|---|---|---|---|"]
            for (name, theirs, ours, why, restore), presets in merged.items():
                lines.append(f"| {', '.join(presets)} | `{name}` | {theirs} | {ours} | {why} | `{restore}` |")
            for n in ref.notes:
                lines.append(f"| | {n.what} | | | {n.reason} | {n.restore} |")
        else:
            lines.append("No known difference.")
        if ref.variants:
            lines.append("")
            for name, values in ref.variants.items():
                lines.append(f"Named recipe `--recipe {name}`: " + ", ".join(flag(k, v) for k, v in values.items()) + ".")
        lines.append("")
    return lines

"""Reading a configuration dataclass field (``TrainConfig``, a method's ``Options``): its kind and how a
value given as text or as JSON becomes a value of that kind. The one reader behind the command-line
options, ``--set METHOD.OPTION=VALUE``, config files and the Slicer panel's generated controls.

Kinds: ``bool``, ``int``, ``float``, ``str``, ``ints`` / ``floats`` (tuples), ``dict``. The field's
``metadata["choices"]`` (if any) lists the allowed values. Free of torch (the Slicer module uses it)."""
from __future__ import annotations

import dataclasses

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def field_kind(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.startswith("tuple"):
        return "floats" if "float" in t else "ints"
    if t.startswith("dict"):
        return "dict"
    return t if t in ("int", "float", "bool") else "str"


def field_choices(f: dataclasses.Field) -> list:
    return list((f.metadata or {}).get("choices") or [])


def parse_text(f: dataclasses.Field, text: str):
    """A value of ``f``'s kind from text (``--set``): booleans as true/false/1/0/yes/no/on/off, tuples as
    numbers separated by spaces or commas. Raises ValueError with a short reason."""
    kind = field_kind(f)
    if kind == "bool":
        low = text.strip().lower()
        if low not in _TRUE + _FALSE:
            raise ValueError(f"'{text}' is not a boolean")
        return low in _TRUE
    if kind in ("ints", "floats"):
        number = float if kind == "floats" else int
        return tuple(number(v) for v in text.replace(",", " ").split())
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def scalar_type(f: dataclasses.Field):
    """The Python type one command-line word of ``f`` converts to (a tuple field's element type)."""
    return {"int": int, "float": float, "ints": int, "floats": float}.get(field_kind(f), str)


def from_json(f: dataclasses.Field, value):
    """A value read from JSON/YAML (config files, config.json) as the field holds it: lists of tuple
    fields become tuples."""
    if isinstance(value, list) and field_kind(f) in ("ints", "floats"):
        return tuple(value)
    return value

"""What the Slicer panel offers, computed by the engine in the trainer's process (``semiseg catalog --json``)
so that Slicer's own process never imports torch: every method with its description and hyper-parameters
(its ``Options`` dataclass), the shared training options (``TrainConfig``), the presets, the devices, and for
each (method, dimension, preset) the values a run would use (the paper's defaults per recipe).

The panel (SemiSegExtension/SemiSegSlicerLib/catalog.py) only reads this JSON.
"""
from __future__ import annotations

import dataclasses

# TrainConfig fields the panel shows elsewhere (inputs, main controls) or that only the job itself sets
PANEL_FIELDS = {"data", "labeled", "val_split", "test_split", "dim", "method", "preset", "iterations",
                "labeled_batch", "unlabeled_batch", "patch_size", "device", "threads", "method_options",
                "log_every", "checkpoint_every", "cache_dir",
                "sync_bn", "find_unused_parameters"}  # the last two: torchrun only, the panel runs one process


def widget_kind(f: dataclasses.Field) -> str:
    """int | float | bool | str | choice | ints | floats: the widget a field needs (the engine's field reader
    decides the kind; a field with choices is a combo box)."""
    from semiseg.fields import field_choices, field_kind
    if field_choices(f):
        return "choice"
    kind = field_kind(f)
    return "str" if kind == "dict" else kind


def _json_value(v):
    return list(v) if isinstance(v, tuple) else v


def field_infos(cls) -> list[dict]:
    """One entry per user-facing field of a dataclass; fields marked ``internal`` in their metadata (set by
    the engine itself, never by a user) are left out."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata or {}
        if meta.get("internal"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append({"name": f.name, "kind": widget_kind(f), "default": _json_value(default),
                    "help": str(meta.get("help", "")), "choices": list(meta.get("choices", []))})
    return out


def default_preset(dim: int) -> str:
    return "generic2d" if dim == 2 else "generic3d"


def build() -> dict:
    """The whole catalog (a few hundred kB of JSON)."""
    from semiseg import devices
    from semiseg.config import PRESETS, TrainConfig, resolve_config
    from semiseg.methods import METHODS
    methods = sorted(METHODS.items(), key=lambda kv: (kv[0] != "supervised", kv[0]))
    training = [o for o in field_infos(TrainConfig) if o["name"] not in PANEL_FIELDS]
    recipes: dict[str, dict] = {}
    for name, cls in methods:
        option_names = [o["name"] for o in field_infos(cls.Options)]
        for dim in (2, 3):
            for preset in ["", *PRESETS]:
                key = recipe_key(name, dim, preset)
                try:
                    explicit = {"method": name, "dim": dim, "data": "files.csv", **({"preset": preset} if preset else {})}
                    cfg = resolve_config(explicit).to_dict()
                    options = cls.default_options(preset or default_preset(dim), dim)
                    recipes[key] = {"config": {k: _json_value(v) for k, v in cfg.items()},
                                    "method_options": {k: _json_value(getattr(options, k)) for k in option_names}}
                except Exception as e:  # noqa: BLE001 - an impossible combination is shown as such
                    recipes[key] = {"error": " ".join(str(e).split())}
    return {
        "format": "semiseg-panel-catalog", "version": 1,
        "methods": [{"name": name, "description": cls.description, "uses_unlabeled": bool(cls.uses_unlabeled),
                     "options": field_infos(cls.Options)} for name, cls in methods],
        "training_options": training,
        "presets": list(PRESETS),
        "recipes": recipes,
        "devices": devices.describe(),
    }


def recipe_key(method: str, dim: int, preset: str = "") -> str:
    return f"{method}|{int(dim)}|{preset}"

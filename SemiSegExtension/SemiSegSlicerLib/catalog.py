"""What the panel offers, read from the engine at run time (no Qt): methods with their one-line
descriptions and hyper-parameters (each method's ``Options`` dataclass, paper defaults per preset),
the recipe presets, the devices, and the training configuration a panel state stands for.

Importing the engine's method registry imports torch: call these only after the dependency check.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class OptionInfo:
    name: str
    kind: str                  # int | float | bool | str | choice | ints | floats
    default: object
    help: str = ""
    choices: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


@dataclass
class MethodInfo:
    name: str
    description: str
    uses_unlabeled: bool
    options: list[OptionInfo]


def _kind(f: dataclasses.Field) -> str:
    from semiseg.fields import field_choices, field_kind  # the engine's one reader of a field's type
    if field_choices(f):
        return "choice"
    kind = field_kind(f)
    return "str" if kind == "dict" else kind


def option_infos(options_cls, defaults=None) -> list[OptionInfo]:
    """One entry per field of an ``Options`` dataclass; ``defaults`` (an instance) overrides the
    field defaults (the paper's values for a preset/dimension)."""
    out = []
    for f in dataclasses.fields(options_cls):
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        meta = f.metadata or {}
        out.append(OptionInfo(f.name, _kind(f), default, str(meta.get("help", "")),
                              [c for c in meta.get("choices", [])]))
    return out


def methods(preset: str = "generic3d", dim: int = 3) -> list[MethodInfo]:
    """Every registered method (auto-discovered files), sorted with the baseline first."""
    from semiseg.methods import METHODS
    out = []
    for name, cls in METHODS.items():
        out.append(MethodInfo(name, cls.description, bool(cls.uses_unlabeled),
                              option_infos(cls.Options, cls.default_options(preset, dim))))
    return sorted(out, key=lambda m: (m.name != "supervised", m.name))


# TrainConfig fields the panel shows elsewhere (inputs, main controls) or that only the job itself sets
PANEL_FIELDS = {"data", "labeled", "val_split", "test_split", "dim", "method", "preset", "iterations",
                "labeled_batch", "unlabeled_batch", "patch_size", "device", "threads", "method_options",
                "log_every", "checkpoint_every", "cache_dir",
                "sync_bn", "find_unused_parameters"}  # the last two: torchrun only, the panel runs one process


def training_options(method: str, dim: int = 3, preset: str = "") -> list[OptionInfo]:
    """Every other ``TrainConfig`` field (learning rate, schedule, EMA, precision, planning, class map,
    ...) for the panel's Advanced section, with the value the run would use for this method,
    dimension and preset. Generated from the dataclass, so a new field appears without panel code."""
    from semiseg.config import TrainConfig, resolve_config
    resolved = resolve_config({**training_config(method, dim, preset), "data": "files.csv"})
    return [o for o in option_infos(TrainConfig, resolved) if o.name not in PANEL_FIELDS]


def presets() -> list[str]:
    from semiseg.config import PRESETS
    return list(PRESETS)


def default_preset(dim: int) -> str:
    return "generic2d" if dim == 2 else "generic3d"


def training_config(method: str, dim: int, preset: str = "", iterations: int = 0, labeled_batch: int = 0,
                    unlabeled_batch: int = 0, patch_size=(), device: str = "auto", val_every: int | None = None,
                    method_options: dict | None = None, threads: int = 0, extra: dict | None = None) -> dict:
    """The explicit ``TrainConfig`` values of a panel state (0/empty = the preset's default)."""
    cfg: dict = {"method": method, "dim": int(dim), "device": device}
    if preset:
        cfg["preset"] = preset
    for key, value in (("iterations", iterations), ("labeled_batch", labeled_batch),
                       ("unlabeled_batch", unlabeled_batch), ("threads", threads)):
        if value:
            cfg[key] = int(value)
    if patch_size:
        cfg["patch_size"] = [int(p) for p in patch_size]
    if val_every is not None:
        cfg["val_every"] = int(val_every)
    if method_options:
        cfg["method_options"] = dict(method_options)
    cfg.update(extra or {})
    return cfg


def resolved(config: dict) -> dict:
    """The full configuration the trainer will use (preset and method defaults filled in); raises the
    engine's one-line ``SemiSegError`` for an impossible combination."""
    from semiseg.config import resolve_config
    return resolve_config({**config, "data": config.get("data", "files.csv")}).to_dict()


def device_info() -> dict:
    """torch/CUDA versions and the visible GPUs, plus the device choices for a combo box:
    ``[(value, text)]`` with "auto" first and always a CPU entry."""
    info: dict = {"torch": None, "cuda": None, "gpus": [], "choices": [], "text": ""}
    try:
        import torch
    except ImportError:
        info["text"] = "PyTorch is not installed (install it with the PyTorch extension)"
        info["choices"] = [("cpu", "CPU")]
        return info
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    gpus = info["gpus"]
    info["choices"] = ([("auto", f"Auto (GPU {gpus[0]['index']}: {gpus[0]['name']})")] if gpus else [("auto", "Auto (CPU: no GPU found)")])
    info["choices"] += [(f"cuda:{g['index']}", f"GPU {g['index']}: {g['name']}, {g['memory_gb']:g} GB") for g in gpus]
    info["choices"].append(("cpu", "CPU"))
    cuda = f"CUDA {info['cuda']}" if info["cuda"] else "CPU-only build"
    gpu_text = "; ".join(f"GPU {g['index']} {g['name']} ({g['memory_gb']:g} GB)" for g in gpus) or "no GPU visible"
    info["text"] = f"torch {info['torch']} ({cuda}); {gpu_text}"
    return info

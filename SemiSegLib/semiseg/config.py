"""Typed configuration: every default in one place, presets for the literature's recipes.

Precedence (lowest first): field defaults < dataset preset < the method's recipe for that preset
< config file (YAML/JSON) < command-line options.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SemiSegError
from .fields import from_json
from .inference import TTA_MODES
from .methods import get_method
from .presets import PRESETS, preset_for_data

__all__ = ["PRESETS", "TrainConfig", "load_config_file", "matched_method", "matched_supervised",
           "matched_supervised_explicit", "preset_for_data", "resolve_config", "validate"]


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class TrainConfig:
    # data
    data: str = field(default="phantom", metadata=_h("dataset: acdc:PATH, la:PATH, phantom[:N], phantom_ct[:N], a folder or a CSV"))
    labeled: int = field(default=0, metadata=_h("labeled cases: ACDC patients (3 → 68 slices, 7 → 136), LA volumes (first N); 0 = preset default"))
    val_split: str = field(default="", metadata=_h("validation list file (default: the dataset's own val split)"))
    test_split: str = field(default="", metadata=_h("test list file or folder (held out; evaluated after training)"))
    dim: int = field(default=0, metadata=_h("2 = slice-wise 2D network, 3 = 3D patches; 0 = dataset default"))
    class_map: str = field(default="", metadata=_h("match classes across label files (folder/CSV data): 'source=class; ...' where a source is a segment name (case-insensitive) or a labelmap value, or a JSON file {source: class}; class 'background' drops a source. SemiSeg's own option"))
    # method and network
    method: str = field(default="mean_teacher", metadata=_h("training method (see `semiseg methods`)"))
    preset: str = field(default="", metadata=_h("recipe preset: acdc, la, phantom (default: from the dataset)"))
    network: str = field(default="", metadata=_h("network: unet (2D) or vnet (3D); empty = by dimension"))
    upsampling: str = field(default="", metadata=_h("decoder upsampling: unet bilinear|transpose, vnet transpose|trilinear"))
    # batches and patches
    patch_size: tuple[int, ...] = field(default=(), metadata=_h("training size: 2D resize target (256 256) or 3D crop (112 112 80)"))
    labeled_batch: int = field(default=0, metadata=_h("labeled samples per step (ACDC 12, LA 2)"))
    unlabeled_batch: int = field(default=0, metadata=_h("unlabeled samples per step (ACDC 12, LA 2)"))
    # optimisation
    iterations: int = field(default=0, metadata=_h("training iterations (ACDC 30000, LA 15000)"))
    lr: float = field(default=0.01, metadata=_h("base learning rate (SGD)"))
    lr_schedule: str = field(default="", metadata=_h("poly, step (×0.1 every lr_step iterations) or constant", choices=["", "poly", "step", "constant"]))
    lr_step: int = field(default=2500, metadata=_h("step schedule period in iterations"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=_h("SGD weight decay"))
    ema_decay: float = field(default=0.99, metadata=_h("EMA teacher decay α (α = min(1 − 1/(it+1), decay))"))
    # runtime
    device: str = field(default="auto", metadata=_h("auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N, mps"))
    amp: bool = field(default=True, metadata=_h("mixed precision under precision=auto (bf16/fp16 on a GPU, bf16 on a CPU with native bf16); --no-amp = fp32"))
    seed: int = field(default=1337, metadata=_h("random seed (lineage default 1337)"))
    deterministic: bool = field(default=False, metadata=_h("deterministic algorithms (exact resume, slower on GPU)"))
    threads: int = field(default=0, metadata=_h("CPU threads for torch (0 = torch default)"))
    data_on_device: str = field(default="auto", metadata=_h("keep the training data and its augmentation on the training GPU: auto (when the data take at most a quarter of the free GPU memory), on, off (CPU; see prefetch); SemiSeg option", choices=["auto", "on", "off"]))
    prefetch: int = field(default=0, metadata=_h("batches prepared ahead by a background thread (0 = off); deterministic: same batches, same resume state; SemiSeg option"))
    foreground_share: float = field(default=0.0, metadata=_h("share of each labeled batch that shows a random present foreground class (nnU-Net-style oversampling; SemiSeg option): 3D patches centred on a voxel of it, 2D slices that contain it. 0 = the literature's uniform draws"))
    precision: str = field(default="auto", metadata=_h("training precision: auto (bf16 on a GPU that supports it, fp16 + loss scaling on other GPUs; on the CPU bf16 where it computes bf16 natively (AVX512-BF16/AMX, detected), else fp32; --no-amp makes auto fp32), fp32, bf16 (autocast; also on the CPU), fp16 (CUDA only)", choices=["auto", "fp32", "bf16", "fp16"]))
    channels_last: bool = field(default=True, metadata=_h("channels-last memory format for the networks and batches (NHWC in 2D; NDHWC in 3D on CPUs and CUDA, not on MPS): faster convolutions; same results up to rounding, dropout masks drawn in another order; SemiSeg option)"))
    keep_freed_memory: bool = field(default=True, metadata=_h("glibc (Linux): keep freed tensor memory in the process for the next iteration instead of returning it to the kernel (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1 at start-up; no effect elsewhere); process-wide. SemiSeg option"))
    compile: bool = field(default=False, metadata=_h("torch.compile the student network (in place: checkpoint keys stay plain; first iterations are slow while it compiles). For GPUs: on a CPU it needs a C++ compiler and ran slower on 2 cores"))
    sync_bn: bool = field(default=True, metadata=_h("several GPUs (torchrun): BatchNorm statistics over the global batch (SyncBatchNorm); CUDA only, ignored on the CPU"))
    find_unused_parameters: bool = field(default=False, metadata=_h("several processes: let DDP tolerate parameters that get no gradient in a step (needed by methods with parts used only in some steps; slower)"))
    time_budget: str = field(default="", metadata=_h("train within this wall time: 30m, 1h, 90s, 1h30m or seconds (1800); the run measures its speed in its first iterations and shortens its schedule (iterations, lr decay, ramp-ups, validation cadence) to end by then, with a final checkpoint. Empty = no budget. SemiSeg option"))
    # warm start (semiseg.finetune): a new model version from an earlier one
    init_from: str = field(default="", metadata=_h("warm start from a run folder (its best.pt) or a checkpoint file: its weights and EMA teacher, a fresh optimiser, its method/network/batch/lr settings unless given, its plan for planned data, and the finetune schedule unless --iterations is given (a fraction of its iterations, ramp-ups not restarted); never the run's own folder"))
    finetune_fraction: float = field(default=0.25, metadata=_h("finetune schedule (with --init-from, --iterations not given): iterations = this fraction of the source run's iterations"))
    # validation, checkpoints, logging
    val_every: int = field(default=0, metadata=_h("validate every N iterations (0 = never; ACDC 200)"))
    val_from: int = field(default=0, metadata=_h("first iteration that validates (SS-Net on LA: 2000)"))
    selection: str = field(default="", metadata=_h("checkpoint reported: final, val (best on validation), test (paper reproduction only; on LA without --val-every it validates every 200 iterations from 2000, as SS-Net)", choices=["", "final", "val", "test"]))
    protocol: str = field(default="semiseg", metadata=_h("evaluation protocol: semiseg (honest: final or validation selection) or paper (the method's published one: selection, LCC, empty-prediction convention, cadence; see `semiseg methods --deviations`)", choices=["semiseg", "paper"]))
    recipe: str = field(default="", metadata=_h("a named variant of the method's recipe, e.g. icl's train.sh (its authors' ACDC runs, lr 0.1); see `semiseg methods --deviations`"))
    checkpoint_every: int = field(default=500, metadata=_h("write the resumable last checkpoint every N iterations"))
    log_every: int = field(default=10, metadata=_h("progress event every N iterations"))
    # inference
    stride: tuple[int, ...] = field(default=(), metadata=_h("3D sliding-window stride (LA 18 18 4)"))
    resize: str = field(default="nearest", metadata=_h("2D inference resize: nearest (SSL4MIS) or bilinear (UniMatch/AGP: logits upsampled)", choices=["nearest", "bilinear"]))
    tta: str = field(default="none", metadata=_h("test-time augmentation: none (the references), flips (softmax averaged over the view and its flips along x and y: 3 passes) or reflections (the view and the four in-plane reflections the rot90+flip training augmentation produces: 5 passes; flips on a non-square 3D patch). SemiSeg option; the 2D short-budget recipe uses reflections", choices=list(TTA_MODES)))
    window_weighting: str = field(default="uniform", metadata=_h("3D sliding window: uniform mean over overlapping windows (the literature) or gaussian (nnU-Net importance map, sigma = patch/8; SemiSeg option)", choices=["uniform", "gaussian"]))
    lcc: bool = field(default=False, metadata=_h("keep the largest connected component per class at test time (--lcc is an alias; not the lcc method)", flag="largest-component"))
    empty: str = field(default="zero", metadata=_h("empty-prediction metric convention: zero (SS-Net/BCP) or penalty (ICL)", choices=["zero", "penalty"]))
    # planning for users' own scans (semiseg.planning; benchmark datasets keep their recipes under plan=auto)
    plan: str = field(default="auto", metadata=_h("auto (plan user folders/CSVs, not acdc/la/phantom), off, or a plan.json PATH"))
    target_spacing: tuple[float, ...] = field(default=(), metadata=_h("planned resampling spacing in mm per array axis, 0 = keep (default: median spacing)"))
    modality: str = field(default="auto", metadata=_h("intensity normalisation: ct (clip to foreground 0.5/99.5 percentiles + z-score) or mr (per-volume z-score); auto = header, else Hounsfield-like air", choices=["auto", "ct", "mr"]))
    memory_budget_gb: float = field(default=0.0, metadata=_h("memory the planned patch x batch may use (0 = GPU memory x 0.75, CPU 8 GB)"))
    image_interpolation: str = field(default="linear", metadata=_h("planned image resampling: linear or bspline (SemiSeg default linear; nnU-Net uses 3rd order)", choices=["linear", "bspline"]))
    label_interpolation: str = field(default="auto", metadata=_h("planned label resampling: nearest, linear (one-hot) or auto (nearest when upsampling)", choices=["auto", "nearest", "linear"]))
    cache_dir: str = field(default="", metadata=_h("preprocessing cache folder (default $SEMISEG_CACHE or ~/.cache/semiseg)"))
    # method hyper-parameters (the method's Options dataclass, as a dict)
    method_options: dict = field(default_factory=dict, metadata=_h("method hyper-parameters"))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise SemiSegError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**{k: from_json(known[k], v) for k, v in d.items()})


def resolve_config(explicit: dict[str, Any], file_values: dict[str, Any] | None = None,
                   plan_values: dict[str, Any] | None = None) -> TrainConfig:
    """Merge the layers; ``explicit`` holds only what the user set on the command line.
    ``plan_values`` (from :mod:`semiseg.planning`) sit between the method recipe and the config file."""
    layered: dict[str, Any] = {}
    for src in (file_values or {}, explicit):
        layered.update({k: v for k, v in src.items() if k != "method_options"})
    data = layered.get("data", TrainConfig.data)
    preset = layered.get("preset") or preset_for_data(data, layered.get("dim", 0) or (plan_values or {}).get("dim", 0))
    if preset not in PRESETS:
        raise SemiSegError(f"unknown preset '{preset}'; available: {', '.join(PRESETS)}")
    method_cls = get_method(layered.get("method", TrainConfig.method))
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update(method_cls.recipe.get(preset, {}))
    values.update(_named_recipe(method_cls, layered.get("recipe", "")))
    values.update(_paper_protocol(method_cls.name, preset, layered))
    values.update(plan_values or {})
    values.update(layered)
    values["preset"] = preset
    _selection_cadence(values, layered)
    cfg = TrainConfig.from_dict(values)
    # method options: method defaults for the preset < file < command line
    opts = dataclasses.asdict(method_cls.default_options(preset, cfg.dim))
    for src in (file_values or {}, explicit):
        given = src.get("method_options") or {}
        unknown = set(given) - set(opts)
        if unknown:
            raise SemiSegError(f"method '{method_cls.name}' has no option(s) {', '.join(sorted(unknown))}")
        opts.update(given)
    cfg.method_options = opts
    if not cfg.network:
        cfg.network = "unet" if cfg.dim == 2 else "vnet"
    if not cfg.upsampling:  # stated in the resolved configuration (config.json, the panel), not left implicit
        from .networks import default_upsampling
        cfg.upsampling = default_upsampling(cfg.network)
    validate(cfg)
    cfg.method_options = method_cls.configure_options(dict(cfg.method_options), cfg)
    return cfg


def _named_recipe(method_cls, name: str) -> dict[str, Any]:
    if not name:
        return {}
    variants = method_cls.reference.variants if method_cls.reference else {}
    if name not in variants:
        known = f"its recipes: {', '.join(variants)}" if variants else "it has no named recipe"
        raise SemiSegError(f"method '{method_cls.name}' has no recipe '{name}' ({known})")
    return dict(variants[name])


def _paper_protocol(method: str, preset: str, layered: dict[str, Any]) -> dict[str, Any]:
    """``--protocol paper``: the method's published protocol on this dataset, or one error line."""
    if layered.get("protocol", TrainConfig.protocol) != "paper":
        return {}
    from .methods.reference import paper_protocol
    values = paper_protocol(method, preset)
    if values is None:
        raise SemiSegError(f"--protocol paper: no published protocol of '{method}' on {preset} data "
                           "(see `semiseg methods --deviations`)")
    clash = [k for k, v in values.items() if k in layered and layered[k] != v]
    if clash:
        k = clash[0]
        raise SemiSegError(f"--protocol paper sets {k} = {values[k]!r} for {method} on {preset}; "
                           f"{layered[k]!r} was also given: drop one")
    return values


# SS-Net (``train_ss_3d.py``), MC-Net and BCP select on the LA test set every 200 iterations from 2000
TEST_SELECTION_CADENCE = {"la": {"val_every": 200, "val_from": 2000}}


def _selection_cadence(values: dict[str, Any], layered: dict[str, Any]) -> None:
    """A selection that validates needs a cadence that validates within the run. Test selection without
    one takes the reference cadence of the dataset; a preset's own ``val`` default without one becomes
    ``final`` (it says so); an explicit selection that cannot happen is an error."""
    sel, every = values.get("selection", ""), values.get("val_every", 0)
    if sel == "test" and not every and "val_every" not in layered:
        cadence = TEST_SELECTION_CADENCE.get(values["preset"])
        if cadence is None:
            raise SemiSegError(f"--selection test on {values['preset']} data needs --val-every N (no reference cadence)")
        values.update({k: v for k, v in cadence.items() if k not in layered})
        every = values["val_every"]
    if sel not in ("val", "test"):
        return
    first = max(every, -(-values.get("val_from", 0) // every) * every) if every else 0
    if every and first <= values.get("iterations", 0):
        return
    if "selection" not in layered and values.get("protocol") != "paper":
        values["selection"] = "final"
        return
    when = (f"the first validation is at iteration {first}, after the run's {values.get('iterations', 0)}" if every
            else "--val-every is 0")
    raise SemiSegError(f"--selection {sel} cannot select: {when}; set --val-every N (and --val-from) or --selection final")


def selection_fallback(selection: str, has_validation: bool) -> str:
    """The checkpoint selection a run uses and records in its config.json: ``val`` with no validation case
    selects the final model."""
    return "final" if selection == "val" and not has_validation else selection


def with_recorded_selection(wanted: dict, recorded: dict) -> dict:
    """``wanted`` (a configuration as given now, as a dict) with the selection ``recorded`` in a run's
    config.json where :func:`selection_fallback` explains the difference, so that comparing the two (the
    resume check, the benchmark's check of a run folder) does not take the fallback for another setting."""
    if recorded.get("selection") == selection_fallback(wanted.get("selection"), False) != wanted.get("selection"):
        return {**wanted, "selection": recorded["selection"]}
    return wanted


def matched_supervised(cfg: TrainConfig) -> TrainConfig:
    """The supervised baseline of a method's run: the same network, inference resize, schedule, data,
    budget and supervised loss, only the unlabeled terms removed. A baseline with the dataset's default
    recipe differs from e.g. UniMatch in the inference resize (nearest vs bilinear: +3.4 Dice points on
    the 32x32 phantom by itself) and from SS-Net in the loss: a comparison would measure those."""
    options = dataclasses.asdict(get_method("supervised").default_options(cfg.preset, cfg.dim))
    options.update(get_method(cfg.method).baseline_supervised_loss(dict(cfg.method_options), cfg.dim))
    values = dataclasses.asdict(cfg)
    values.update(method="supervised", method_options=options)
    return TrainConfig.from_dict(values)


MATCHED_PREFIX = "supervised@"  # benchmark grid name of a matched baseline: supervised@unimatch


def matched_method(name: str) -> str:
    """The method a grid name trains or is matched to: ``supervised@unimatch`` -> ``unimatch``."""
    return name[len(MATCHED_PREFIX):] if name.startswith(MATCHED_PREFIX) else name


def matched_supervised_explicit(explicit: dict[str, Any]) -> dict[str, Any]:
    """An ``explicit`` layer that resolves to ``matched_supervised(resolve_config(explicit))``: the method
    becomes ``supervised`` and every field where the matched run differs from a plain supervised run is
    stated (so run folders, resumption and tables built on explicit layers work unchanged)."""
    matched = matched_supervised(resolve_config(explicit)).to_dict()
    out = {k: v for k, v in explicit.items() if k != "method_options"}
    out.update(method="supervised", method_options=dict(matched["method_options"]))
    plain = resolve_config(out).to_dict()
    out.update({k: matched[k] for k in matched if matched[k] != plain[k]})
    return out


def validate(cfg: TrainConfig) -> None:
    from .networks import SIZE_DIVISOR, bottleneck_values
    if cfg.dim not in (2, 3):
        raise SemiSegError(f"dim must be 2 or 3, not {cfg.dim}")
    if len(cfg.patch_size) != cfg.dim:
        raise SemiSegError(f"patch size {tuple(cfg.patch_size)} does not have {cfg.dim} dimensions")
    if any(p % SIZE_DIVISOR for p in cfg.patch_size):
        what, net = ("3D patch", "V-Net") if cfg.dim == 3 else ("2D training", "UNet")
        raise SemiSegError(f"{what} size {tuple(cfg.patch_size)} must be a multiple of {SIZE_DIVISOR} on every axis "
                           f"({net} depth)")
    if cfg.dim == 2 and len(set(cfg.patch_size)) > 1:
        raise SemiSegError(f"2D training size {tuple(cfg.patch_size)} must be square: slices are resized to it "
                           "and the rot90 augmentation turns them")
    if cfg.iterations < 1:
        raise SemiSegError("iterations must be at least 1")
    if cfg.labeled_batch < 1:
        raise SemiSegError("labeled_batch must be at least 1")
    if bottleneck_values(cfg.patch_size, cfg.labeled_batch) < 2:
        raise SemiSegError(f"patch size {tuple(cfg.patch_size)} with a labeled batch of {cfg.labeled_batch} leaves one "
                           "value per channel at the network's 1/16 bottleneck, where BatchNorm cannot train: use a "
                           "labeled batch of 2 or a patch of 32 on one axis")
    if not 0.0 <= cfg.foreground_share <= 1.0:
        raise SemiSegError(f"foreground_share must be in [0, 1], not {cfg.foreground_share}")
    if cfg.time_budget:
        from .train.budget import parse_duration
        parse_duration(cfg.time_budget)
    if not 0.0 < cfg.finetune_fraction <= 1.0:
        raise SemiSegError(f"finetune_fraction must be in (0, 1], not {cfg.finetune_fraction}")
    if cfg.prefetch < 0:
        raise SemiSegError("prefetch must be 0 (off) or a positive number of batches")
    for f in fields(cfg):  # the choices the fields declare (argparse checks them; a config file does not)
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            shown = ", ".join(c for c in choices if c)
            raise SemiSegError(f"{f.name} must be one of {shown}, not '{getattr(cfg, f.name)}'")
    if cfg.selection not in ("final", "val", "test"):
        raise SemiSegError(f"selection must be final, val or test, not '{cfg.selection}'")


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SemiSegError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise SemiSegError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise SemiSegError(f"config file {p} must hold a mapping of option names to values")
    return d

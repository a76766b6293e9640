"""The plan: every data-dependent training choice, decided from a fingerprint, written as JSON.

Rules (SemiSeg's own, in the spirit of nnU-Net's planner; every choice can be overridden):

* dimension: 2D slice-wise when the training cases are single slices, or when the coarsest median
  spacing is more than 3x the finest (ACDC-like short-axis stacks); else 3D patches. In 2D the
  coarse axis becomes the slicing (last) axis by a pure re-indexing of the array (no resampling).
* target spacing: the per-axis median of the training cases' spacings; in 2D only the in-plane
  axes are resampled (each case keeps its own slice spacing). Files that store no spacing (the
  benchmark ``.h5``) are never resampled.
* network: ``unet`` (2D) / ``vnet`` (3D), both with 4 downsamplings, so patch sides are multiples of 16.
* patch and batch: the patch starts as the median resampled image size (rounded up to a multiple
  of 16, capped), the batch at the literature's recipe (2D 12+12 as ACDC, 3D 2+2 as LA), and both
  shrink until the memory estimate fits the budget.
* memory estimate: the bytes autograd saves per input voxel for the actual network, measured with
  ``saved_tensors_hooks`` on a small input (activations scale linearly with the voxels of a
  fully convolutional net), x voxels x samples per step (labeled + unlabeled), x
  ``STEP_OVERHEAD`` for what a semi-supervised step adds (teacher forward, loss buffers, allocator
  slack: our rule of thumb, not measured per method), plus 4x the parameter bytes (weights,
  gradients, momentum, EMA teacher).
* budget: ``memory_budget_gb`` when given; on a GPU its total memory x ``GPU_SAFETY``; on the CPU
  (or unknown) ``DEFAULT_BUDGET_GB``.
* normalisation: CT: clip to the labeled foreground's 0.5/99.5 percentiles, then z-score with the
  foreground mean and std (dataset-wide, nnU-Net's CT scheme); MR: per-volume z-score.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache

import numpy as np

from ..atomic import atomic_write
from ..errors import SemiSegError
from ..networks import DOWNSAMPLINGS, SIZE_DIVISOR, bottleneck_values
from ..presets import LITERATURE_DATASETS
from .fingerprint import Fingerprint

PLAN_VERSION = 1
ANISOTROPY_RATIO = 3.0      # coarsest / finest median spacing above which training is 2D
SPACING_TIE_RTOL = 0.05     # spacings within 5 % of the coarsest count as tied when choosing the 2D slice axis
GPU_SAFETY = 0.75           # share of a GPU's total memory the plan may use
DEFAULT_BUDGET_GB = 8.0     # CPU or unknown device
STEP_OVERHEAD = 1.5         # our rule of thumb for a semi-supervised step beyond the student's activations
MAX_SIDE = {2: 512, 3: 160}
MIN_SIDE = {2: 32, 3: 16}
DEFAULT_BATCH = {2: 12, 3: 2}   # ACDC and LA recipes (labeled; the unlabeled batch is the same)


@dataclass
class Plan:
    dataset: str = ""
    kind: str = "files"
    version: int = PLAN_VERSION
    cases: int = 0
    labeled_cases: int = 0
    modality: str = "mr"
    modality_reason: str = ""
    dim: int = 3
    dim_reason: str = ""
    axis_order: list = field(default_factory=lambda: [0, 1, 2])  # array axes after re-indexing (2D: slice axis last)
    spacing_known: bool = True
    median_spacing: list = field(default_factory=list)
    target_spacing: list = field(default_factory=list)          # None = keep the case's own
    median_shape: list = field(default_factory=list)
    median_resampled_shape: list = field(default_factory=list)
    network: str = "vnet"
    downsamplings: int = DOWNSAMPLINGS
    patch_size: list = field(default_factory=list)
    labeled_batch: int = 2
    unlabeled_batch: int = 2
    stride: list = field(default_factory=list)
    normalization: dict = field(default_factory=lambda: {"scheme": "zscore"})
    image_interpolation: str = "linear"
    label_interpolation: str = "auto"
    memory: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    # ----------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SemiSegError(f"plan has unknown keys: {', '.join(sorted(unknown))}")
        if int(d.get("version", PLAN_VERSION)) > PLAN_VERSION:
            raise SemiSegError(f"plan version {d['version']} is newer than this SemiSeg ({PLAN_VERSION})")
        return cls(**d)

    @classmethod
    def load(cls, path) -> "Plan":
        from pathlib import Path
        p = Path(path)
        if not p.is_file():
            raise SemiSegError(f"plan file not found: {p}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (ValueError, TypeError) as e:
            raise SemiSegError(f"cannot read plan {p}: {e}") from None

    def save(self, path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def preprocessing_key(self) -> str:
        """Hash of everything that changes a preprocessed array (the cache key's plan part)."""
        keys = ("version", "axis_order", "target_spacing", "normalization", "image_interpolation",
                "label_interpolation")
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def config_values(self) -> dict:
        """The TrainConfig layer of this plan (between the method recipe and the config file)."""
        v = {"dim": self.dim, "patch_size": tuple(self.patch_size), "labeled_batch": self.labeled_batch,
             "unlabeled_batch": self.unlabeled_batch, "network": self.network}
        if self.dim == 3:
            v["stride"] = tuple(self.stride)
        return v

    # ----------------------------------------------------------------------------- printing
    def describe(self) -> str:
        f = lambda v: "(" + ", ".join("keep" if x is None else f"{x:g}" for x in v) + ")"  # noqa: E731
        n = self.normalization
        if n.get("scheme") == "ct":
            norm = (f"CT: clip to labeled-foreground percentiles 0.5/99.5 [{n['clip'][0]:.4g}, {n['clip'][1]:.4g}], "
                    f"then (x - {n['mean']:.4g}) / {n['std']:.4g} (dataset-wide)")
        elif n.get("scheme") == "zscore":
            norm = "per-volume z-score (x - mean) / std"
        else:
            norm = n.get("scheme", "none")
        m = self.memory
        lines = [
            f"SemiSeg plan for {self.dataset} ({self.cases} training cases, {self.labeled_cases} labeled)",
            f"  modality        {self.modality.upper()}  ({self.modality_reason})",
            f"  dimension       {self.dim}D{' slice-wise' if self.dim == 2 else ' patches'}  ({self.dim_reason})",
        ]
        if self.spacing_known:
            lines.append(f"  spacing         median {f(self.median_spacing)} mm -> target {f(self.target_spacing)} mm")
        else:
            lines.append("  spacing         not stored in the files: no resampling, sizes in voxels")
        if self.axis_order != [0, 1, 2]:
            lines.append(f"  axes            re-indexed to {tuple(self.axis_order)} so the slice axis is last")
        lines += [
            f"  image size      median {f(self.median_shape)}"
            + (f" -> {f(self.median_resampled_shape)} after resampling" if self.spacing_known else " voxels"),
            f"  network         {self.network}, {self.downsamplings} downsamplings: sizes multiple of {2 ** self.downsamplings}",
            f"  patch / batch   {f(self.patch_size)} x {self.labeled_batch} labeled + {self.unlabeled_batch} unlabeled"
            + (f"; sliding-window stride {f(self.stride)}" if self.dim == 3 else " (2D: slices resized to it)"),
            f"  memory          estimate {m.get('estimate_gb', float('nan')):.2f} GB of {m.get('budget_gb', float('nan')):.2f} GB "
            f"budget ({m.get('budget_source', '?')}); {m.get('activation_bytes_per_voxel', 0):.0f} saved bytes/voxel "
            f"measured on {self.network}, x{m.get('step_overhead', STEP_OVERHEAD)} step overhead",
            f"  normalisation   {norm}",
            f"  resampling      images {self.image_interpolation}, labels "
            + ({"auto": "auto (nearest where every axis is upsampled, else one-hot linear)",
                "nearest": "nearest", "linear": "one-hot linear"}[self.label_interpolation])
            + "; predictions back to the input grid one-hot linear",
        ]
        if self.overrides:
            lines.append(f"  overridden      {', '.join(self.overrides)}")
        for note in self.notes:
            lines.append(f"  note            {note}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ memory
@lru_cache(maxsize=None)
def activation_bytes_per_voxel(network: str, dim: int, num_classes: int = 2) -> tuple[float, int]:
    """(bytes autograd saves per input voxel in one training-mode forward pass, parameter bytes),
    measured on a small input of the actual network (parameters themselves are not counted)."""
    import torch
    from ..networks import build_network
    net = build_network(network, in_channels=1, num_classes=max(num_classes, 2)).train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    side, n = (32, 1) if dim == 2 else (16, 2)  # BatchNorm in train mode needs 2 values at the 1-voxel bottleneck
    x = torch.zeros((n, 1) + (side,) * dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    return sum(saved.values()) / (n * side ** dim), param_bytes


def estimate_gb(network: str, dim: int, patch, samples: int, num_classes: int = 2) -> tuple[float, float]:
    bpv, param_bytes = activation_bytes_per_voxel(network, dim, num_classes)
    total = bpv * math.prod(patch) * samples * STEP_OVERHEAD + 4 * param_bytes
    return total / 2 ** 30, bpv


def memory_budget(device: str = "auto", memory_budget_gb: float = 0.0) -> tuple[float, str]:
    if memory_budget_gb and memory_budget_gb > 0:
        return float(memory_budget_gb), "given"
    try:
        import torch
        if device != "cpu" and torch.cuda.is_available():
            idx = int(device.split(":")[1]) if device.startswith("cuda:") else 0
            total = torch.cuda.get_device_properties(idx).total_memory / 2 ** 30
            return total * GPU_SAFETY, f"GPU {torch.cuda.get_device_name(idx)}: {total:.0f} GB x {GPU_SAFETY}"
    except Exception:  # noqa: BLE001 - no usable GPU: fall back to the CPU default
        pass
    return DEFAULT_BUDGET_GB, "CPU default; set memory_budget_gb"


def _ceil16(v: float, lo: int, hi: int) -> int:
    return int(min(max(SIZE_DIVISOR * math.ceil(v / SIZE_DIVISOR), lo), hi))


def fit_patch(dim: int, network: str, start_patch, start_batch: int, budget_gb: float, num_classes: int = 2,
              fixed_patch: bool = False, fixed_batch: bool = False) -> tuple[list[int], int, float]:
    """Shrink (patch, batch) until the estimate fits: 3D: patch to 48 per side, then batch to 1, then patch
    to 16; 2D: batch to 2, then patch to 32, then batch to 1. Returns (patch, batch, estimate GB)."""
    patch, batch = [int(p) for p in start_patch], int(start_batch)
    est = lambda: estimate_gb(network, dim, patch, 2 * batch, num_classes)[0]  # noqa: E731

    def shrink_patch(floor: int) -> bool:
        if fixed_patch:
            return False
        # 3D: the longest side first; 2D: both sides (slices are square, see make_plan)
        axes = [int(np.argmax(patch))] if dim == 3 else list(range(len(patch)))
        if any(patch[a] - SIZE_DIVISOR < floor for a in axes):
            return False
        smaller = [p - SIZE_DIVISOR if a in axes else p for a, p in enumerate(patch)]
        if bottleneck_values(smaller, batch) < 2:
            return False
        patch[:] = smaller
        return True

    def shrink_batch(floor: int) -> bool:
        nonlocal batch
        if fixed_batch or batch - 1 < floor or bottleneck_values(patch, batch - 1) < 2:
            return False
        batch -= 1
        return True

    steps = ([lambda: shrink_patch(48), lambda: shrink_batch(1), lambda: shrink_patch(16)] if dim == 3 else
             [lambda: shrink_batch(2), lambda: shrink_patch(32), lambda: shrink_batch(1)])
    for step in steps:
        while est() > budget_gb and step():
            pass
    return patch, batch, est()


# ------------------------------------------------------------------------------------ planning
def _median(values) -> list[float]:
    return [float(v) for v in np.median(np.asarray(values, dtype=float), axis=0)]


def coarsest_axis(spacing, tie_rtol: float = SPACING_TIE_RTOL) -> int:
    """The axis a 2D plan slices along: the coarsest spacing; the stored slice axis (2) when it is tied for
    coarsest, e.g. isotropic scans trained slice-wise with ``--dim 2`` (otherwise ``argmax`` of equal
    spacings would slice a CT along its first, left-right axis)."""
    tied = [a for a in range(3) if spacing[a] >= max(spacing) * (1 - tie_rtol)]
    return 2 if 2 in tied else tied[0]


def make_plan(fp: Fingerprint, device: str = "auto", memory_budget_gb: float = 0.0,
              overrides: dict | None = None) -> Plan:
    """Decide a plan from a fingerprint. ``overrides`` may set dim, target_spacing, modality, patch_size,
    labeled_batch, unlabeled_batch, network, image_interpolation, label_interpolation."""
    ov = {k: v for k, v in (overrides or {}).items() if v not in (None, "", (), [], 0, "auto")}
    if not fp.cases:
        raise SemiSegError("cannot plan: the dataset has no training case")
    plan = Plan(dataset=fp.dataset, kind=fp.kind, cases=len(fp.cases), labeled_cases=sum(c.labeled for c in fp.cases))
    plan.overrides = sorted(ov)
    ncls = fp.num_classes + 1
    if fp.kind in LITERATURE_DATASETS:
        plan.notes.append("benchmark dataset: `semiseg train` keeps its literature recipe (plan=auto); "
                          "this plan is for information or use with --plan PATH")

    # modality and normalisation
    if "modality" in ov:
        plan.modality, plan.modality_reason = str(ov["modality"]).lower(), "set by the user"
        if plan.modality not in ("ct", "mr"):
            raise SemiSegError(f"modality must be auto, ct or mr, not '{ov['modality']}'")
    else:
        plan.modality, plan.modality_reason = fp.guess_modality()
    fg = fp.foreground
    if plan.modality == "ct" and fg and fg.get("std", 0) > 0:
        plan.normalization = {"scheme": "ct", "clip": [fg["p00_5"], fg["p99_5"]], "mean": fg["mean"], "std": fg["std"]}
    else:
        plan.normalization = {"scheme": "zscore"}
        if plan.modality == "ct":
            plan.notes.append("CT without labeled foreground statistics: per-volume z-score instead")

    # spacing and dimension
    known = [c for c in fp.cases if c.spacing_known]
    plan.spacing_known = len(known) == len(fp.cases)
    all2d = all(c.is_2d for c in fp.cases)
    med_sp = _median([c.spacing for c in known]) if known else [1.0, 1.0, 1.0]
    plan.median_spacing = med_sp
    shapes = [list(c.shape) + [1] * (3 - len(c.shape)) for c in fp.cases]
    plan.median_shape = _median(shapes)
    finest, coarsest = min(med_sp), max(med_sp)
    if "dim" in ov:
        plan.dim, plan.dim_reason = int(ov["dim"]), "set by the user"
    elif all2d:
        plan.dim, plan.dim_reason = 2, "the training cases are single 2D slices"
    elif plan.spacing_known and coarsest > ANISOTROPY_RATIO * finest:
        plan.dim, plan.dim_reason = 2, f"coarsest spacing {coarsest:g} > {ANISOTROPY_RATIO:g} x finest {finest:g}"
    else:
        plan.dim = 3
        plan.dim_reason = (f"coarsest spacing {coarsest:g} <= {ANISOTROPY_RATIO:g} x finest {finest:g}"
                           if plan.spacing_known else "spacing unknown, voxels taken as isotropic")
    if plan.dim not in (2, 3):
        raise SemiSegError(f"dim must be 2 or 3, not {plan.dim}")
    slice_axis = 2
    if plan.dim == 2 and not all2d and plan.spacing_known:
        slice_axis = coarsest_axis(med_sp)
    plan.axis_order = [a for a in range(3) if a != slice_axis] + [slice_axis]

    if "target_spacing" in ov:
        ts = [float(t) if t is not None and float(t) > 0 else None for t in ov["target_spacing"]]
        if len(ts) not in (2, 3):
            raise SemiSegError(f"target spacing needs 2 or 3 values, not {len(ts)}")
        ts = ts + [None] * (3 - len(ts))
        plan.target_spacing = ts  # in the array's own axis order
    elif not plan.spacing_known:
        plan.target_spacing = [None, None, None]
    else:
        plan.target_spacing = [None if (plan.dim == 2 and a == slice_axis) else med_sp[a] for a in range(3)]
    resampled = []
    for c, s in zip(fp.cases, shapes):
        resampled.append([s[a] * (c.spacing[a] / plan.target_spacing[a] if plan.target_spacing[a] and c.spacing_known
                                  else 1.0) for a in range(3)])
    plan.median_resampled_shape = [round(v, 1) for v in _median(resampled)]
    ordered = [plan.median_resampled_shape[a] for a in plan.axis_order]

    # network, patch, batch
    plan.network = str(ov.get("network", "unet" if plan.dim == 2 else "vnet"))
    if "patch_size" in ov:
        start = [int(p) for p in ov["patch_size"]]
        if len(start) != plan.dim or any(p % SIZE_DIVISOR for p in start):
            raise SemiSegError(f"patch size {tuple(start)} must have {plan.dim} sides, each a multiple of {SIZE_DIVISOR}")
    else:
        sides = ordered[:2] if plan.dim == 2 else ordered
        start = [_ceil16(v, MIN_SIDE[plan.dim], MAX_SIDE[plan.dim]) for v in sides]
        if plan.dim == 2:  # every slice is resized to one square size (SSL4MIS 256x256): rot90 needs it
            start = [max(start)] * 2
    batch0 = int(ov.get("labeled_batch", DEFAULT_BATCH[plan.dim]))
    if "patch_size" not in ov and bottleneck_values(start, batch0) < 2:
        start[int(np.argmax(start))] += SIZE_DIVISOR
    budget, source = memory_budget(device, memory_budget_gb)
    patch, batch, est = fit_patch(plan.dim, plan.network, start, batch0, budget, ncls,
                                  fixed_patch="patch_size" in ov, fixed_batch="labeled_batch" in ov)
    plan.patch_size, plan.labeled_batch = patch, batch
    plan.unlabeled_batch = int(ov.get("unlabeled_batch", batch))
    est, bpv = estimate_gb(plan.network, plan.dim, patch, plan.labeled_batch + plan.unlabeled_batch, ncls)
    plan.memory = {"budget_gb": round(budget, 3), "budget_source": source, "estimate_gb": round(est, 3),
                   "activation_bytes_per_voxel": round(bpv, 1), "step_overhead": STEP_OVERHEAD}
    if est > budget:
        plan.notes.append(f"the estimate {est:.2f} GB exceeds the budget {budget:.2f} GB even at the smallest "
                          f"patch/batch allowed (or as overridden)")
    plan.stride = [max(p // 2, 1) for p in patch] if plan.dim == 3 else []
    plan.image_interpolation = str(ov.get("image_interpolation", "linear"))
    plan.label_interpolation = str(ov.get("label_interpolation", "auto"))
    if plan.image_interpolation not in ("linear", "bspline"):
        raise SemiSegError(f"image interpolation must be linear or bspline, not '{plan.image_interpolation}'")
    if plan.label_interpolation not in ("auto", "nearest", "linear"):
        raise SemiSegError(f"label interpolation must be auto, nearest or linear, not '{plan.label_interpolation}'")
    return plan

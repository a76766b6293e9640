"""A recipe for short time budgets on a CPU: training size and batch chosen from the budget and the machine.

The literature's recipes (ACDC: 256x256, batch 12+12, 30000 iterations) assume a GPU; on a laptop CPU a
30-minute budget affords a few hundred of their iterations, too few for the schedule to train anything.
Given the budget and the machine, :func:`short_budget_recipe` estimates the seconds per iteration of the
recipe and, when the budget affords fewer than ``TARGET_ITERATIONS`` of them, tries in turn: each size of
a ladder (the recipe's size x 1, 3/4, 1/2, not below ``MIN_SIZE``) with the recipe's batch, then with
half of it (at least 4); then, at the smallest size, halving the batch again down to two samples per core in
2D (at least 4) and one in 3D (at least 2 for BatchNorm). The first that affords the target is taken; when none
does, the last. The validation cadence is set for about ``VALIDATIONS`` validations over the run (the time budget
keeps their cost in check).
Short runs want optimiser steps more than large batches: ACDC-7 Mean Teacher, 30 minutes on 2 cores at 128x128,
validation Dice with batch 12+12 (4,408 iterations) 71.3, 6+6 (8,334 and 8,767) 80.9 and 80.0, 4+4 (11,436 to
13,504) 82.3, 81.6 and 82.3; hence the 2D target of 10,000 iterations and the two-samples-per-core floor.
A 2D recipe also predicts with ``resize="bilinear"``: the network runs below the slice's resolution, and
upsampling its logits bilinearly before the argmax (UniMatch's inference) gives smoother boundaries than
zooming its labels back (SSL4MIS's nearest zoom); on ACDC-7 models trained 30 minutes at 128x128 it added
0.9-1.9 (Mean Teacher, 3 models) and 1.2-3.7 (supervised, 2 models) validation Dice points. It also predicts
with ``tta="reflections"`` (:mod:`semiseg.inference`: the softmax averaged over the slice and its four in-plane
reflections, the orientations the training augmentation produces; 5 passes of a small network per slice).
Every short recipe decays the learning rate with the poly schedule: the LA recipe's x0.1 every 2500 of 15000
iterations, compressed into a few thousand, leaves five sixths of them at lr <= 1e-4. A 3D recipe slides its
windows a quarter of the patch apart: the LA recipe's 18x18x4 stride, made for 112x112x80 windows, is 336 windows of
64^3 per LA volume. LA-8 Mean Teacher, 30 minutes on 2 cores, 64^3, test Dice on 10 held-out volumes: step schedule
58.0 (18x18x4 stride), poly 73.2 (18x18x4, 41 s per volume), 72.7 (16^3, 20 s), 70.6 (32^3, about 5 s).
On a GPU, or when the recipe fits, nothing changes. Fields the user sets win (this is a layer under the
config file and the command line); a training size or batch the user sets is kept while the recipe chooses the
rest around it, so its estimate and its printed line are those of the run.

The speed model is a rough one, ours: an iteration costs ``step_cost`` image forward passes per sample
(:attr:`semiseg.methods.base.Method.step_cost`) at ``PIXEL_RATE_PER_CORE`` pixel-passes per second per
core; 2D anchored on Mean Teacher's 1.55 s per 256x256 12+12 iteration measured on a 2-core AVX512-BF16 CPU
with bf16, channels-last and the kept allocator (the real 30-minute runs at 128x128: 0.35 s at 12+12, 0.19 s at
6+6, 0.13 s at 4+4; the model says 0.39, 0.19, 0.13; fp32 is taken at half the rate). 3D voxels have
their own rate, anchored on LA Mean Teacher (112x112x80, 2+2, NDHWC) on the same CPU: 2.35 s per iteration with bf16,
5.16 s with fp32 (0.62 s at 64^3 with bf16: the rate holds across sizes). Its figures only choose the size; the
time budget measures the real speed and sets the iteration count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# pixel (2D UNet) and voxel (3D V-Net) forward passes per second per core (see the module docstring)
PIXEL_RATE_PER_CORE = {2: {"bf16": 1.78e6, "fp32": 0.89e6}, 3: {"bf16": 3.0e6, "fp32": 1.35e6}}
TARGET_ITERATIONS = {2: 10000, 3: 3000}  # what a short run should afford (measured: see the module docstring)
SMALL_BATCH_PER_CORE = 2     # the smallest 2D batch per stream: two samples per core (at least MIN_SMALL_BATCH)
MIN_SMALL_BATCH = 4
SIZE_FACTORS = (1.0, 0.75, 0.5)
MIN_SIZE = {2: 128, 3: 64}
VALIDATIONS = 10
SIZE_DIVISOR = 16            # networks.SIZE_DIVISOR (kept here: the planner imports no torch)


@dataclass
class ShortBudgetRecipe:
    patch_size: tuple[int, ...]
    labeled_batch: int
    unlabeled_batch: int
    val_every: int                 # in the recipe's iteration count (the budget scales it with the run)
    seconds_per_iteration: float   # estimated, for the chosen recipe
    iterations_affordable: int     # estimated, within the budget
    recipe_iterations_affordable: int  # estimated, with the unchanged recipe
    reason: str
    resize: str = ""               # 2D inference resize ("" = the recipe's)
    tta: str = ""                  # test-time augmentation ("" = the recipe's)
    stride: tuple[int, ...] = ()   # 3D sliding-window stride (() = the recipe's)
    lr_schedule: str = "poly"

    def config_values(self) -> dict:
        out = {"patch_size": tuple(self.patch_size), "labeled_batch": self.labeled_batch,
               "unlabeled_batch": self.unlabeled_batch, "lr_schedule": self.lr_schedule}
        if self.stride:
            out["stride"] = tuple(self.stride)
        if self.resize:
            out["resize"] = self.resize
        if self.tta:
            out["tta"] = self.tta
        if self.val_every:
            out["val_every"] = self.val_every
        return out

    def describe(self) -> str:
        size = "x".join(map(str, self.patch_size))
        batch = f"{self.labeled_batch}+{self.unlabeled_batch}" if self.unlabeled_batch else f"{self.labeled_batch}"
        return (f"short-budget recipe: {size}, batch {batch}, "
                + (f"{self.resize} inference resize, " if self.resize else "")
                + (f"test-time {self.tta}, " if self.tta else "")
                + (f"window stride {'x'.join(map(str, self.stride))}, " if self.stride else "")
                + f"{self.lr_schedule} lr, "
                + f"{'about %d validations' % VALIDATIONS if self.val_every else 'no validation'} ({self.reason}; estimated "
                f"{self.seconds_per_iteration:.2f} s/it, about {self.iterations_affordable} iterations instead "
                f"of {self.recipe_iterations_affordable} with the full recipe; the budget measures the real speed)")


def estimated_seconds_per_iteration(patch_size, labeled_batch: int, unlabeled_batch: int, step_cost: float,
                                    cores: int, bf16: bool) -> float:
    rate = PIXEL_RATE_PER_CORE[len(patch_size)]["bf16" if bf16 else "fp32"] * max(cores, 1)
    return step_cost * (labeled_batch + unlabeled_batch) * math.prod(patch_size) / rate


def _sizes(patch_size: tuple[int, ...], dim: int) -> list[tuple[int, ...]]:
    out = []
    for f in SIZE_FACTORS:
        size = tuple(max(int(p * f) // SIZE_DIVISOR * SIZE_DIVISOR, min(MIN_SIZE[dim], p)) for p in patch_size)
        if size not in out:
            out.append(size)
    return out


def short_budget_recipe(budget_s: float, machine: dict, dim: int, patch_size: tuple[int, ...], labeled_batch: int,
                        unlabeled_batch: int, iterations: int, val_every: int,
                        step_cost: float = 3.5, fixed: dict | None = None) -> ShortBudgetRecipe | None:
    """The recipe for ``budget_s`` seconds on ``machine`` (:func:`semiseg.machine.describe`: ``gpu``,
    ``threads``, ``native_bf16``), or None when the recipe is kept (a GPU, or it affords its iterations).
    ``patch_size``, ``labeled_batch``, ``unlabeled_batch``: the dataset's recipe (``unlabeled_batch`` 0 for a
    method without an unlabeled stream: it stays 0). ``fixed``: the values among
    these three that the user set; they are kept and the recipe chooses the others around them (its estimate is
    that of the run). Whether the budget is short is judged on the recipe as it is."""
    fixed = fixed or {}
    if machine.get("gpu"):
        return None
    cores, bf16 = int(machine.get("threads") or machine.get("cores") or 1), bool(machine.get("native_bf16"))
    usable = 0.9 * budget_s  # validations, checkpoints and the final evaluation take the rest

    def affordable(size, lb, ub):
        s = estimated_seconds_per_iteration(size, lb, ub, step_cost, cores, bf16)
        return s, int(usable // s)

    _, full = affordable(patch_size, labeled_batch, unlabeled_batch)
    target = min(TARGET_ITERATIONS[dim], iterations)
    if full >= target:
        return None
    min_batch = max(2, min(cores, labeled_batch))  # one sample per core, at least 2 (BatchNorm)
    # batch halved at most while the size can still shrink
    comfortable = min(labeled_batch, max(min_batch, 4, labeled_batch // 2))
    sizes = [tuple(fixed["patch_size"])] if "patch_size" in fixed else _sizes(tuple(patch_size), dim)
    candidates = [(size, lb) for size in sizes for lb in dict.fromkeys((labeled_batch, comfortable))]
    # at the smallest size: 2D down to two samples per core (at least 4), 3D down to one
    smallest = max(min_batch, SMALL_BATCH_PER_CORE * cores, MIN_SMALL_BATCH) if dim == 2 else min_batch
    lb = comfortable
    while lb > smallest:
        lb = max(smallest, lb // 2)
        candidates.append((sizes[-1], lb))
    if "labeled_batch" in fixed:
        candidates = list(dict.fromkeys((size, int(fixed["labeled_batch"])) for size, _ in candidates))
    choice = None
    for size, lb in candidates:
        ub = 0 if unlabeled_batch == 0 else max(min_batch, round(unlabeled_batch * lb / labeled_batch))
        if "unlabeled_batch" in fixed and unlabeled_batch:
            ub = int(fixed["unlabeled_batch"])
        s, n = affordable(size, lb, ub)
        if n >= target or (size, lb) == candidates[-1]:
            reason = f"fits {target} iterations" if n >= target else f"the cheapest candidate; {target} iterations do not fit"
            choice = (size, lb, ub, s, n, reason)
            break
    size, lb, ub, s, n, reason = choice
    cadence = max(iterations // VALIDATIONS, 1) if val_every else 0
    return ShortBudgetRecipe(size, lb, ub, cadence, s, n, full, reason, resize="bilinear" if dim == 2 else "",
                             tta="reflections" if dim == 2 else "",
                             stride=tuple(p // 4 for p in size) if dim == 3 else ())

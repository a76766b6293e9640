"""Assembling a run: the one place that turns arguments into ``(configuration, data, plan)``.

Every command goes through :func:`prepare_run`: ``semiseg train``, the Slicer job (``semiseg run``), the
speed benchmark (``semiseg bench``), each run of the benchmark grid and ``semiseg demo``. The
:class:`~semiseg.train.loop.Trainer` then only trains what it is given.

Layers of the configuration (lowest first, see :func:`semiseg.config.resolve_config`): field defaults <
dataset preset < the method's recipe < the plan (users' own scans, :mod:`semiseg.planning`) < config file <
command line / job / grid.

What :func:`prepare_run` guarantees before anything is trained or written:

- one process owns a run folder (:mod:`semiseg.runlock`): a second one stops with one line naming the
  owner's pid and host; the lock of a process that is gone is taken over;
- ``resume``: the run's own ``config.json`` is the configuration; what is given besides must agree with
  it (:data:`RESUME_MAY_CHANGE`: the device, thread count, end of the run, ... may change), else one
  error line;
- images a run cannot train on (colour/vector images, a 2D image among volumes) stop with one line
  naming the file; data warnings (a class found in one labeled case only) go to ``on_warning``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import finetune
from . import runlock
from .config import TrainConfig, matched_supervised, resolve_config, with_recorded_selection
from .data.datasets import DataSplits, check_images, keep_held_out_apart, load_dataset
from .errors import SemiSegError
from .planning import Plan, apply_plan, existing_plan, fingerprint_splits, make_plan, plan_applies, plan_overrides

__all__ = ["RESUME_MAY_CHANGE", "load_run_data", "prepare_run", "resumed_explicit", "run_config"]

# what a resumed run may be given anew: how it is executed (device, threads, logging, ...), and where it
# ends (iterations, time budget: the schedules follow the new end) and how often it validates
RESUME_MAY_CHANGE = ("device", "threads", "log_every", "checkpoint_every", "prefetch", "data_on_device",
                     "cache_dir", "compile", "iterations", "time_budget", "val_every")


def load_run_data(cfg: TrainConfig, dim: int | None = None) -> DataSplits:
    """The splits ``cfg`` names, as they are on disk (no plan applied). ``dim``: the dimension to read a
    folder/CSV with when it differs from ``cfg.dim`` (before planning decides it)."""
    return load_dataset(cfg.data, cfg.labeled, cfg.val_split or None, cfg.test_split or None,
                        cfg.dim if dim is None else dim, class_map=cfg.class_map)


def prepare_run(explicit: dict, file_values: dict | None = None, out_dir: str | Path | None = None, *,
                resume: bool = False, data: DataSplits | None = None, baseline: bool = False,
                on_plan: Callable[[Plan], None] | None = None, on_recipe: Callable[[str], None] | None = None,
                on_warning: Callable[[str], None] | None = None,
                write_plan: bool = True) -> tuple[TrainConfig, DataSplits, Plan | None]:
    """Resolve the configuration, load the data and plan it when planning applies.

    ``explicit``: what the command line, job or grid set; ``file_values``: a config file's values.
    ``data``: splits already built by the caller (the Slicer job's case list, or the cases ``semiseg bench``
    loaded once for several methods) instead of loading ``cfg.data``. ``baseline``: the method's matched
    supervised baseline (:func:`semiseg.config.matched_supervised`). The plan is written to
    ``OUT/plan.json`` (unless ``write_plan`` is false: the other ranks of a torchrun job, which neither lock
    nor write the folder); a resumed run reuses it. ``on_plan`` is called with the plan once it is final,
    ``on_warning`` with each data warning (one line). Under a short ``time_budget`` on a CPU the training
    size, batch and validation cadence come from :func:`semiseg.planning.budget_recipe.short_budget_recipe`
    (a layer above the plan, under the config file and the command line); ``on_recipe`` is called with its
    description.
    """
    file_values = file_values or {}
    locked = bool(out_dir) and write_plan
    if locked:
        runlock.acquire(out_dir)
    try:
        if resume and out_dir:
            explicit, file_values = resumed_explicit(explicit, file_values, out_dir), {}
        return _prepare(explicit, file_values, out_dir, resume, data, baseline, on_plan, on_recipe, on_warning,
                        write_plan)
    except BaseException:
        if locked:
            runlock.release(out_dir)
        raise


def _prepare(explicit, file_values, out_dir, resume, data, baseline, on_plan, on_recipe, on_warning, write_plan):
    given = {**file_values, **explicit}
    source = None
    if given.get("init_from"):  # warm start: the source run's settings are a layer below the file's
        source = finetune.source_checkpoint(given["init_from"])
        if out_dir is not None:
            finetune.check_out_dir(source, out_dir)
        file_values = {**finetune.inherited_values(source, given), **file_values}
    cfg = resolve_config(explicit, file_values)
    plan = plan_basis = None
    if plan_applies(cfg):
        if data is None:  # a folder/CSV is read before the plan decides its dimension
            data = load_run_data(cfg, given.get("dim") or None)
        data = _check(data, on_warning)
        saved = Path(out_dir) / "plan.json" if out_dir and write_plan else None
        plan = existing_plan(cfg, saved if resume else None)
        if plan is None and source is not None and source["meta"].get("plan") and "plan" not in given:
            plan = Plan.from_dict(source["meta"]["plan"])  # preprocess as the source model was trained
        if plan is None:
            fingerprint, overrides = fingerprint_splits(data, cfg.data), plan_overrides(given)
            plan = make_plan(fingerprint, cfg.device, cfg.memory_budget_gb, overrides)
            if cfg.time_budget and any(k in overrides for k in RECIPE_SIZE_FIELDS):
                # the short-budget recipe is judged on the plan's own size and batch, not the user's
                plan_basis = make_plan(fingerprint, cfg.device, cfg.memory_budget_gb,
                                       {k: v for k, v in overrides.items() if k not in RECIPE_SIZE_FIELDS})
        plan_basis = plan_basis or plan
        cfg = resolve_config(explicit, file_values, plan.config_values())
        # the config file / command line win over the plan: keep the plan in step with what will run
        plan.dim, plan.network, plan.patch_size = cfg.dim, cfg.network, list(cfg.patch_size)
        plan.labeled_batch, plan.unlabeled_batch = cfg.labeled_batch, cfg.unlabeled_batch
        if cfg.dim == 3:
            plan.stride = list(cfg.stride or cfg.patch_size)
        data, _ = apply_plan(data, plan, cfg.cache_dir or None)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            plan.save(saved)
        if on_plan:
            on_plan(plan)
    else:
        if data is None:
            data = load_run_data(cfg)
        data = _check(data, on_warning)
    recipe = None
    if not resume:  # a resumed run's config.json already holds it
        # judged on the dataset's recipe (the plan's size and batch), kept to what the user set
        unset = {k: v for k, v in explicit.items() if k not in RECIPE_SIZE_FIELDS}
        basis = resolve_config(unset, {k: v for k, v in file_values.items() if k not in RECIPE_SIZE_FIELDS},
                               plan_basis.config_values() if plan_basis else None)
        recipe = budget_recipe(basis, {k: getattr(cfg, k) for k in RECIPE_SIZE_FIELDS
                                       if k in explicit or k in file_values})
    if recipe is not None:
        cfg = resolve_config(explicit, file_values, {**(plan.config_values() if plan else {}), **recipe.config_values()})
        if on_recipe:
            on_recipe(recipe.describe())
    if source is not None:
        cfg = finetune.finetune_config(cfg, given, source)
    if baseline:
        cfg = matched_supervised(cfg)
    return cfg, data, plan


RECIPE_SIZE_FIELDS = ("patch_size", "labeled_batch", "unlabeled_batch")  # what the recipe chooses around the user


def budget_recipe(cfg: TrainConfig, fixed: dict | None = None):
    """The short-budget recipe for ``cfg`` (the dataset's recipe) on this machine, or None (no budget, a GPU, or
    the recipe fits). ``fixed``: the training size or batch the user set, kept by the recipe."""
    if not cfg.time_budget:
        return None
    import torch

    from .machine import describe
    from .methods import get_method
    from .planning.budget_recipe import short_budget_recipe
    from .train.budget import parse_duration
    gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    machine = {**describe(), "threads": cfg.threads or torch.get_num_threads(), "gpu": "cuda" if gpu else ""}
    method = get_method(cfg.method)
    # a method without an unlabeled stream (supervised) neither pays for nor is given an unlabeled batch
    return short_budget_recipe(parse_duration(cfg.time_budget), machine, cfg.dim, tuple(cfg.patch_size),
                               cfg.labeled_batch, method.trained_unlabeled_batch(cfg.unlabeled_batch),
                               cfg.iterations, cfg.val_every, method.step_cost, fixed=fixed)


def _check(data: DataSplits, on_warning: Callable[[str], None] | None) -> DataSplits:
    """The splits a run may train on: images checked, held-out cases kept out of training; warnings reported."""
    check_images(data)
    data = keep_held_out_apart(data)
    for w in data.warnings:
        if on_warning:
            on_warning(w)
    return data


def _jsonable(v):
    return json.loads(json.dumps(v))


def resumed_explicit(explicit: dict, file_values: dict | None, out_dir: str | Path) -> dict:
    """The explicit layer of a resumed run: its ``config.json`` with what is given now laid over it. A given
    value that changes the resolved configuration (other than :data:`RESUME_MAY_CHANGE`) is one error line;
    without ``config.json`` (nothing to resume) the given layers are returned unchanged."""
    given = {**(file_values or {}), **explicit}
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return given
    try:
        saved = json.loads(path.read_text())
        TrainConfig.from_dict(saved)
    except (ValueError, TypeError) as e:
        raise SemiSegError(f"--resume: cannot read {path}: {e}") from None
    merged = {**saved, **{k: v for k, v in given.items() if k != "method_options"}}
    merged["method_options"] = {**(saved.get("method_options") or {}), **(given.get("method_options") or {})}
    want = _jsonable(resolve_config(merged).to_dict())
    have = _jsonable(saved)
    want = with_recorded_selection(want, have)  # the loop fell back to the final model (no validation cases)
    diff = [k for k in want if k not in RESUME_MAY_CHANGE and want[k] != have.get(k)]
    if diff:
        shown = "; ".join(f"{k} {have.get(k)} in the run, {want[k]} given" for k in diff[:4])
        raise SemiSegError(f"--resume: {path.parent} was trained with other settings ({shown}); resume without "
                           "them (the run's config.json is used) or train into another --out")
    return merged


def run_config(explicit: dict, out_dir: str | Path) -> TrainConfig:
    """The configuration a run folder was (or will be) trained with: the explicit layer, plus the layer of
    the plan it uses when planning applies and that plan exists (the benchmark's resume checks)."""
    cfg = resolve_config(explicit)
    plan = existing_plan(cfg, Path(out_dir) / "plan.json") if plan_applies(cfg) else None
    return resolve_config(explicit, None, plan.config_values()) if plan is not None else cfg

"""Assembling a run: the one place that turns arguments into ``(configuration, data, plan)``.

Every command goes through :func:`prepare_run`: ``semiseg train``, the Slicer job (``semiseg run``), the
speed benchmark (``semiseg bench``), each run of the benchmark grid and ``semiseg demo``. The
:class:`~semiseg.train.loop.Trainer` then only trains what it is given.

Layers of the configuration (lowest first, see :func:`semiseg.config.resolve_config`): field defaults <
dataset preset < the method's recipe < the plan (users' own scans, :mod:`semiseg.planning`) < config file <
command line / job / grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import TrainConfig, matched_supervised, resolve_config
from .data.datasets import DataSplits, load_dataset
from .planning import Plan, apply_plan, existing_plan, fingerprint_splits, make_plan, plan_applies, plan_overrides

__all__ = ["load_run_data", "prepare_run", "run_config"]


def load_run_data(cfg: TrainConfig, dim: int | None = None) -> DataSplits:
    """The splits ``cfg`` names, as they are on disk (no plan applied). ``dim``: the dimension to read a
    folder/CSV with when it differs from ``cfg.dim`` (before planning decides it)."""
    return load_dataset(cfg.data, cfg.labeled, cfg.val_split or None, cfg.test_split or None,
                        cfg.dim if dim is None else dim, class_map=cfg.class_map)


def prepare_run(explicit: dict, file_values: dict | None = None, out_dir: str | Path | None = None, *,
                resume: bool = False, data: DataSplits | None = None, baseline: bool = False,
                on_plan: Callable[[Plan], None] | None = None, on_recipe: Callable[[str], None] | None = None,
                write_plan: bool = True) -> tuple[TrainConfig, DataSplits, Plan | None]:
    """Resolve the configuration, load the data and plan it when planning applies.

    ``explicit``: what the command line, job or grid set; ``file_values``: a config file's values.
    ``data``: splits already built by the caller (the Slicer job's case list, or the cases ``semiseg bench``
    loaded once for several methods) instead of loading ``cfg.data``. ``baseline``: the method's matched
    supervised baseline (:func:`semiseg.config.matched_supervised`). The plan is written to
    ``OUT/plan.json`` (unless ``write_plan`` is false); a resumed run reuses it. ``on_plan`` is called with
    the plan once it is final. Under a short ``time_budget`` on a CPU the training size, batch and validation
    cadence come from :func:`semiseg.planning.budget_recipe.short_budget_recipe` (a layer above the plan, under
    the config file and the command line); ``on_recipe`` is called with its description.
    """
    file_values = file_values or {}
    cfg = resolve_config(explicit, file_values)
    plan = None
    if plan_applies(cfg):
        given = {**file_values, **explicit}
        if data is None:  # a folder/CSV is read before the plan decides its dimension
            data = load_run_data(cfg, given.get("dim") or None)
        saved = Path(out_dir) / "plan.json" if out_dir and write_plan else None
        plan = existing_plan(cfg, saved if resume else None)
        if plan is None:
            plan = make_plan(fingerprint_splits(data, cfg.data), cfg.device, cfg.memory_budget_gb, plan_overrides(given))
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
    elif data is None:
        data = load_run_data(cfg)
    recipe = budget_recipe(cfg)
    if recipe is not None:
        cfg = resolve_config(explicit, file_values, {**(plan.config_values() if plan else {}), **recipe.config_values()})
        if on_recipe:
            on_recipe(recipe.describe())
    if baseline:
        cfg = matched_supervised(cfg)
    return cfg, data, plan


def budget_recipe(cfg: TrainConfig):
    """The short-budget recipe for ``cfg`` on this machine, or None (no budget, a GPU, or the recipe fits)."""
    if not cfg.time_budget:
        return None
    import torch

    from .machine import describe
    from .methods import get_method
    from .planning.budget_recipe import short_budget_recipe
    from .train.budget import parse_duration
    gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    machine = {**describe(), "threads": cfg.threads or torch.get_num_threads(), "gpu": "cuda" if gpu else ""}
    return short_budget_recipe(parse_duration(cfg.time_budget), machine, cfg.dim, tuple(cfg.patch_size),
                               cfg.labeled_batch, cfg.unlabeled_batch, cfg.iterations, cfg.val_every,
                               get_method(cfg.method).step_cost)


def run_config(explicit: dict, out_dir: str | Path) -> TrainConfig:
    """The configuration a run folder was (or will be) trained with: the explicit layer, plus the layer of
    the plan it uses when planning applies and that plan exists (the benchmark's resume checks)."""
    cfg = resolve_config(explicit)
    plan = existing_plan(cfg, Path(out_dir) / "plan.json") if plan_applies(cfg) else None
    return resolve_config(explicit, None, plan.config_values()) if plan is not None else cfg

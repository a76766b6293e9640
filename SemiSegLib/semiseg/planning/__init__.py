"""Planning for users' own scans: fingerprint -> plan -> preprocessing (cached) -> inference back on
the input's exact grid. See :mod:`.plan` for the rules and :mod:`.preprocess` for the steps."""
from __future__ import annotations

from pathlib import Path

from .fingerprint import Fingerprint, fingerprint_splits
from .plan import Plan, make_plan
from .preprocess import (Preprocessor, apply_plan, predict_on_original_grid, preprocess_all, preprocess_image,
                         restore_label)

__all__ = ["PLAN_INPUT_FIELDS", "PLAN_OVERRIDE_FIELDS", "Fingerprint", "Plan", "Preprocessor", "apply_plan",
           "existing_plan", "fingerprint_splits", "make_plan", "plan_applies", "plan_overrides", "plan_training",
           "predict_on_original_grid", "preprocess_all", "preprocess_image", "restore_label", "run_config"]

BENCHMARK_KINDS = ("acdc", "la", "phantom")  # literature behaviour: plan=auto leaves them as they are


def plan_applies(cfg) -> bool:
    """plan=off: never; plan=PATH: always; plan=auto: user folders/CSVs and generated non-benchmark sets."""
    mode = getattr(cfg, "plan", "auto") or "auto"
    if mode == "off":
        return False
    if mode != "auto":
        return True
    return cfg.data.split(":", 1)[0] not in BENCHMARK_KINDS


# TrainConfig fields that override a plan's decisions, and those the planning step reads besides them
PLAN_OVERRIDE_FIELDS = ("dim", "target_spacing", "modality", "patch_size", "labeled_batch", "unlabeled_batch",
                        "network", "image_interpolation", "label_interpolation")
PLAN_INPUT_FIELDS = PLAN_OVERRIDE_FIELDS + ("labeled", "class_map", "device", "memory_budget_gb", "cache_dir")


def plan_overrides(values: dict) -> dict:
    """The plan-relevant options the user set explicitly (config file or command line)."""
    return {k: values[k] for k in PLAN_OVERRIDE_FIELDS if k in values}


def existing_plan(cfg, saved: Path | None) -> Plan | None:
    """The plan a run uses without planning again: ``--plan PATH``, else the run folder's ``saved``
    plan.json when there is one (a resumed run), else None."""
    if cfg.plan not in ("auto", ""):
        return Plan.load(cfg.plan)
    if saved is not None and saved.is_file():
        return Plan.load(saved)
    return None


def run_config(explicit: dict, out_dir: str | Path):
    """The configuration a run folder was (or will be) trained with: the explicit layer, plus the layer of
    the plan it uses when planning applies and that plan exists (benchmark resume checks)."""
    from ..config import resolve_config
    cfg = resolve_config(explicit)
    plan = existing_plan(cfg, Path(out_dir) / "plan.json") if plan_applies(cfg) else None
    return resolve_config(explicit, None, plan.config_values()) if plan is not None else cfg


def plan_training(explicit: dict, file_values: dict | None = None, out_dir: str | Path | None = None,
                  resume: bool = False, on_plan=None, data=None):
    """Resolve the configuration with a plan layer when planning applies.

    Returns ``(cfg, data, plan)``; ``data`` and ``plan`` are None when no plan applies (the Trainer then
    loads the dataset itself, or uses the ``data`` given). ``data``: splits already built by the caller
    (the Slicer job's case list) instead of loading ``cfg.data``. The plan is written to
    ``OUT/plan.json``; a resumed run reuses it.
    """
    from ..config import resolve_config
    from ..data.datasets import load_dataset

    file_values = file_values or {}
    cfg0 = resolve_config(explicit, file_values)
    if not plan_applies(cfg0):
        return cfg0, None, None
    given = {**file_values, **explicit}
    data = data if data is not None else load_dataset(cfg0.data, cfg0.labeled, cfg0.val_split or None, cfg0.test_split or None,
                        given.get("dim") or None, class_map=cfg0.class_map)
    saved = Path(out_dir) / "plan.json" if out_dir else None
    plan = existing_plan(cfg0, saved if resume else None)
    if plan is None:
        fp = fingerprint_splits(data, cfg0.data)
        plan = make_plan(fp, cfg0.device, cfg0.memory_budget_gb, plan_overrides(given))
    cfg = resolve_config(explicit, file_values, plan.config_values())
    # the config file / command line win over the plan: keep the plan in step with what will run
    plan.dim, plan.network, plan.patch_size = cfg.dim, cfg.network, list(cfg.patch_size)
    plan.labeled_batch, plan.unlabeled_batch = cfg.labeled_batch, cfg.unlabeled_batch
    if cfg.dim == 3:
        plan.stride = list(cfg.stride or cfg.patch_size)
    cache = cfg.cache_dir or None
    data, _ = apply_plan(data, plan, cache)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        plan.save(saved)
    if on_plan:
        on_plan(plan)
    return cfg, data, plan

"""Planning for users' own scans: fingerprint -> plan -> preprocessing (cached) -> inference back on
the input's exact grid. See :mod:`.plan` for the rules and :mod:`.preprocess` for the steps; a run is
planned by :func:`semiseg.run.prepare_run`."""
from __future__ import annotations

from pathlib import Path

from ..presets import is_literature
from .fingerprint import Fingerprint, fingerprint_splits
from .plan import Plan, make_plan
from .preprocess import (Preprocessor, apply_plan, predict_on_original_grid, preprocess_all, preprocess_image,
                         restore_label)

__all__ = ["PLAN_INPUT_FIELDS", "PLAN_OVERRIDE_FIELDS", "Fingerprint", "Plan", "Preprocessor", "apply_plan",
           "existing_plan", "fingerprint_splits", "make_plan", "plan_applies", "plan_overrides",
           "predict_on_original_grid", "preprocess_all", "preprocess_image", "restore_label"]



def plan_applies(cfg) -> bool:
    """plan=off: never; plan=PATH: always; plan=auto: user folders/CSVs and generated non-benchmark sets."""
    mode = getattr(cfg, "plan", "auto") or "auto"
    if mode == "off":
        return False
    if mode != "auto":
        return True
    return not is_literature(cfg.data)  # literature datasets keep their recipes under plan=auto


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

"""``semiseg train`` and ``semiseg plan``."""
from __future__ import annotations

import os
from pathlib import Path

from .. import protocol
from ..console import print_summary, report_plan, report_recipe, warner
from ..options import split_args
from ..stop import StopFlag


def cmd_train(ns, reporter) -> int:
    """Train a segmentation model. Example: semiseg train --data acdc:../shared/data/ACDC --labeled 7
    --method mean_teacher --iterations 1000 --out runs/mt"""
    from semiseg.config import load_config_file
    from semiseg.run import prepare_run
    from semiseg.train.loop import Trainer
    out = Path(ns.out)
    file_values = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    # users' own scans are planned (OUT/plan.json); benchmark datasets keep their recipes (plan=auto)
    # under torchrun only rank 0 writes OUT/plan.json and reports (the plan is deterministic on every rank)
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    cfg, data, _ = prepare_run(split_args(ns), file_values, out, resume=ns.resume, baseline=ns.baseline,
                               write_plan=rank0, on_warning=warner(reporter) if rank0 else None,
                               on_plan=(lambda p: report_plan(reporter, p, out / "plan.json")) if rank0 else None,
                               on_recipe=(lambda text: report_recipe(reporter, text)) if rank0 else None)
    stop = StopFlag(out)
    summary = Trainer(cfg, out, data=data, on_event=reporter, should_stop=stop).run(resume=ns.resume)
    if not reporter.json and rank0:
        print_summary(summary)
    return protocol.EXIT_OK


def cmd_plan(ns, reporter) -> int:
    """Fingerprint a dataset (spacings, sizes, labeled-foreground intensities) and decide target spacing,
    2D/3D, patch and batch for a memory budget, and intensity normalisation. Example: semiseg plan my_scans/
    --out plan.json"""
    from semiseg.data.datasets import check_images, load_dataset
    from semiseg.planning import fingerprint_splits, make_plan, plan_overrides, preprocess_all
    given = {k: v for k, v in split_args(ns).items() if v not in (0, "", "auto", ())}
    data = load_dataset(ns.data, given.get("labeled"), None, None, given.get("dim"), class_map=given.get("class_map", ""))
    check_images(data)
    for w in data.warnings:
        warner(reporter)(w)
    fp = fingerprint_splits(data, ns.data)
    plan = make_plan(fp, given.get("device", "auto"), given.get("memory_budget_gb", 0.0), plan_overrides(given))
    out = Path(ns.out)
    plan.save(out)
    report_plan(reporter, plan, out)
    if ns.preprocess:
        for run in ("first", "second"):
            r = preprocess_all(data, plan, given.get("cache_dir") or None)
            msg = (f"preprocessing ({run} run): {r['cases']} cases in {r['seconds']:.2f} s, {r['misses']} computed, "
                   f"{r['hits']} read from the cache; cache {r['cache_bytes'] / 2**20:.1f} MiB in {r['cache_dir']}")
            reporter({"event": "preprocessed", "run": run, **r}) if reporter.json else print(msg)
    return protocol.EXIT_OK

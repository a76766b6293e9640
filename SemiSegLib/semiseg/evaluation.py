"""Evaluate a network on labeled cases: per case and per class Dice, Jaccard, HD95, ASD (voxels and,
where the spacing is known, mm), and the mean over classes (the papers' "Avg": per volume and class, then over
volumes and classes)."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .data.datasets import CaseRef
from .inference import predict_volume
from .metrics import binary_metrics, dice_per_class_fast

METRIC_NAMES = ("dice", "jaccard", "hd95", "asd")


@dataclass
class CaseResult:
    case: str
    per_class: dict[str, dict[str, float]]  # class name -> metric -> value

    def mean(self, metric: str) -> float:
        return float(np.mean([m[metric] for m in self.per_class.values()]))


def evaluate_cases(net: torch.nn.Module, refs: list[CaseRef], meta: dict, full: bool = True,
                   empty: str = "zero", lcc: bool | None = None, half: bool = True) -> list[CaseResult]:
    """Predict every case and score it. ``full=False`` computes Dice only (fast, for validation), on the
    grid the case is given on; ``full=True`` with a planned model scores each case on its original grid
    (``ref.original`` for a preprocessed case), predicted as ``semiseg segment`` would (preprocessed,
    predicted, resampled back)."""
    results = []
    was_training = net.training
    net.eval()
    try:
        for ref in refs:
            on_original_grid = full and meta.get("plan")
            if on_original_grid:
                ref = ref.original or ref  # a preprocessed case (planning.apply_plan) -> the case as it came
            image, label = ref.image(), ref.label()
            if on_original_grid:
                from .planning import predict_on_original_grid
                pred = predict_on_original_grid(image, meta["plan"],
                                                lambda a: predict_volume(net, a, meta, lcc=lcc, half=half))
            else:
                pred = predict_volume(net, image.array, meta, lcc=lcc, half=half)
            per_class = {}
            values = [c["value"] for c in meta["classes"]]
            if not full:
                dice = dice_per_class_fast(pred, label.array, values)
                per_class = {c["name"]: {"dice": dice[c["value"]]} for c in meta["classes"]}
            else:
                for c in meta["classes"]:
                    p, r = pred == c["value"], label.array == c["value"]
                    m = binary_metrics(p, r, None, empty)
                    if image.spacing_known:
                        mm = binary_metrics(p, r, image.geometry.spacing[:p.ndim], empty)
                        m.update(hd95_mm=mm["hd95"], asd_mm=mm["asd"])
                    per_class[c["name"]] = m
            results.append(CaseResult(ref.name, per_class))
    finally:
        net.train(was_training)
    return results


def summarize(results: list[CaseResult]) -> dict:
    """Mean over cases per class and metric, and the mean over classes ("Avg" in the papers)."""
    if not results:
        return {}
    classes = list(results[0].per_class)
    metrics = list(results[0].per_class[classes[0]])
    per_class = {c: {m: float(np.mean([r.per_class[c][m] for r in results])) for m in metrics} for c in classes}
    mean = {m: float(np.mean([per_class[c][m] for c in classes])) for m in metrics}
    return {"mean": mean, "per_class": per_class, "cases": len(results)}


def write_evaluation(out: str | Path, name: str, summary: dict, results: list[CaseResult]) -> tuple[Path, Path]:
    """``OUT/NAME.json`` (the summary with every case's metrics) and ``OUT/NAME.csv`` (one row per case and
    class), both written atomically."""
    out = Path(out)
    detail = {**summary, "cases_detail": {r.case: r.per_class for r in results}}
    atomic_write(out / f"{name}.json", json.dumps(detail, indent=2))
    rows = [{"case": r.case, "class": cname, **m} for r in results for cname, m in r.per_class.items()]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["case", "class"])
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / f"{name}.csv", table.getvalue())
    return out / f"{name}.json", out / f"{name}.csv"


def evaluate_model(model: str | Path, data: str, split: str = "val", *, labeled: int | None = None,
                   val_split: str | None = None, test_split: str | None = None, empty: str = "zero",
                   lcc: bool | None = None, tta: str | None = None, device: str = "auto",
                   out: str | Path | None = None) -> tuple[dict, Path]:
    """``semiseg evaluate``: a checkpoint (file or run folder) scored on a split of ``data``, written as
    ``OUT/evaluate_SPLIT.json`` and ``.csv`` (``out`` default: the model's folder). Returns the summary
    (with model, data, split, empty, lcc and tta) and the folder written to. ``lcc``/``tta`` None: as trained."""
    from .checkpoint import load_checkpoint, network_from_checkpoint
    from .data.datasets import load_dataset
    from .errors import SemiSegError
    from .train.device import select_device
    dev = select_device(device)
    ckpt = load_checkpoint(model)
    net = network_from_checkpoint(ckpt, dev)
    meta = ckpt["meta"]
    if tta is not None:
        from .inference import check_tta
        meta = {**meta, "tta": check_tta(tta)}
    # the class matching the model was trained with (its --class-map) applies to the evaluated files too
    splits = load_dataset(data, labeled, val_split, test_split, meta["dim"],
                          class_map=ckpt.get("config", {}).get("class_map", ""))
    refs = {"val": splits.val, "test": splits.test}[split]
    if not refs:
        raise SemiSegError(f"{data} has no '{split}' cases (give --{split}-split PATH)")
    res = evaluate_cases(net, refs, meta, full=True, empty=empty, lcc=lcc, half=dev.type == "cuda")
    s = summarize(res)
    s.update(model=ckpt["path"], data=data, split=split, empty=empty,
             lcc=bool(lcc if lcc is not None else meta.get("lcc")), tta=meta.get("tta", "none"))
    folder = Path(out) if out else Path(ckpt["path"]).parent
    write_evaluation(folder, f"evaluate_{split}", s, res)
    return s, folder

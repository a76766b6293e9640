"""Saved models: a folder with ``model.pt`` (the trainer's best checkpoint: a plain network, its
config and the class table) and ``model.json`` (what the panel shows and re-applies to predictions:
class names, colours and terminology of the training segmentations, method, configuration,
validation metrics, labeled-case count, where it came from). No Qt, no torch for reading ``model.json``.

Versions: the correct-and-retrain loop keeps every model it makes as ``LINEAGE/v1``, ``LINEAGE/v2``, ...
(each a saved-model folder); a retrain starts from one version and adds the next, never overwriting one.
"""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

from semiseg.atomic import atomic_path, atomic_write
from semiseg.errors import SemiSegError

MODEL_FILE = "model.pt"
INFO_FILE = "model.json"
FORMAT = "semiseg-model"


class ModelError(SemiSegError):
    """A saved-model problem, as one line (SemiSegError folds the message)."""


def job_model_info(job_dir) -> dict:
    """The model of a finished training job (not copied): checkpoint path + metadata."""
    job = Path(job_dir)
    ckpt = job / "run" / "best.pt"
    if not ckpt.is_file():
        raise ModelError(f"training job {job} has no model yet (no run/best.pt): train first")
    spec = json.loads((job / "job.json").read_text()) if (job / "job.json").is_file() else {}
    run = job / "run"
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else spec.get("config", {})
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    classes = spec.get("dataset", {}).get("classes", [])
    cases = spec.get("dataset", {}).get("cases", [])
    labeled = sum(1 for c in cases if c.get("label") and c.get("split", "train") == "train")
    if not classes:  # a job without a Slicer class table (e.g. a named dataset): the checkpoint's own
        from semiseg.checkpoint import load_checkpoint
        classes = load_checkpoint(ckpt)["meta"].get("classes", [])
    return {
        "format": FORMAT, "version": 1, "name": job.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "method": config.get("method", ""), "classes": classes,
        "config": config, "best_val_dice": metrics.get("best_val_dice"),
        "selected_iteration": metrics.get("selected_iteration"), "source_job": str(job),
        "labeled_cases": labeled, "init_from": config.get("init_from", ""),
        "checkpoint": str(ckpt),
    }


def save_model(job_dir, dest_dir, name: str | None = None) -> Path:
    """Copy a job's best model into ``dest_dir`` (``model.pt`` + ``model.json``); returns the folder."""
    info = job_model_info(job_dir)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest / MODEL_FILE) as tmp:
        shutil.copyfile(info["checkpoint"], tmp)
    info.update(name=name or dest.name, checkpoint=MODEL_FILE)
    atomic_write(dest / INFO_FILE, json.dumps(info, indent=2))  # last and whole: with it the folder is a complete model
    return dest


def load_model_info(path) -> dict:
    """Metadata of a saved model (its folder, ``model.json`` or ``model.pt``) or of a finished training job
    (its folder), with ``checkpoint`` as an absolute path; neither imports torch. A bare SemiSeg checkpoint
    (from ``semiseg train``) works too: its classes come from the checkpoint's own metadata (needs torch)."""
    p = Path(path)
    if p.is_dir() and (p / "job.json").is_file():
        return job_model_info(p)
    folder = p if p.is_dir() else p.parent
    info_file = folder / INFO_FILE
    if info_file.is_file() and (p.is_dir() or p.name in (INFO_FILE, MODEL_FILE)):
        info = json.loads(info_file.read_text())
        if info.get("format") != FORMAT:
            raise ModelError(f"{info_file} is not a SemiSeg model description")
        ckpt = Path(info.get("checkpoint", MODEL_FILE))
        info["checkpoint"] = str(ckpt if ckpt.is_absolute() else folder / ckpt)
        if not Path(info["checkpoint"]).is_file():
            raise ModelError(f"model checkpoint missing: {info['checkpoint']}")
        return info
    ckpt = p if p.is_file() else next((folder / n for n in ("best.pt", MODEL_FILE) if (folder / n).is_file()), None)
    if ckpt is None:
        raise ModelError(f"no SemiSeg model in {p} (expected {INFO_FILE} + {MODEL_FILE}, or a best.pt checkpoint)")
    from semiseg.checkpoint import load_checkpoint  # torch
    try:
        meta = load_checkpoint(ckpt)
    except Exception as e:  # noqa: BLE001 - the engine's one-line error
        raise ModelError(str(e)) from None
    return {"format": FORMAT, "version": 1, "name": ckpt.parent.name, "method": meta["meta"].get("method", ""),
            "classes": meta["meta"].get("classes", []), "config": meta.get("config", {}),
            "checkpoint": str(ckpt), "best_val_dice": (meta.get("metrics") or {}).get("val_dice")}


VERSION_PREFIX = "v"


def versions(lineage_dir) -> list[dict]:
    """The saved versions of a lineage, oldest first, each its model info plus ``version`` (1, 2, ...)."""
    root = Path(lineage_dir)
    out = []
    if root.is_dir():
        for folder in root.iterdir():
            number = folder.name[len(VERSION_PREFIX):]
            if folder.name.startswith(VERSION_PREFIX) and number.isdigit() and (folder / INFO_FILE).is_file():
                out.append({**load_model_info(folder), "version": int(number), "folder": str(folder)})
    return sorted(out, key=lambda v: v["version"])


def save_version(job_dir, lineage_dir) -> Path:
    """Save a finished training job as the lineage's next version (``vN+1``); earlier versions are untouched."""
    existing = versions(lineage_dir)
    number = existing[-1]["version"] + 1 if existing else 1
    dest = Path(lineage_dir) / f"{VERSION_PREFIX}{number}"
    if dest.exists():
        raise ModelError(f"{dest} exists but is not a complete model version: move it away first")
    return save_model(job_dir, dest, name=f"{Path(lineage_dir).name} {VERSION_PREFIX}{number}")


def lineage_of(info: dict) -> Path | None:
    """The lineage folder of a model that is a saved version (``.../LINEAGE/vN/model.pt``), else None."""
    folder = Path(info.get("checkpoint", "")).parent
    number = folder.name[len(VERSION_PREFIX):]
    if folder.name.startswith(VERSION_PREFIX) and number.isdigit() and (folder / INFO_FILE).is_file():
        return folder.parent
    return None

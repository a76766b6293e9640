"""Saved models: a folder with ``model.pt`` (the trainer's best checkpoint: a plain network, its
config and the class table) and ``model.json`` (what the panel shows and re-applies to predictions:
class names, colours and terminology of the training segmentations, method, configuration,
validation metrics, where it came from). No Qt, no torch for reading ``model.json``.
"""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

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
    if not classes:  # a job without a Slicer class table (e.g. a named dataset): the checkpoint's own
        from semiseg.checkpoint import load_checkpoint
        classes = load_checkpoint(ckpt)["meta"].get("classes", [])
    return {
        "format": FORMAT, "version": 1, "name": job.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "method": config.get("method", ""), "classes": classes,
        "config": config, "best_val_dice": metrics.get("best_val_dice"),
        "selected_iteration": metrics.get("selected_iteration"), "source_job": str(job),
        "checkpoint": str(ckpt),
    }


def save_model(job_dir, dest_dir, name: str | None = None) -> Path:
    """Copy a job's best model into ``dest_dir`` (``model.pt`` + ``model.json``); returns the folder."""
    info = job_model_info(job_dir)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / (MODEL_FILE + ".tmp")
    shutil.copyfile(info["checkpoint"], tmp)
    tmp.replace(dest / MODEL_FILE)
    info.update(name=name or dest.name, checkpoint=MODEL_FILE)
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2))
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

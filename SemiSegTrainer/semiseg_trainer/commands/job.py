"""``semiseg run --job FOLDER``: a job folder written by the Slicer module (train, segment or suggest)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .. import protocol
from ..stop import StopFlag

Emit = Callable[[dict], None]


def cmd_run(ns, reporter) -> int:
    """Run a job folder written by the Slicer module (see :mod:`semiseg_trainer.protocol` for job.json).

    Every event goes to stdout and is appended to ``events.jsonl``. Whatever goes wrong ends in exactly
    one ``error`` event ({message: one actionable line, details}) and exit code 2; a cancel (CANCEL file,
    SIGTERM) checkpoints and exits with 3; the job folder is always kept.
    """
    import time
    import traceback
    job = Path(ns.job)
    job.mkdir(parents=True, exist_ok=True)
    events = open(job / protocol.EVENTS_FILE, "a")

    def tee(e):
        e = {"time": round(time.time(), 3), **e} if "time" not in e else e
        events.write(protocol.encode(e) + "\n")
        events.flush()
        reporter(e)

    def fail(message: str, details: str = "") -> int:
        tee({"event": "error", "message": message, "details": details, "job": str(job)})
        print(f"semiseg: error: {message}", file=sys.stderr)
        return protocol.EXIT_ERROR

    from semiseg.errors import CancelledError, SemiSegError
    spec_path = job / protocol.JOB_FILE
    try:
        if not spec_path.is_file():
            raise SemiSegError(f"no {protocol.JOB_FILE} in job folder {job}")
        try:
            spec = protocol.read_job(job)
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise SemiSegError(f"cannot read {spec_path}: {e}") from None
        task = spec.get("task", "train")
        if task not in TASKS:
            raise SemiSegError(f"{spec_path}: unknown task '{task}' (train, segment or suggest)")
        return TASKS[task](spec, job, spec_path, tee)
    except CancelledError as e:
        print(f"semiseg: {e}", file=sys.stderr)
        return protocol.EXIT_CANCELLED
    except SemiSegError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        tee({"event": "finished", "status": "cancelled"})
        return protocol.EXIT_CANCELLED
    except ModuleNotFoundError as e:
        return fail(f"a Python package the trainer needs is missing: {e.name} (install SemiSeg's requirements)",
                    traceback.format_exc())
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen environment problem: still one event
        from semiseg.errors import device_error
        known = device_error(e)
        if known is not None:
            return fail(str(known), traceback.format_exc())
        return fail(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                    f"(details in {job / protocol.EVENTS_FILE})", traceback.format_exc())
    finally:
        events.close()


def _train(spec: dict, job: Path, spec_path: Path, tee: Emit) -> int:
    from semiseg.config import resolve_config
    from semiseg.data.datasets import load_case_list
    from semiseg.run import prepare_run
    from semiseg.train.loop import Trainer
    explicit, resume = spec.get("config", {}), bool(spec.get("resume"))
    data = None
    if spec.get("dataset"):  # the job's case list and fixed class table (no class inference from files)
        ds = spec["dataset"]
        data = load_case_list(ds.get("cases", []), ds.get("classes", []), job, resolve_config(explicit).dim,
                              spec_path)

    pending: list[dict] = []

    def on_plan(plan):  # the panel's log shows the plan; plan.json sits in the run folder
        pending.append({"event": "plan", "plan": plan.to_dict(), "path": str(job / "run" / "plan.json")})
        pending.append({"event": "log", "level": "info", "message": plan.describe()})

    def on_event(e):  # "started" stays the job's first event; the plan follows it
        tee(e)
        if e.get("event") == "started":
            for p in pending:
                tee(p)
            pending.clear()

    cfg, data, _ = prepare_run(explicit, None, job / "run", resume=resume, data=data, on_plan=on_plan,
                               on_recipe=lambda text: pending.append({"event": "log", "level": "info",
                                                                      "message": text}),
                               on_warning=lambda m: tee({"event": "log", "level": "warning", "message": m}))
    Trainer(cfg, job / "run", data=data, on_event=on_event,
            should_stop=StopFlag(job)).run(resume=resume)
    return protocol.EXIT_OK


def _model(spec: dict, job: Path) -> Path:
    """The job's model: an absolute path, or one relative to the job folder."""
    model = Path(spec.get("model", ""))
    return model if model.is_absolute() else job / model


def _segment(spec: dict, job: Path, spec_path: Path, tee: Emit) -> int:
    import torch
    from semiseg.active import map_name
    from semiseg.errors import SemiSegError
    from semiseg.predict import Segmenter, write_uncertainty_csv
    from semiseg.train.loop import select_device
    inputs = [job / p for p in spec.get("inputs", [])]
    if not inputs:
        raise SemiSegError(f"{spec_path}: no input volume to segment")
    try:
        uncertainty = map_name(spec.get("uncertainty"))
    except SemiSegError as e:
        raise SemiSegError(f"{spec_path}: {e}") from None
    model = _model(spec, job)
    out = job / spec.get("outputs", "predictions")
    seg = Segmenter(model, select_device(spec.get("device", "auto")), lcc=spec.get("lcc"), tta=spec.get("tta"))
    stop = StopFlag(job)
    tee({"event": "started", "task": "segment", "total": len(inputs), "model": str(model), "device": str(seg.device)})
    results = []
    for i, f in enumerate(inputs):
        if stop():
            tee({"event": "finished", "status": "cancelled", "task": "segment", "done": i})
            return protocol.EXIT_CANCELLED
        try:
            result = seg.segment_file(f, out, uncertainty=uncertainty)
        except torch.OutOfMemoryError:
            raise SemiSegError(f"out of GPU memory while segmenting {f.name}: choose the CPU or a smaller "
                               f"stride/patch model") from None
        results.append(result)
        tee({"event": "predicted", "index": i + 1, "total": len(inputs), **result})
    if uncertainty:
        write_uncertainty_csv(out / "uncertainty.csv", results)
    tee({"event": "finished", "status": "completed", "task": "segment", "outputs": str(out)})
    return protocol.EXIT_OK


def _suggest(spec: dict, job: Path, spec_path: Path, tee: Emit) -> int:
    from semiseg.active import DEFAULT_DIVERSITY
    from semiseg.errors import SemiSegError
    from semiseg.suggest import suggest_files
    from semiseg.train.loop import select_device
    inputs = [str(job / p) for p in spec.get("inputs", [])]
    if not inputs:
        raise SemiSegError(f"{spec_path}: no input volume to rank")
    model = _model(spec, job)
    strategy = spec.get("strategy", "entropy")
    tee({"event": "started", "task": "suggest", "total": len(inputs), "model": str(model), "strategy": strategy})
    ranking = suggest_files(model, inputs, int(spec.get("n", 1)), strategy, int(spec.get("seed", 0)),
                            float(spec.get("diversity", DEFAULT_DIVERSITY)),
                            select_device(spec.get("device", "auto")))
    tee({"event": "suggested", "strategy": strategy, "ranking": ranking})
    tee({"event": "finished", "status": "completed", "task": "suggest"})
    return protocol.EXIT_OK


TASKS = {"train": _train, "segment": _segment, "suggest": _suggest}

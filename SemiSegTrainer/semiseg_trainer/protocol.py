"""The job protocol shared by the trainer process and the Slicer module (pure Python, no Qt, no torch).

A job is a folder: ``job.json`` in (the training configuration and what to do), one JSON object per
line out on stdout (also appended to ``events.jsonl``), a ``CANCEL`` file to ask for a graceful stop.
Every event has an ``"event"`` key: started, iteration, validation, checkpoint, predicted, log,
finished {status: completed|cancelled}, error {message[, details]}. Under a time budget (config
``time_budget``, e.g. "30m" or "1800") ``iteration`` events carry ``remaining_s`` and a ``budget`` event
{iteration, iterations, val_every, seconds_per_iteration, remaining_s, schedule} announces each new plan.

``job.json`` (schema 1)::

    {"schema": 1, "task": "train", "config": {TrainConfig fields}, "resume": false,
     "dataset": {"classes": [{"value", "name", "color"[, "terminology"]}],     # optional: fixed class table
                 "cases": [{"name", "image", "label" (or null), "split": train|val}]}}   # paths relative to the job
    # config "init_from": PATH warm-starts from an earlier model (semiseg.finetune); its "started" event
    # then carries "warm_start" {init_from, source_iterations, finetune_iterations, source_labeled_cases, teacher}
    {"schema": 1, "task": "segment", "model": PATH, "inputs": [PATH, ...], "device": "auto",
     "uncertainty": false}     # true (= "entropy") or a map's name ("margin", "teacher-disagreement",
                               # "mc-dropout"): NAME.uncertainty.nrrd + "uncertainty"/"uncertainty_score" in
                               # predicted events + uncertainty.csv (input, score) in the outputs folder
    # optional "lcc": true/false and "tta": "none"|"flips"|"reflections" override the model's own settings
    {"schema": 1, "task": "suggest", "model": PATH, "inputs": [PATH, ...], "n": K, "strategy": "entropy",
     "seed": 0, "diversity": 0.05}   # one event {"event": "suggested", "strategy", "ranking": [{"input",
                                     # "score", "picked", "slice"}, ...]} (picks first), then finished

Exit codes: 0 completed, 2 error (one ``error`` event was written), 3 cancelled (the checkpoint is
valid; resume continues from it). Anything else is a crash without an event (killed, segfault, an
interpreter that could not even import the engine); :func:`diagnose_exit` turns it into one line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CANCEL_FILE = "CANCEL"
JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
SCHEMA_VERSION = 1

# exit codes of the trainer process (defined by the engine, shared with the benchmark's child runs)
from semiseg.atomic import atomic_write  # noqa: E402
from semiseg.errors import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK  # noqa: E402,F401

# final states of a job as the module sees it
COMPLETED, CANCELLED, FAILED = "completed", "cancelled", "failed"


def encode(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), default=str)


class EventParser:
    """Incremental parser for a child's stdout: buffers partial lines (pipe chunks do not align with
    newlines) and turns non-JSON lines (third-party prints) into ``log`` events."""

    def __init__(self):
        self._buffer = ""

    def feed(self, chunk: str) -> list[dict]:
        self._buffer += chunk.replace("\r\n", "\n")
        *lines, self._buffer = self._buffer.split("\n")
        return [e for e in (parse_line(line) for line in lines) if e is not None]

    def flush(self) -> list[dict]:
        rest, self._buffer = self._buffer, ""
        e = parse_line(rest)
        return [e] if e is not None else []


def parse_line(line: str) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return {"event": "log", "level": "info", "message": line}
    if isinstance(obj, dict) and "event" in obj:
        return obj
    return {"event": "log", "level": "info", "message": line}


def request_cancel(job_dir: str | Path) -> None:
    (Path(job_dir) / CANCEL_FILE).touch()


def cancel_requested(job_dir: str | Path) -> bool:
    return (Path(job_dir) / CANCEL_FILE).exists()


# ---------------------------------------------------------------------------------------- job files
def write_job(job_dir: str | Path, spec: dict) -> Path:
    """Write ``job.json`` atomically (schema version added) and clear a stale CANCEL sentinel."""
    job = Path(job_dir)
    job.mkdir(parents=True, exist_ok=True)
    (job / CANCEL_FILE).unlink(missing_ok=True)
    spec = {"schema": SCHEMA_VERSION, **spec}
    atomic_write(job / JOB_FILE, json.dumps(spec, indent=2, default=str))
    return job / JOB_FILE


def read_job(job_dir: str | Path) -> dict:
    spec = json.loads((Path(job_dir) / JOB_FILE).read_text())
    if int(spec.get("schema", SCHEMA_VERSION)) > SCHEMA_VERSION:
        raise ValueError(f"{Path(job_dir) / JOB_FILE} has schema {spec['schema']}, newer than this trainer's "
                         f"{SCHEMA_VERSION}: update SemiSeg")
    return spec


def read_events(job_dir: str | Path) -> list[dict]:
    """Every event of ``events.jsonl`` (all runs of the job), tolerating a torn last line."""
    path = Path(job_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    parser = EventParser()
    return parser.feed(path.read_text(errors="replace")) + parser.flush()


# ---------------------------------------------------------------------------------------- outcome
_KNOWN_CRASHES = [
    (re.compile(r"No module named '?torch'?"),
     "PyTorch is not installed for the Python that runs the trainer: install it with the PyTorch extension "
     "(module PyTorch Utils) and restart Slicer"),
    (re.compile(r"No module named '?(semiseg|semiseg_trainer)'?"),
     "the SemiSeg engine is not importable by the trainer process (broken installation): reinstall the SemiSeg extension"),
    (re.compile(r"No module named '?([A-Za-z0-9_\.]+)'?"),
     "a Python package the engine needs is missing ({0}): allow SemiSeg to install its requirements"),
    (re.compile(r"(CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED)"),
     "out of GPU memory: lower the patch size or batch sizes, or choose the CPU"),
    (re.compile(r"(MemoryError|Cannot allocate memory|std::bad_alloc)"),
     "out of memory (RAM): lower the patch size or batch sizes, or close other applications"),
]


def diagnose_exit(exit_code: int | None, events: list[dict], stderr_tail: str = "",
                  killed: bool = False) -> tuple[str, str, str]:
    """``(status, one-line message, details)`` of a finished trainer process.

    The trainer's own ``error`` event wins; a crash without one is explained from the exit code and
    the end of its stderr (known causes: missing torch or package, out of memory, killed)."""
    errors = [e for e in events if e.get("event") == "error"]
    finished = [e for e in events if e.get("event") == "finished"]
    completed = any(e.get("status") == COMPLETED for e in finished)
    if exit_code == EXIT_OK and not errors and (completed or not killed):
        return COMPLETED, "completed", ""
    if exit_code == EXIT_CANCELLED or (killed and not errors):
        how = " (the process did not stop in time and was killed)" if killed else ""
        return CANCELLED, "cancelled" + how, ""
    if errors:
        e = errors[-1]
        return FAILED, str(e.get("message", "error")), str(e.get("details", "") or stderr_tail)
    if finished and finished[-1].get("status") == "cancelled":
        return CANCELLED, "cancelled", ""
    for pattern, text in _KNOWN_CRASHES:
        m = pattern.search(stderr_tail or "")
        if m:
            return FAILED, text.format(*(m.groups() or ("",))), stderr_tail
    if exit_code is not None and exit_code in (-9, 137, 9):
        return FAILED, ("the trainer process was killed (exit code %d), often by the system when it runs out "
                        "of memory" % exit_code), stderr_tail
    lines = [ln.strip() for ln in (stderr_tail or "").splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    return FAILED, f"the trainer process stopped unexpectedly (exit code {exit_code}): {last}", stderr_tail


# ---------------------------------------------------------------------------------------- progress
def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(max(0.0, float(seconds))))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


_NOT_TERMS = {"event", "time", "iteration", "iterations", "lr", "it_per_s", "eta_s", "remaining_s"}


class ProgressState:
    """What a progress display needs, folded from the events: iteration, ETA, loss terms, validation
    Dice, and the history rows for a loss/Dice plot (one row per ``iteration`` event)."""

    def __init__(self):
        self.task = ""
        self.iteration = 0
        self.iterations = 0
        self.eta_s: float | None = None
        self.remaining_s: float | None = None  # time left of a --time-budget run
        self.terms: dict[str, float] = {}
        self.val_dice: float | None = None
        self.best_dice: float | None = None
        self.done = 0          # segmentation: volumes done
        self.total = 0
        self.history: list[dict] = []   # {"iteration", <term>..., "val_dice" (latest known)}
        self.checkpoint: str = ""
        self.status = "idle"
        self.message = ""

    def update(self, e: dict) -> None:
        kind = e.get("event")
        if kind == "started":
            self.status = "running"
            self.task = e.get("task", "train")
            self.iteration = int(e.get("iteration", 0) or 0)
            self.iterations = int(e.get("iterations", 0) or 0)
            self.total = int(e.get("total", 0) or 0)
            # a resumed run restarts its curves at the resumed iteration
            self.history = [r for r in self.history if r["iteration"] <= self.iteration]
        elif kind == "iteration":
            self.iteration = int(e.get("iteration", self.iteration))
            self.iterations = int(e.get("iterations", self.iterations))
            self.eta_s = e.get("eta_s")
            self.remaining_s = e.get("remaining_s", self.remaining_s)
            self.terms = {k: float(v) for k, v in e.items() if k not in _NOT_TERMS and isinstance(v, (int, float))
                          and not isinstance(v, bool)}
            row = {"iteration": self.iteration, **self.terms}
            if self.val_dice is not None:
                row["val_dice"] = self.val_dice
            self.history.append(row)
        elif kind == "validation":
            self.val_dice = float(e.get("dice", 0.0))
            self.best_dice = float(e.get("best_dice", self.val_dice))
            if self.history and self.history[-1]["iteration"] == int(e.get("iteration", -1)):
                self.history[-1]["val_dice"] = self.val_dice
        elif kind == "budget":  # a time budget re-planned the run: a new total
            self.iterations = int(e.get("iterations", self.iterations))
            self.remaining_s = e.get("remaining_s", self.remaining_s)
        elif kind == "checkpoint":
            self.checkpoint = str(e.get("path", ""))
        elif kind == "predicted":
            self.done = int(e.get("index", self.done + 1))
            self.total = int(e.get("total", self.total))
        elif kind == "finished":
            self.status = str(e.get("status", COMPLETED))
            if self.status == COMPLETED and self.iterations:
                self.iteration = self.iterations
                self.eta_s = 0.0
        elif kind == "error":
            self.status = FAILED
            self.message = str(e.get("message", ""))

    @property
    def fraction(self) -> float:
        if self.task == "segment":
            return self.done / self.total if self.total else 0.0
        return self.iteration / self.iterations if self.iterations else 0.0

    def status_text(self) -> str:
        if self.task == "segment":
            return f"volume {self.done}/{self.total}"
        parts = [f"iteration {self.iteration}/{self.iterations}"]
        if self.status == "running" and self.remaining_s is not None:
            parts.append(f"{format_duration(self.remaining_s)} left of the time budget")
        elif self.status == "running" and self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if "loss" in self.terms:
            parts.append(f"loss {self.terms['loss']:.4f}")
        if self.val_dice is not None:
            parts.append(f"val Dice {100 * self.val_dice:.1f}% (best {100 * (self.best_dice or 0):.1f}%)")
        return " · ".join(parts)

    def plot_columns(self) -> list[str]:
        """Column names of :meth:`plot_rows`: iteration, every loss term seen, val_dice."""
        cols: list[str] = []
        for r in self.history:
            for k in r:
                if k not in cols and k not in ("iteration", "val_dice"):
                    cols.append(k)
        return ["iteration"] + cols + ["val_dice"]

    def plot_rows(self) -> list[list[float]]:
        cols = self.plot_columns()
        return [[float(r.get(c, float("nan"))) for c in cols] for r in self.history]

"""The job protocol shared by the trainer process and the Slicer module (pure Python, no Qt, no torch).

A job is a folder: ``job.json`` in (the training configuration and what to do), one JSON object per
line out on stdout (also appended to ``events.jsonl``), a ``CANCEL`` file to ask for a graceful stop.
Every event has an ``"event"`` key: started, iteration, validation, checkpoint, predicted, log,
finished {status: completed|cancelled}, error {message}.
"""
from __future__ import annotations

import json
from pathlib import Path

CANCEL_FILE = "CANCEL"
JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
SCHEMA_VERSION = 1

# exit codes of the trainer process
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_CANCELLED = 3


def encode(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), default=str)


class EventParser:
    """Incremental parser for a child's stdout: buffers partial lines (pipe chunks do not align with
    newlines) and turns non-JSON lines (third-party prints) into ``log`` events."""

    def __init__(self):
        self._buffer = ""

    def feed(self, chunk: str) -> list[dict]:
        self._buffer += chunk
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

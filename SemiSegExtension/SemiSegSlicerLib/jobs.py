"""Job folders in the workspace (``WORKSPACE/jobs/<kind>-<time>``) and their retention: the workspace keeps
the newest N jobs and never deletes a protected one (the running job, the last training job that Resume
and Save model refer to, the job whose model is loaded). Saved models live in ``WORKSPACE/models`` and
are never touched here."""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path

JOBS = "jobs"


def new_job_dir(workspace, kind: str, now: datetime.datetime | None = None) -> Path:
    """A new, empty job folder named by kind and time (``-2``, ``-3``, ... when taken)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(workspace) / JOBS
    job, n = base / f"{kind}-{stamp}", 2
    while job.exists():
        job, n = base / f"{kind}-{stamp}-{n}", n + 1
    job.mkdir(parents=True)
    return job


def job_dirs(workspace) -> list[Path]:
    """Every job folder, oldest first (by the time in its name, then its modification time)."""
    base = Path(workspace) / JOBS
    if not base.is_dir():
        return []
    folders = [p for p in base.iterdir() if p.is_dir() and (p / "job.json").is_file()]
    return sorted(folders, key=lambda p: (p.name.split("-", 1)[-1], p.stat().st_mtime))


def cleanup(workspace, keep: int, protect=()) -> list[Path]:
    """Delete all but the newest ``keep`` job folders, never one of ``protect`` (paths; a checkpoint inside
    a job protects its job). Returns the folders deleted. ``keep`` 0 means keep only the protected."""
    protected = set()
    for p in protect:
        if not p:
            continue
        p = Path(p).resolve()
        protected.update({p, *p.parents})
    folders = job_dirs(workspace)
    newest = set(folders[-keep:]) if keep > 0 else set()
    removed = []
    for job in folders:
        if job in newest or job.resolve() in protected:
            continue
        shutil.rmtree(job, ignore_errors=True)
        if not job.exists():
            removed.append(job)
    return removed

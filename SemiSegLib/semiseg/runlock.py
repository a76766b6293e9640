"""One process owns a run folder: ``OUT/.semiseg.lock`` holds the owner's pid and host.

A second process that would write the same ``config.json``, ``last.pt``, ``best.pt`` and
``progress.jsonl`` stops with one line naming the owner. A lock whose process is gone (same host, the
pid no longer exists: a killed run) is taken over. The lock is released when the run ends (the
Trainer closes) and, as a fallback, when the process exits."""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from .errors import SemiSegError

LOCK_FILE = ".semiseg.lock"
_held: set[Path] = set()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _owner(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _busy(run_dir: Path, owner: dict) -> SemiSegError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("time", 0)))
    return SemiSegError(f"run folder {run_dir} is in use by process {owner.get('pid')} on host "
                        f"{owner.get('host')} (since {since}); wait for it, stop it, or use another --out")


def _is_mine(owner: dict) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _is_stale(owner: dict | None) -> bool:
    """No readable owner, or an owner on this host whose process is gone: the folder may be taken over."""
    return owner is None or (owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", 0))))


def check_free(run_dir: str | Path) -> None:
    """SemiSegError (the line :func:`acquire` would give) if another live process holds ``run_dir``; for
    callers that would write into the folder (a log, a record) before the process that takes it starts."""
    run_dir = Path(run_dir).resolve()
    owner = _owner(run_dir / LOCK_FILE)
    if not _is_stale(owner) and not _is_mine(owner):
        raise _busy(run_dir, owner)


def acquire(run_dir: str | Path) -> Path:
    """Take the run folder for this process (idempotent); SemiSegError if another live process has it."""
    run_dir = Path(run_dir).resolve()
    lock = run_dir / LOCK_FILE
    if lock in _held:
        return lock
    run_dir.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": round(time.time(), 3)}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            if owner is None:  # being written right now, or garbage: look again
                time.sleep(0.05)
                owner = _owner(lock)
            if owner is not None and _is_mine(owner):
                _held.add(lock)
                return lock
            if not _is_stale(owner):
                raise _busy(run_dir, owner)
            lock.unlink(missing_ok=True)  # its process is gone: take the folder over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held.add(lock)
        return lock
    raise SemiSegError(f"cannot lock run folder {run_dir}: {lock} keeps changing")


def release(run_dir: str | Path) -> None:
    """Give the folder back if this process holds it."""
    lock = Path(run_dir).resolve() / LOCK_FILE
    if lock in _held:
        _held.discard(lock)
        owner = _owner(lock)
        if owner is None or owner.get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for lock in list(_held):
        release(lock.parent)

"""The trainer as a background process: command, environment, a job runner, process-tree kill.

:class:`JobRunner` owns one job: it starts ``<python> -u -m semiseg_trainer --json run --job DIR`` as a
:class:`ChildProcess`, parses stdout with the shared :class:`semiseg_trainer.protocol.EventParser`
(partial lines and non-JSON output tolerated), keeps the end of stderr, cancels gracefully (``CANCEL``
sentinel; the trainer checkpoints and exits with its own code) and kills the whole process tree after a
grace period. Nothing here imports Qt: output is delivered when the owner calls :meth:`JobRunner.poll`
(Slicer: from a ``qt.QTimer`` on the main thread, see :mod:`SemiSegSlicerLib.mainloop`) or
:meth:`JobRunner.wait` (scripts, tests, ``waitForCompletion=True``). Slicer, scripts and the tests run
this one path.

Callbacks that raise are logged and do not stop the job's bookkeeping: inside Slicer a callback runs
under a Qt slot, where PythonQt would print and swallow the exception and leave the job looking
"running" forever.

``PythonSlicer`` is a launcher that starts the real interpreter as a child, so killing the direct
child is not enough: :func:`kill_process_tree` kills every descendant (psutil if available, else
``/proc`` or ``pgrep`` on POSIX, ``taskkill /T`` on Windows), never the caller's own process group.
"""
from __future__ import annotations

import codecs
import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from semiseg_trainer import protocol

GRACE_SECONDS = 15.0
STDERR_LINES = 200


# ---------------------------------------------------------------------------------------- command
def package_roots() -> list[str]:
    """Folders that make ``semiseg`` and ``semiseg_trainer`` importable: where this process imports them
    from (the extension's qt-scripted-modules folder in Slicer, the checkout or site-packages outside)."""
    import importlib.util
    roots: list[str] = []
    for name in ("semiseg_trainer", "semiseg"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            root = str(Path(list(spec.submodule_search_locations)[0]).parent)
            if root not in roots:
                roots.append(root)
    return roots


def trainer_module_command(args: list[str], python: str | None = None) -> list[str]:
    """``[python, -u, -m, semiseg_trainer, *args]``; inside Slicer ``sys.executable`` is PythonSlicer."""
    return [python or sys.executable, "-u", "-m", "semiseg_trainer", *args]


def trainer_command(job_dir, python: str | None = None) -> list[str]:
    """``[python, -u, -m, semiseg_trainer, --json, run, --job, DIR]``."""
    return trainer_module_command(["--json", "run", "--job", str(job_dir)], python)


def trainer_environment(base: dict | None = None, cpu_only: bool = False) -> dict:
    """The child's environment: unbuffered output, our packages first on PYTHONPATH, optionally no GPU."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    paths = package_roots() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    # Apple's MPS backend lacks some operators: PyTorch runs them on the CPU instead of failing
    env.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    return env


# ---------------------------------------------------------------------------------------- tree kill
def descendant_pids(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children first), best effort on each platform."""
    try:
        import psutil
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    except ImportError:
        pass
    if sys.platform.startswith("win"):
        return []  # taskkill /T handles the tree
    children: dict[int, list[int]] = collections.defaultdict(list)
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                children[ppid].append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    else:  # macOS: pgrep -P, one level at a time
        def kids(p):
            try:
                out = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True, timeout=5).stdout
                return [int(x) for x in out.split()]
            except (OSError, subprocess.SubprocessError, ValueError):
                return []
        pending = [pid]
        while pending:
            p = pending.pop()
            children[p] = kids(p)
            pending.extend(children[p])
    out, pending = [], [pid]
    while pending:
        p = pending.pop(0)
        for c in children.get(p, []):
            out.append(c)
            pending.append(c)
    return out


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        import psutil
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    except ImportError:
        pass
    if sys.platform.startswith("win"):
        out = subprocess.run(["tasklist", "/FI", f"PID eq {pid}"], capture_output=True, text=True,
                             creationflags=no_window_flags()).stdout
        return str(pid) in out
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def kill_process_tree(pid: int, include_parent: bool = True) -> list[int]:
    """Kill ``pid`` and all its descendants (SIGKILL / taskkill /F /T). Returns the pids signalled.
    Never signals the caller's own process or process group."""
    if pid <= 0 or pid == os.getpid():
        return []
    if sys.platform.startswith("win"):
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, creationflags=no_window_flags())
        return [pid]
    # the parent first, so that it cannot react to its children's death (e.g. exit 0 after a wait)
    victims = ([pid] if include_parent else []) + descendant_pids(pid)
    for p in victims:
        if p == os.getpid():
            continue
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return victims


# ---------------------------------------------------------------------------------------- child process
def no_window_flags() -> int:
    """Windows: start console programs (PythonSlicer, taskkill, tasklist) without flashing a console window
    (Slicer is a GUI application, so each would otherwise open one)."""
    return getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000) if sys.platform.startswith("win") else 0


class ChildProcess:
    """The trainer as ``subprocess.Popen`` with one reader thread per pipe. The threads only queue what
    they read; :meth:`pump` delivers output, due timers and the exit on the caller's thread (in Slicer the
    main thread, from a ``qt.QTimer`` or a blocking wait), so no callback ever runs on a reader thread.
    This is the pattern of Slicer's own ``launchConsoleProcess(blocking=False)`` and MONAIAuto3DSeg."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._closed_streams = 0
        self._finished_sent = False
        self._timers: list[tuple[float, Callable]] = []
        self.on_stdout: Callable[[str], None] = lambda s: None
        self.on_stderr: Callable[[str], None] = lambda s: None
        self.on_finished: Callable[[int], None] = lambda c: None

    def start(self, program: str, args: list[str], env: dict, cwd: str) -> None:
        kw: dict = {}
        if sys.platform.startswith("win"):
            kw["creationflags"] = no_window_flags() | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
        else:
            kw["start_new_session"] = True  # the tree can be killed without touching our group
        self.proc = subprocess.Popen([program, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd, **kw)
        for stream, kind in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            threading.Thread(target=self._read, args=(stream, kind), daemon=True).start()

    def _read(self, stream, kind: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split across reads
        for raw in iter(lambda: stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096), b""):
            self._queue.put((kind, decoder.decode(raw)))
        self._queue.put((kind, decoder.decode(b"", final=True)))
        self._queue.put((kind, None))

    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            kill_process_tree(self.proc.pid)

    def call_later(self, seconds: float, fn: Callable) -> None:
        self._timers.append((time.monotonic() + seconds, fn))

    def pump(self, timeout: float = 0.0) -> None:
        """Deliver queued output, due timers and the exit (once both streams are closed), waiting at most
        ``timeout`` seconds for output to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, text = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if text is None:
                self._closed_streams += 1
            elif text:
                (self.on_stdout if kind == "out" else self.on_stderr)(text)
            if self._queue.empty() and time.monotonic() >= deadline:
                break
        now = time.monotonic()
        due = [t for t in self._timers if t[0] <= now]
        self._timers = [t for t in self._timers if t[0] > now]
        for _, fn in due:
            fn()
        if self._closed_streams >= 2 and not self._finished_sent and self.proc is not None:
            code = self.proc.wait()
            self._finished_sent = True
            self.on_finished(code)


# ---------------------------------------------------------------------------------------- runner
@dataclass
class JobResult:
    status: str                      # completed | cancelled | failed
    message: str                     # one line for the user
    details: str = ""                # traceback / stderr tail
    exit_code: int | None = None
    killed: bool = False
    job_dir: str = ""
    events: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == protocol.COMPLETED


class JobRunner:
    """Run one job folder with callbacks ``on_event(event)``, ``on_log(text)``, ``on_finished(result)``."""

    def __init__(self, job_dir, python: str | None = None, cpu_only: bool = False,
                 on_event: Callable[[dict], None] | None = None, on_log: Callable[[str], None] | None = None,
                 on_finished: Callable[[JobResult], None] | None = None, grace_seconds: float = GRACE_SECONDS):
        self.job_dir = Path(job_dir)
        self.backend = ChildProcess()
        self.python = python
        self.cpu_only = cpu_only
        self.on_event = on_event or (lambda e: None)
        self.on_log = on_log or (lambda s: None)
        self.on_finished = on_finished or (lambda r: None)
        self.grace_seconds = grace_seconds
        self.parser = protocol.EventParser()
        self.progress = protocol.ProgressState()
        self.events: list[dict] = []
        self.stderr: collections.deque = collections.deque(maxlen=STDERR_LINES)
        self._stderr_partial = ""
        self.result: JobResult | None = None
        self.cancel_requested = False
        self.killed = False
        self.started = False

    # -------------------------------------------------------------------------- control
    def start(self) -> "JobRunner":
        if not (self.job_dir / protocol.JOB_FILE).is_file():
            raise FileNotFoundError(f"no {protocol.JOB_FILE} in {self.job_dir}")
        b = self.backend
        b.on_stdout, b.on_stderr, b.on_finished = self._stdout, self._stderr, self._finished
        cmd = trainer_command(self.job_dir, self.python)
        b.start(cmd[0], cmd[1:], trainer_environment(cpu_only=self.cpu_only), str(self.job_dir))
        self.started = True
        return self

    @property
    def running(self) -> bool:
        return self.started and self.result is None

    def cancel(self, grace_seconds: float | None = None) -> None:
        """Graceful first (CANCEL file), then the process tree is killed after the grace period."""
        if not self.running or self.cancel_requested:
            return
        self.cancel_requested = True
        protocol.request_cancel(self.job_dir)
        _call(self.on_log, "cancel requested: the trainer checkpoints and stops")
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        self.backend.call_later(grace, self._kill_if_running)

    def kill(self) -> None:
        """Stop now (scene closed, module cleaned up): kill the whole tree."""
        if self.running:
            self.killed = True
            self.backend.kill()

    def _kill_if_running(self) -> None:
        if self.running:
            _call(self.on_log, f"the trainer did not stop within {self.grace_seconds:g} s: killing its process tree")
            self.kill()

    def poll(self, timeout: float = 0.0) -> None:
        self.backend.pump(timeout)

    def wait(self, timeout: float | None = None, step: float = 0.1,
             between: Callable[[], None] | None = None) -> JobResult | None:
        """Block until the job ends (scripts, tests), delivering callbacks meanwhile; ``between`` runs
        after each step (Slicer: ``slicer.app.processEvents`` so that the application stays painted)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.result is None:
            if end is not None and time.monotonic() > end:
                return None
            self.backend.pump(step)
            if between is not None:
                _call(between)
        return self.result

    # -------------------------------------------------------------------------- output
    def _stdout(self, text: str) -> None:
        for e in self.parser.feed(text):
            self._event(e)

    def _event(self, e: dict) -> None:
        self.events.append(e)
        self.progress.update(e)
        _call(self.on_event, e)

    def _stderr(self, text: str) -> None:
        text = self._stderr_partial + text
        *lines, self._stderr_partial = text.split("\n")
        for line in lines:
            line = line.rstrip()
            if line:
                self.stderr.append(line)
                _call(self.on_log, line)

    def _finished(self, code: int) -> None:
        for e in self.parser.flush():
            self._event(e)
        if self._stderr_partial.strip():
            self.stderr.append(self._stderr_partial.rstrip())
            _call(self.on_log, self._stderr_partial.rstrip())
            self._stderr_partial = ""
        status, message, details = protocol.diagnose_exit(code, self.events, "\n".join(self.stderr),
                                                          killed=self.killed)
        self.result = JobResult(status, message, details, code, self.killed, str(self.job_dir), list(self.events))
        _call(self.on_finished, self.result)


def _call(fn: Callable, *args) -> None:
    """Run a callback; an exception is logged with its traceback, never propagated into the pump."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - one faulty observer must not stall the job
        logging.exception("SemiSeg: a job callback raised")

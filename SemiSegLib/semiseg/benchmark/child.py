"""One grid run trained in a process of its own (``python -m semiseg.benchmark.child RUN_DIR [--resume]``):
the parent forwards the child's JSON events and passes a stop request on as SIGTERM; the child ends with
the engine's exit codes (:data:`semiseg.errors.EXIT_OK`, ``EXIT_ERROR``, ``EXIT_CANCELLED``). Peak memory on
the CPU is the process's peak resident set, which only means "this run's peak" in a process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, CancelledError, SemiSegError
from .records import RUN_FILE, EventHandler

if TYPE_CHECKING:
    from .grid import RunSpec

def _train_run(explicit: dict, run_dir: Path, resume: bool, on_event, should_stop) -> None:
    """One grid run, planned like `semiseg train` (users' folders get a plan.json; benchmark data keep
    their recipes)."""
    from ..run import prepare_run
    from ..train.loop import Trainer
    cfg, data, _ = prepare_run(explicit, None, run_dir, resume=resume)
    Trainer(cfg, run_dir, data=data, on_event=on_event, should_stop=should_stop).run(resume=resume)


def _child_env() -> dict:
    here = str(Path(__file__).resolve().parents[2])
    paths = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def _run_child(spec: RunSpec, resume: bool, emit: EventHandler, stop: Callable[[], bool]) -> None:
    """Train one run in a fresh process (``python -m semiseg.benchmark.child RUN_DIR [--resume]``), forwarding
    its JSON events; a stop request is passed on as SIGTERM (the child checkpoints and exits 3)."""
    import signal
    args = [sys.executable, "-m", "semiseg.benchmark.child", str(spec.dir)] + (["--resume"] if resume else [])
    err_path = spec.dir / "benchmark_stderr.log"
    last_error: dict = {}
    with open(err_path, "a") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=_child_env())

        def pump():
            for line in proc.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    e = {"event": "log", "level": "info", "message": line}
                if not isinstance(e, dict) or "event" not in e:
                    continue
                if e["event"] == "error":
                    last_error.update(e)
                emit({**e, "run": spec.name})

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        signalled = False
        while proc.poll() is None:
            if not signalled and stop():
                proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.1)
        reader.join(timeout=10)
    code = proc.returncode
    try:
        if err_path.stat().st_size == 0:
            err_path.unlink()
    except OSError:
        pass
    if code == EXIT_OK:
        return
    if code == EXIT_CANCELLED or signalled:
        raise CancelledError(f"benchmark cancelled during {spec.name} (checkpoint kept); run the same command "
                             f"again to continue")
    tail = ""
    try:
        tail = " ".join(err_path.read_text().strip().splitlines()[-1:])[:300]
    except OSError:
        pass
    msg = last_error.get("message") or tail or f"exit code {code}"
    raise SemiSegError(f"run {spec.name} failed: {msg} (details: {err_path})")


def _child_main(argv: list[str]) -> int:
    """Entry point of a run's own process: events as JSON lines on stdout, exit EXIT_OK/EXIT_ERROR/EXIT_CANCELLED."""
    import signal
    run_dir = Path(argv[0])
    resume = "--resume" in argv[1:]
    flag = {"stop": False}

    def handler(*_):
        flag["stop"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)

    def out(e: dict) -> None:
        sys.stdout.write(json.dumps(e, separators=(",", ":"), default=str) + "\n")
        sys.stdout.flush()

    try:
        rec = json.loads((run_dir / RUN_FILE).read_text())
        _train_run(rec["explicit"], run_dir, resume, out, lambda: flag["stop"])
        return EXIT_OK
    except CancelledError as e:
        print(f"semiseg: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except SemiSegError as e:
        out({"event": "error", "message": str(e)})
        return EXIT_ERROR


if __name__ == "__main__":  # a run's own process (see _run_child)
    sys.exit(_child_main(sys.argv[1:]))

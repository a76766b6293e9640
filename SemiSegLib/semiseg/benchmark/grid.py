"""The grid of runs (methods x label counts x seeds): planning it, deciding per run folder whether it is
finished, to be resumed or new (a folder trained with another configuration is an error), recording what
was asked with the hardware and versions, and training what is not finished."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import runlock
from ..atomic import atomic_write
from ..errors import CancelledError, SemiSegError
from .child import _run_child, _train_run
from .figures import export_tensorboard, make_run_figures
from .records import BASE_SEED, GRID_KEYS, RUN_FILE, RUNTIME_KEYS, EventHandler



def parse_int_list(text: str | int | list, what: str) -> list[int]:
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise SemiSegError(f"{what} must be comma-separated integers, not '{text}'") from None
    if not vals:
        raise SemiSegError(f"{what} is empty")
    return vals


def derive_seeds(seeds: str | int, base: int = BASE_SEED) -> list[int]:
    """``3`` → [base, base+1, base+2]; ``"1337,3407"`` (a comma) → exactly those seeds."""
    if isinstance(seeds, str) and "," in seeds:
        vals = parse_int_list(seeds, "--seeds")
    else:
        n = parse_int_list(seeds, "--seeds")[0]
        if n < 1:
            raise SemiSegError(f"--seeds must be at least 1, not {n}")
        vals = [base + k for k in range(n)]
    if len(set(vals)) != len(vals):
        raise SemiSegError(f"--seeds lists a seed twice: {vals}")
    return vals


@dataclass

class RunSpec:
    method: str
    labeled: int
    seed: int
    dir: Path
    explicit: dict  # the explicit layer of resolve_config for this run (what the user asked + the grid)

    @property
    def name(self) -> str:
        return self.dir.name


def run_name(method: str, labeled: int, seed: int) -> str:
    return f"{method}-L{labeled}-s{seed}"


def plan_grid(data: str, methods: list[str], labeled: list[int], seeds: list[int], out: str | Path,
              common: dict | None = None, method_options: dict[str, dict] | None = None) -> list[RunSpec]:
    """Every run of the grid, in the order they are trained: per setting, per seed, every method (so a
    partial benchmark has whole seeds). Each configuration is resolved now, so a bad option fails before
    any training starts."""
    from ..config import matched_method, matched_supervised_explicit, resolve_config
    from ..methods import get_method
    common = dict(common or {})
    for k in GRID_KEYS + ("data",):
        common.pop(k, None)
    method_options = method_options or {}
    unknown = set(method_options) - set(methods)
    if unknown:
        raise SemiSegError(f"options given for method(s) not in --methods: {', '.join(sorted(unknown))}")
    if len(set(methods)) != len(methods):
        raise SemiSegError(f"--methods lists a method twice: {', '.join(methods)}")
    specs = []
    for lab in labeled:
        for seed in seeds:
            for m in methods:
                get_method(matched_method(m))
                explicit = dict(common, data=data, method=matched_method(m), labeled=lab, seed=seed)
                if method_options.get(m):
                    explicit["method_options"] = dict(method_options[m])
                if m != matched_method(m):  # supervised@X: X's matched supervised baseline
                    explicit = matched_supervised_explicit(explicit)
                resolve_config(explicit)  # validates
                specs.append(RunSpec(m, lab, seed, Path(out) / "runs" / run_name(m, lab, seed), explicit))
    return specs


def _comparable(cfg: dict) -> dict:
    d = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    return json.loads(json.dumps(d))  # tuples -> lists


def run_state(spec: RunSpec) -> str:
    """``done`` (metrics.json), ``resume`` (last.pt, no metrics.json) or ``new``; a folder trained with
    another configuration is an error."""
    from ..config import with_recorded_selection
    from ..run import run_config
    d = spec.dir
    if (d / "config.json").is_file() and ((d / "metrics.json").is_file() or (d / "last.pt").is_file()):
        want = _comparable(run_config(spec.explicit, d).to_dict())
        have = _comparable(json.loads((d / "config.json").read_text()))
        want = with_recorded_selection(want, have)  # the loop falls back to final without a validation split
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            shown = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff[:4])
            raise SemiSegError(f"{d} was trained with a different configuration ({shown}); use another --out "
                               f"or delete that run folder")
    if (d / "metrics.json").is_file():
        return "done"
    if (d / "last.pt").is_file():
        return "resume"
    return "new"


def environment(device: str = "auto") -> dict:
    """Hardware and versions, as recorded with each run."""
    import numpy
    import scipy
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if device != "cpu" and torch.cuda.is_available():
        idx = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        gpu = torch.cuda.get_device_name(idx)
    try:
        from importlib.metadata import version
        semiseg_version = version("semiseg")
    except Exception:  # noqa: BLE001 - a plain checkout that is not installed
        semiseg_version = "unknown (not installed)"
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "semiseg": semiseg_version,
            "numpy": numpy.__version__, "scipy": scipy.__version__}


def _record_run(spec: RunSpec, state: str, command: str | None) -> None:
    p = spec.dir / RUN_FILE
    rec = json.loads(p.read_text()) if p.is_file() else {}
    rec.update({"method": spec.method, "labeled": spec.labeled, "seed": spec.seed, "explicit": spec.explicit})
    if command:
        rec.setdefault("command", command)
    env = environment(str(spec.explicit.get("device", "auto")))
    envs = rec.setdefault("environments", [])
    if not envs or envs[-1] != env:
        envs.append(env)
    rec.setdefault("attempts", []).append({"state": state, "time": round(time.time(), 3)})
    spec.dir.mkdir(parents=True, exist_ok=True)
    atomic_write(p, json.dumps(rec, indent=2, default=str))


def run_grid(specs: list[RunSpec], on_event: EventHandler | None = None, should_stop: Callable[[], bool] | None = None,
             isolate: bool = True, plots: bool = True, command: str | None = None, parallel: int = 1) -> list[Path]:
    """Train every run that is not finished (resuming interrupted ones); return the run folders. ``parallel``
    > 1 trains that many runs at once, each in a process of its own (one GPU holds several ACDC runs)."""
    emit = on_event or (lambda e: None)
    stop = should_stop or (lambda: False)
    if parallel < 1:
        raise SemiSegError(f"--parallel must be at least 1, not {parallel}")
    if parallel > 1 and not isolate:
        raise SemiSegError("parallel runs need a process each (isolate=True)")
    todo = []
    for i, spec in enumerate(specs, 1):
        state = run_state(spec)  # every folder checked before anything trains
        tag = f"run {i}/{len(specs)} {spec.name}"
        if state == "done":
            emit({"event": "log", "level": "info", "run": spec.name, "message": f"{tag}: finished earlier, kept"})
        else:
            todo.append((tag, spec, state))
    if parallel == 1:
        for tag, spec, state in todo:
            _train_one(tag, spec, state, emit, stop, isolate, command)
            _figures(spec, plots, emit)
    else:
        _run_parallel(todo, parallel, emit, stop, plots, command)
    return [s.dir for s in specs]


def _train_one(tag: str, spec: RunSpec, state: str, emit: EventHandler, stop: Callable[[], bool], isolate: bool,
               command: str | None) -> None:
    if stop():
        raise CancelledError(f"benchmark cancelled before {spec.name}; run the same command again to continue")
    runlock.check_free(spec.dir)  # another benchmark is training it: one line, nothing written there
    emit({"event": "log", "level": "info", "run": spec.name,
          "message": f"{tag}: {'resuming' if state == 'resume' else 'training'} → {spec.dir}"})
    _record_run(spec, state, command)
    if isolate:
        _run_child(spec, state == "resume", emit, stop)
    else:
        _run_here(spec, state == "resume", emit, stop)


def _figures(spec: RunSpec, plots: bool, emit: EventHandler) -> None:
    if plots:
        make_run_figures(spec.dir, emit)
    export_tensorboard(spec.dir)


def _run_parallel(todo: list, parallel: int, emit: EventHandler, stop: Callable[[], bool], plots: bool,
                  command: str | None) -> None:
    """``parallel`` runs at a time, in grid order. A failed run starts no new ones (those running finish);
    a stop request stops them all with their checkpoints. Each run gets an equal share of the CPU threads
    unless ``threads`` was given; figures are drawn afterwards, in this thread (matplotlib is not
    thread-safe)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    lock = threading.Lock()
    failures: list[tuple[str, SemiSegError]] = []
    trained: list[RunSpec] = []
    share = max(1, (os.cpu_count() or 1) // parallel)

    def locked_emit(e: dict) -> None:
        with lock:
            emit(e)

    def train(item) -> None:
        tag, spec, state = item
        if failures:  # a stop request is _train_one's to check
            return
        if not spec.explicit.get("threads"):
            spec.explicit = dict(spec.explicit, threads=share)  # a runtime setting: same computation
        try:
            _train_one(tag, spec, state, locked_emit, stop, True, command)
            trained.append(spec)
        except SemiSegError as e:
            failures.append((spec.name, e))

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="semiseg-run") as pool:
        list(pool.map(train, todo))
    for spec in trained:
        _figures(spec, plots, emit)
    if stop() or any(isinstance(e, CancelledError) for _, e in failures):
        raise CancelledError(f"benchmark cancelled with {len(todo) - len(trained)} run(s) not finished "
                             f"(checkpoints kept); run the same command again to continue")
    if failures:
        others = f" ({len(failures) - 1} other run(s) failed too: {', '.join(n for n, _ in failures[1:])})" \
            if len(failures) > 1 else ""
        raise SemiSegError(f"{failures[0][1]}{others}")


def _run_here(spec: RunSpec, resume: bool, emit: EventHandler, stop: Callable[[], bool]) -> None:
    _train_run(spec.explicit, spec.dir, resume, lambda e: emit({**e, "run": spec.name}), stop)

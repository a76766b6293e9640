"""Benchmarks a reviewer can trust: a grid of runs (methods x label counts x seeds), resumable, then
one table with the protocol printed above it (BENCHMARK.md, METHODS.md §0.8, §0.9, §7).

Layout of a benchmark folder ``OUT``::

    OUT/runs/<method>-L<labeled>-s<seed>/   one run folder each (config.json, best.pt, last.pt,
                                            progress.jsonl, metrics.json, curves.png, qualitative.png,
                                            benchmark_run.json: what was asked, hardware, versions)
    OUT/results.md                          protocol header + tables (mean ± std over seeds, per seed)
    OUT/results.csv                         one row per run, split and case
    OUT/curves_<data>-L<labeled>.png        the runs of one setting overlaid

A run is *finished* when its ``metrics.json`` exists: it is never trained again. A run with a
``last.pt`` but no ``metrics.json`` (killed, cancelled) is continued with resume; otherwise it starts
afresh. A folder whose recorded configuration differs from what is asked is an error, so results of
two different protocols never end up in one table. Seeds are ``base + k`` (base 1337, the lineage
default), so ``--seeds 3`` always means 1337, 1338, 1339.

Aggregation: for every run, the number is its summary's mean over classes of the mean over cases
(the papers' "Avg"); across seeds the table shows the mean ± the **sample** standard deviation
(``ddof = 1``, :data:`STD_DDOF`), with every per-seed value listed below it.

Each run is trained in a fresh Python process by default (``isolate=True``): peak memory on the CPU is
the process's peak RSS, which only means "this run's peak" in a process of its own.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import atomic_write
from .errors import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, CancelledError, SemiSegError
from .presets import is_literature

STD_DDOF = 1  # sample standard deviation over seeds (numpy.std(..., ddof=1)); n = 1 has no std
BASE_SEED = 1337
RUN_FILE = "benchmark_run.json"
GRID_KEYS = ("method", "labeled", "seed")  # the grid's axes: shown as columns, not as protocol options
# fields that change how fast a run goes but not what it computes: printed, but not a different variant
RUNTIME_KEYS = ("device", "threads", "log_every", "checkpoint_every")
# fields that name the data and its splits: part of the protocol header, not "options"
DATA_KEYS = ("data", "val_split", "test_split")
METRICS = ("dice", "jaccard", "hd95", "asd")
METRIC_TITLES = {"dice": "Dice %", "jaccard": "Jaccard %", "hd95": "HD95", "asd": "ASD",
                 "hd95_mm": "HD95 mm", "asd_mm": "ASD mm"}
PERCENT = ("dice", "jaccard")

EventHandler = Callable[[dict], None]


# ------------------------------------------------------------------------------------------ statistics
def mean_std(values: list[float], ddof: int = STD_DDOF) -> tuple[float, float | None]:
    """Mean and standard deviation (``ddof`` = 1: the sample std); std is None for fewer than 2 values."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None
    m = sum(vals) / len(vals)
    if len(vals) - ddof <= 0:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - ddof))


def format_mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m, s = mean_std([v * scale for v in values])
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


# ------------------------------------------------------------------------------------------ grid
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
    from .config import matched_method, matched_supervised_explicit, resolve_config
    from .methods import get_method
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
    from .run import run_config
    d = spec.dir
    if (d / "config.json").is_file() and ((d / "metrics.json").is_file() or (d / "last.pt").is_file()):
        want = _comparable(run_config(spec.explicit, d).to_dict())
        have = _comparable(json.loads((d / "config.json").read_text()))
        if have.get("selection") == "final" and want.get("selection") == "val":
            have["selection"] = "val"  # the loop falls back to final when there is no validation split
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
             isolate: bool = True, plots: bool = True, command: str | None = None) -> list[Path]:
    """Train every run that is not finished (resuming interrupted ones); return the run folders."""
    emit = on_event or (lambda e: None)
    stop = should_stop or (lambda: False)
    for i, spec in enumerate(specs, 1):
        state = run_state(spec)
        tag = f"run {i}/{len(specs)} {spec.name}"
        if state == "done":
            emit({"event": "log", "level": "info", "run": spec.name, "message": f"{tag}: finished earlier, kept"})
            continue
        if stop():
            raise CancelledError(f"benchmark cancelled before {spec.name}; run the same command again to continue")
        emit({"event": "log", "level": "info", "run": spec.name,
              "message": f"{tag}: {'resuming' if state == 'resume' else 'training'} → {spec.dir}"})
        _record_run(spec, state, command)
        if isolate:
            _run_child(spec, state == "resume", emit, stop)
        else:
            _run_here(spec, state == "resume", emit, stop)
        if plots:
            make_run_figures(spec.dir, emit)
        export_tensorboard(spec.dir)
    return [s.dir for s in specs]


def _train_run(explicit: dict, run_dir: Path, resume: bool, on_event, should_stop) -> None:
    """One grid run, planned like `semiseg train` (users' folders get a plan.json; benchmark data keep
    their recipes)."""
    from .run import prepare_run
    from .train.loop import Trainer
    cfg, data, _ = prepare_run(explicit, None, run_dir, resume=resume)
    Trainer(cfg, run_dir, data=data, on_event=on_event, should_stop=should_stop).run(resume=resume)


def _run_here(spec: RunSpec, resume: bool, emit: EventHandler, stop: Callable[[], bool]) -> None:
    _train_run(spec.explicit, spec.dir, resume, lambda e: emit({**e, "run": spec.name}), stop)


def _child_env() -> dict:
    here = str(Path(__file__).resolve().parents[1])
    paths = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def _run_child(spec: RunSpec, resume: bool, emit: EventHandler, stop: Callable[[], bool]) -> None:
    """Train one run in a fresh process (``python -m semiseg.benchmark RUN_DIR [--resume]``), forwarding
    its JSON events; a stop request is passed on as SIGTERM (the child checkpoints and exits 3)."""
    import signal
    args = [sys.executable, "-m", "semiseg.benchmark", str(spec.dir)] + (["--resume"] if resume else [])
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


# ------------------------------------------------------------------------------------------ collecting runs
@dataclass
class RunRecord:
    dir: Path
    config: dict
    metrics: dict
    info: dict  # benchmark_run.json (empty for a run trained with `semiseg train`)
    baseline: dict = field(default_factory=dict)  # the preset's configuration for the same data/method/labeled
    diffs: dict = field(default_factory=dict)     # option -> (value, preset value), grid axes excluded
    method_diffs: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def labeled(self) -> int:
        return int(self.config.get("labeled", 0))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", BASE_SEED))

    @property
    def data(self) -> str:
        return self.config.get("data", "")

    @property
    def setting(self) -> str:
        kind = self.data.split(":", 1)[0] or "data"
        return f"{kind} {self.labeled} labeled"

    @property
    def variant_key(self) -> tuple:
        opts = tuple(sorted((k, json.dumps(v[0])) for k, v in self.diffs.items() if k not in RUNTIME_KEYS))
        mopts = tuple(sorted((k, json.dumps(v[0])) for k, v in self.method_diffs.items()))
        return opts, mopts


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders (with metrics.json) named directly or found below the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(m.parent for m in p.rglob("metrics.json")))
        else:
            raise SemiSegError(f"not a run folder: {p}")
    unique, seen = [], set()
    for p in found:
        r = p.resolve()
        if r not in seen:  # the same folder named twice counts once
            seen.add(r)
            unique.append(p)
    return unique


def _json(v):
    return json.loads(json.dumps(v))


def load_run(run_dir: str | Path) -> RunRecord:
    from .config import resolve_config
    d = Path(run_dir)
    for name in ("config.json", "metrics.json"):
        if not (d / name).is_file():
            raise SemiSegError(f"{d} is not a finished run (no {name}); finish it with `semiseg train --resume` "
                               f"or the benchmark command")
    cfg = json.loads((d / "config.json").read_text())
    metrics = json.loads((d / "metrics.json").read_text())
    info = json.loads((d / RUN_FILE).read_text()) if (d / RUN_FILE).is_file() else {}
    base_explicit = {k: cfg[k] for k in ("data", "method", "labeled", "seed", "val_split", "test_split") if k in cfg}
    if not is_literature(cfg.get("data", "")):
        base_explicit["dim"] = cfg.get("dim", 0)  # a folder or CSV: the dimension picks the generic preset
    try:
        baseline = _json(resolve_config(base_explicit).to_dict())
    except SemiSegError:
        baseline = {}
    rec = RunRecord(d, cfg, metrics, info, baseline)
    skip = set(GRID_KEYS) | set(DATA_KEYS) | {"method_options"}
    for k, v in cfg.items():
        if k in skip:
            continue
        b = baseline.get(k)
        if _json(v) != b:
            rec.diffs[k] = (_json(v), b)
    bopts = baseline.get("method_options", {})
    for k, v in (cfg.get("method_options") or {}).items():
        if _json(v) != bopts.get(k):
            rec.method_diffs[k] = (_json(v), bopts.get(k))
    return rec


def collect_runs(paths: list[str | Path]) -> list[RunRecord]:
    records = [load_run(p) for p in find_runs(paths)]
    if not records:
        raise SemiSegError(f"no finished run (metrics.json) in {', '.join(map(str, paths))}")
    seen: dict[tuple, Path] = {}
    for r in records:
        key = (r.data, r.labeled, r.method, r.variant_key, r.seed)
        if key in seen:
            raise SemiSegError(f"two runs of {r.method} ({r.setting}) with seed {r.seed} and the same options: "
                               f"{seen[key]} and {r.dir}; give one of them")
        seen[key] = r.dir
    return records


# ------------------------------------------------------------------------------------------ aggregation
@dataclass
class Group:
    data: str
    labeled: int
    method: str
    label: str        # method name, with its options when several variants of one method are compared
    runs: list[RunRecord]

    @property
    def setting(self) -> str:
        return self.runs[0].setting


def report_split(records: list[RunRecord]) -> str:
    """The split the table reports: ``test`` when every run has it, else ``val``."""
    if all("test" in r.metrics for r in records):
        return "test"
    if all("val" in r.metrics for r in records):
        return "val"
    missing = [str(r.dir) for r in records if "val" not in r.metrics and "test" not in r.metrics]
    raise SemiSegError(f"runs without any evaluated split: {', '.join(missing[:3])}" if missing else
                       "the runs evaluated different splits (some only val, some only test); report them separately")


def group_runs(records: list[RunRecord]) -> list[Group]:
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.data, r.labeled, r.method, r.variant_key), []).append(r)
    variants: dict[tuple, int] = {}
    for (data, lab, m, _v) in groups:
        variants[(data, lab, m)] = variants.get((data, lab, m), 0) + 1
    out = []
    for (data, lab, m, v), runs in groups.items():
        label = m
        if variants[(data, lab, m)] > 1:
            opts = [f"{k}={json.loads(x)}" for k, x in v[0]] + [f"{k}={json.loads(x)}" for k, x in v[1]]
            label = f"{m} [{', '.join(opts) or 'preset'}]"
        out.append(Group(data, lab, m, label, sorted(runs, key=lambda r: r.seed)))
    return out


def run_value(r: RunRecord, split: str, metric: str, cls: str | None = None) -> float | None:
    s = r.metrics.get(split) or {}
    src = s.get("per_class", {}).get(cls, {}) if cls else s.get("mean", {})
    v = src.get(metric)
    return None if v is None else float(v)


def group_stats(g: Group, split: str, metric: str, cls: str | None = None) -> tuple[float, float | None, int]:
    vals = [v for v in (run_value(r, split, metric, cls) for r in g.runs) if v is not None]
    m, s = mean_std(vals)
    return m, s, len(vals)


# ------------------------------------------------------------------------------------------ protocol header
def _fmt_val(v) -> str:
    if isinstance(v, list):
        return "×".join(map(str, v)) if v and all(isinstance(x, int) for x in v) else json.dumps(v)
    if isinstance(v, dict) or v == "":
        return json.dumps(v)
    return str(v)


def _option_lines(records: list[RunRecord], groups: list[Group]) -> list[str]:
    label_of = {id(r): g.label for g in groups for r in g.runs}
    lines = []
    keys = sorted({k for r in records for k in r.diffs})
    for k in keys:
        by_value: dict[str, list[str]] = {}
        presets = sorted({_fmt_val(r.baseline.get(k)) for r in records})
        for r in records:
            v = _fmt_val(r.diffs[k][0]) if k in r.diffs else _fmt_val(r.config.get(k))
            lab = label_of[id(r)]
            by_value.setdefault(v, [])
            if lab not in by_value[v]:
                by_value[v].append(lab)
        tag = " (runtime: speed only)" if k in RUNTIME_KEYS else ""
        if len(by_value) == 1:
            lines.append(f"- `{k}` = {next(iter(by_value))} (preset: {', '.join(presets)}){tag}")
        else:
            parts = "; ".join(f"{v} for {', '.join(labs)}" for v, labs in by_value.items())
            lines.append(f"- `{k}`: {parts} (preset: {', '.join(presets)}){tag}")
    mkeys = sorted({(r.method, k) for r in records for k in r.method_diffs})
    for m, k in mkeys:
        vals: dict[str, str] = {}
        for r in records:
            if r.method == m:
                v = r.method_diffs[k][0] if k in r.method_diffs else (r.config.get("method_options") or {}).get(k)
                vals.setdefault(_fmt_val(v), _fmt_val(r.baseline.get("method_options", {}).get(k)))
        shown = "; ".join(vals)
        lines.append(f"- `{m}` option `{k}` = {shown} (method default for the preset: {', '.join(sorted(set(vals.values())))})")
    return lines or ["- none: every run used the preset's recipe and the methods' default options"]


def protocol_lines(records: list[RunRecord], groups: list[Group], split: str) -> list[str]:
    cfgs = [r.config for r in records]

    def uniq(key, cfg_list=cfgs) -> list:
        out = []
        for c in cfg_list:
            v = _fmt_val(c.get(key))
            if v not in out:
                out.append(v)
        return out

    lines = ["## Protocol", ""]
    datas = uniq("data")
    summaries = []
    for r in records:
        s = r.metrics.get("data", "")
        if s and s not in summaries:
            summaries.append(s)
    lines.append(f"- Data: {', '.join(f'`{d}`' for d in datas)}; " + "; ".join(summaries))
    for key, what in (("val_split", "validation split"), ("test_split", "test split")):
        vals = [v for v in uniq(key) if v and v != '""']
        lines.append(f"- {what.capitalize()}: " + (", ".join(f"`{v}`" for v in vals) if vals else "the dataset's own" if key == "val_split" else "none given"))
    n_cases = sorted({int((r.metrics.get(split) or {}).get("cases", 0)) for r in records})
    note = ""
    if split == "val":
        note = (" **No test split was evaluated: these are validation numbers, from the split that also "
                "selected the checkpoint when the selection rule is `val` (optimistic).**")
    lines.append(f"- Split evaluated: `{split}` ({'/'.join(map(str, n_cases))} volumes).{note}")
    sel_text = {"val": "best mean validation Dice (`selection=val`)",
                "final": "the final iteration (`selection=final`)",
                "test": "best Dice on the TEST set (`selection=test`: paper reproduction only, test-set leakage)"}
    sels = []
    for c in cfgs:
        s = sel_text.get(c.get("selection"), str(c.get("selection")))
        if c.get("selection") in ("val", "test"):
            s += f", checked every {c.get('val_every')} iterations"
        if s not in sels:
            sels.append(s)
    lines.append(f"- Checkpoint selection: {'; '.join(sels)}")
    empty_text = {"zero": "`zero`: a class with an empty prediction scores 0 on all four metrics (SS-Net/BCP)",
                  "penalty": "`penalty`: empty prediction → Dice 0, HD95 373.13 (ICL)"}
    lines.append(f"- Empty-prediction rule: {'; '.join(empty_text.get(v, v) for v in uniq('empty'))}")
    lines.append(f"- Post-processing: largest connected component per class {'/'.join('on' if v == 'True' else 'off' for v in uniq('lcc'))}")
    inf = []
    for c in cfgs:
        if c.get("dim") == 2:
            s = f"2D slice by slice, resized to {_fmt_val(c.get('patch_size'))} ({c.get('resize')}), back with nearest"
        else:
            s = f"3D sliding window {_fmt_val(c.get('patch_size'))}, stride {_fmt_val(c.get('stride') or c.get('patch_size'))}"
        if s not in inf:
            inf.append(s)
    lines.append(f"- Inference: {'; '.join(inf)}")
    lines.append("- Metrics: per volume and class on binary masks, averaged over volumes, then over classes "
                 "(\"Avg\"). Dice and Jaccard in %; HD95 and ASD in voxels with no spacing (\"paper units\", "
                 "as medpy); ASD is one-directional (prediction → reference) as medpy's `asd`.")
    lines.append(f"- Aggregation: mean ± sample standard deviation (ddof = {STD_DDOF}) over seeds of each run's "
                 "number; n = runs (seeds) in the cell; per-seed values below.")
    seeds = sorted({r.seed for r in records})
    lines.append(f"- Seeds: {', '.join(map(str, seeds))}")
    commands = []
    for r in records:
        c = r.info.get("command")
        if c and c not in commands:
            commands.append(c)
    for c in commands:
        lines.append(f"- Command: `{c}`")
    envs, recorded = [], True
    for r in records:
        e = r.info.get("environments")
        if not e:
            recorded = False
            continue
        for x in e:
            if x not in envs:
                envs.append(x)
    if not recorded:
        cur = environment(str(cfgs[0].get("device", "auto")))
        if cur not in envs:
            envs.append({**cur, "note": "machine that ran the report (some runs recorded none)"})
    devices = sorted({str(r.metrics.get("device", "?")) for r in records})
    for e in envs:
        note = f" ({e['note']})" if e.get("note") else ""
        lines.append(f"- Hardware: CPU {e.get('cpu')} ({e.get('cpu_count')} logical cores), GPU {e.get('gpu') or 'none'}; "
                     f"training device: {', '.join(devices)}{note}")
        lines.append(f"- Versions: python {e.get('python')}, torch {e.get('torch')}, semiseg {e.get('semiseg')}, "
                     f"numpy {e.get('numpy')}, scipy {e.get('scipy')}; {e.get('platform')}")
    lines.append("- Cost columns: wall time = training wall clock including validation, excluding the final "
                 "evaluation; it/s = training steps only; peak memory = the run process's peak RSS on the CPU, "
                 "max allocated CUDA memory on a GPU.")
    lines.append("- Options that differ from the preset (the dataset recipe plus the method's own recipe and "
                 "option defaults):")
    lines.extend("  " + line for line in _option_lines(records, groups))
    return lines


# ------------------------------------------------------------------------------------------ tables
def _classes(records: list[RunRecord], split: str) -> list[str]:
    out: list[str] = []
    for r in records:
        for c in (r.metrics.get(split) or {}).get("per_class", {}):
            if c not in out:
                out.append(c)
    return out


def _mm_metrics(records: list[RunRecord], split: str) -> list[str]:
    mean = [(r.metrics.get(split) or {}).get("mean", {}) for r in records]
    return [m for m in ("hd95_mm", "asd_mm") if mean and all(m in x for x in mean)]


def _cell(g: Group, split: str, metric: str, cls: str | None = None) -> str:
    vals = [v for v in (run_value(r, split, metric, cls) for r in g.runs) if v is not None]
    return format_mean_std(vals, 100.0 if metric in PERCENT else 1.0)


def _cost_cell(g: Group, key: str, digits: int) -> str:
    vals = [float(r.metrics[key]) for r in g.runs if r.metrics.get(key) is not None]
    return format_mean_std(vals, 1.0, digits)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def results_markdown(records: list[RunRecord], figures: list[str] | None = None) -> str:
    split = report_split(records)
    groups = sorted(group_runs(records), key=lambda g: (g.data, g.labeled, g.label))
    classes = _classes(records, split)
    metrics = list(METRICS) + _mm_metrics(records, split)
    lines = [f"# SemiSeg benchmark: {', '.join(sorted({r.setting for r in records}))}", ""]
    lines += protocol_lines(records, groups, split) + [""]
    lines += [f"## Results on `{split}` (mean ± std over seeds)", ""]
    head = ["setting", "method", "n"] + [METRIC_TITLES[m] for m in metrics] + [f"{c} Dice %" for c in classes] + \
           ["wall time s", "it/s", "peak memory MB"]
    lines += [_row(head), _row(["---"] * len(head))]
    for g in groups:
        lines.append(_row([g.setting, g.label, len(g.runs)] + [_cell(g, split, m) for m in metrics]
                          + [_cell(g, split, "dice", c) for c in classes]
                          + [_cost_cell(g, "wall_time_s", 1), _cost_cell(g, "it_per_s", 2), _cost_cell(g, "peak_memory_mb", 0)]))
    lines += ["", f"## Per class on `{split}` (mean ± std over seeds)", ""]
    head = ["setting", "method", "class"] + [METRIC_TITLES[m] for m in metrics]
    lines += [_row(head), _row(["---"] * len(head))]
    for g in groups:
        for c in classes:
            lines.append(_row([g.setting, g.label, c] + [_cell(g, split, m, c) for m in metrics]))
    lines += ["", f"## Per seed on `{split}`", ""]
    head = ["setting", "method", "seed"] + [METRIC_TITLES[m] for m in metrics] + [f"{c} Dice %" for c in classes] + \
           ["selected iteration", "wall time s", "it/s", "peak memory MB", "run"]
    lines += [_row(head), _row(["---"] * len(head))]
    for g in groups:
        for r in g.runs:
            vals = []
            for m in metrics:
                v = run_value(r, split, m)
                vals.append("–" if v is None else f"{v * (100 if m in PERCENT else 1):.2f}")
            for c in classes:
                v = run_value(r, split, "dice", c)
                vals.append("–" if v is None else f"{100 * v:.2f}")
            lines.append(_row([g.setting, g.label, r.seed] + vals + [
                r.metrics.get("selected_iteration"), f"{float(r.metrics.get('wall_time_s', 0)):.1f}",
                f"{float(r.metrics.get('it_per_s', 0)):.2f}", f"{float(r.metrics.get('peak_memory_mb', 0)):.0f}",
                f"`{r.dir}`"]))
    if figures:
        lines += ["", "## Figures", ""] + [f"- {f}" for f in figures]
    return "\n".join(lines) + "\n"


def results_rows(records: list[RunRecord]) -> tuple[list[str], list[dict]]:
    """One row per run, split and case: the case's mean over classes and every class's metrics."""
    rows, classes, metric_names = [], [], []
    for r in records:
        for split in ("val", "test"):
            for case, per_class in ((r.metrics.get(split) or {}).get("cases_detail") or {}).items():
                for c, ms in per_class.items():
                    if c not in classes:
                        classes.append(c)
                    for m in ms:
                        if m not in metric_names:
                            metric_names.append(m)
    for r in records:
        for split in ("val", "test"):
            for case, per_class in ((r.metrics.get(split) or {}).get("cases_detail") or {}).items():
                row = {"data": r.data, "labeled": r.labeled, "method": r.method, "seed": r.seed,
                       "run": str(r.dir), "split": split, "case": case}
                for m in metric_names:
                    vals = [per_class[c][m] for c in per_class if m in per_class[c]]
                    row[f"mean_{m}"] = sum(vals) / len(vals) if vals else ""
                for c in classes:
                    for m in metric_names:
                        row[f"{c.replace(' ', '_')}_{m}"] = per_class.get(c, {}).get(m, "")
                rows.append(row)
    fields = ["data", "labeled", "method", "seed", "run", "split", "case"] + [f"mean_{m}" for m in metric_names] + \
             [f"{c.replace(' ', '_')}_{m}" for c in classes for m in metric_names]
    return fields, rows


def write_report(records: list[RunRecord], out: str | Path, plots: bool = True,
                 on_event: EventHandler | None = None) -> dict:
    """Write results.md, results.csv and (``plots``) the per-setting overlaid curves into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if plots:
        from .plots import plot_overlay, setting_slug
        by_setting: dict[tuple, list[RunRecord]] = {}
        for r in records:
            by_setting.setdefault((r.data, r.labeled), []).append(r)
        for (data, lab), rs in by_setting.items():
            p = out / f"curves_{setting_slug(data, lab)}.png"
            try:
                plot_overlay([(f"{r.method} s{r.seed}", r.method, r.dir) for r in sorted(rs, key=lambda r: (r.method, r.seed))],
                             p, title=rs[0].setting)
                figures.append(f"training curves overlaid, {rs[0].setting}: `{p}`")
            except SemiSegError as e:
                if on_event:
                    on_event({"event": "log", "level": "warning", "message": f"overlay plot skipped: {e}"})
        for r in records:
            for name, what in (("curves.png", "training curves"), ("qualitative.png", "qualitative")):
                if (r.dir / name).is_file():
                    figures.append(f"{what}, {r.method} seed {r.seed}: `{r.dir / name}`")
    md = results_markdown(records, figures)
    atomic_write(out / "results.md", md)
    fields, rows = results_rows(records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "results.csv", buf.getvalue())
    return {"results_md": str(out / "results.md"), "results_csv": str(out / "results.csv"), "runs": len(records),
            "rows": len(rows), "figures": figures}


# ------------------------------------------------------------------------------------------ figures, tensorboard
def make_run_figures(run_dir: str | Path, on_event: EventHandler | None = None, qualitative: bool = True) -> list[Path]:
    """curves.png (from progress.jsonl) and qualitative.png (best.pt on a few validation slices)."""
    from .plots import plot_qualitative, plot_run_curves
    d = Path(run_dir)
    made = []
    jobs = [("curves.png", lambda: plot_run_curves(d, d / "curves.png"))]
    if qualitative:
        jobs.append(("qualitative.png", lambda: plot_qualitative(d, d / "qualitative.png")))
    for name, job in jobs:
        try:
            job()
            made.append(d / name)
        except SemiSegError as e:  # a figure never fails a benchmark
            if on_event:
                on_event({"event": "log", "level": "warning", "message": f"{d.name}: {name} skipped: {e}"})
    return made


def export_tensorboard(run_dir: str | Path) -> Path | None:
    """Replay progress.jsonl into TensorBoard event files (``RUN/tensorboard``) when TensorBoard is
    installed (an optional extra, never required); returns the folder or None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard not installed (ImportError) or broken: skip quietly
        return None
    from .plots import read_progress
    d = Path(run_dir)
    tb = d / "tensorboard"
    if tb.is_dir():
        import shutil
        shutil.rmtree(tb)
    prog = read_progress(d)
    w = SummaryWriter(str(tb))
    try:
        for it, terms in prog["iterations"]:
            for k, v in terms.items():
                w.add_scalar(f"train/{k}", v, it)
        for it, dice, per_class in prog["validations"]:
            w.add_scalar("val/dice", dice, it)
            for c, v in per_class.items():
                w.add_scalar(f"val/dice_{c.replace(' ', '_')}", v, it)
    finally:
        w.close()
    return tb


if __name__ == "__main__":  # a run's own process (see _run_child)
    sys.exit(_child_main(sys.argv[1:]))

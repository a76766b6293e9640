"""Finished runs as records, and their aggregation over seeds: a run's folder (config.json, metrics.json,
benchmark_run.json) read back, grouped per setting (data, label count, method, options), with the mean and
the sample standard deviation over seeds (``ddof = 1``, :data:`STD_DDOF`; the papers' "mean ± std")."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import SemiSegError
from ..presets import is_literature

BASE_SEED = 1337  # the lineage default (SSL4MIS): --seeds N means 1337, 1338, ...
STD_DDOF = 1  # sample standard deviation over seeds (numpy.std(..., ddof=1)); n = 1 has no std
RUN_FILE = "benchmark_run.json"
GRID_KEYS = ("method", "labeled", "seed")  # the grid's axes: shown as columns, not as protocol options
# fields that change how fast a run goes but not what it computes: printed, but not a different variant
RUNTIME_KEYS = ("device", "threads", "log_every", "checkpoint_every")
# fields that name the data and its splits: part of the protocol header, not "options"
DATA_KEYS = ("data", "val_split", "test_split")


EventHandler = Callable[[dict], None]


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
    from ..config import resolve_config
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

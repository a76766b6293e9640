"""The benchmark report: results.md (the protocol header, then mean ± std over seeds per setting, per class
and per seed) and results.csv (one row per run, split and case), with the overlaid training curves."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import atomic_write
from ..errors import SemiSegError
from ..methods.reference import protocol_label
from .grid import environment
from .records import (DATA_KEYS, GRID_KEYS, RUNTIME_KEYS, STD_DDOF, EventHandler, Group, RunRecord, format_mean_std,
                      group_runs, group_stats, report_split, run_value)

METRICS = ("dice", "jaccard", "hd95", "asd")


METRIC_TITLES = {"dice": "Dice %", "jaccard": "Jaccard %", "hd95": "HD95", "asd": "ASD",
                 "hd95_mm": "HD95 mm", "asd_mm": "ASD mm"}


PERCENT = ("dice", "jaccard")


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


def uniq_text(items) -> list[str]:
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


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
            if c.get("val_from"):
                s += f" from iteration {c.get('val_from')}"
        if s not in sels:
            sels.append(s)
    protocols = uniq_text(protocol_label(c.get("protocol", "semiseg"), c.get("selection", "")) for c in cfgs)
    lines.append(f"- Protocol: {'; '.join(protocols)}")
    lines.append(f"- Checkpoint selection: {'; '.join(sels)}")
    empty_text = {"zero": "`zero`: a class with an empty prediction scores 0 on all four metrics (SS-Net/BCP)",
                  "penalty": "`penalty`: empty prediction → Dice 0, HD95 373.13 (ICL)"}
    lines.append(f"- Empty-prediction rule: {'; '.join(empty_text.get(v, v) for v in uniq('empty'))}")
    lines.append(f"- Post-processing: largest connected component per class {'/'.join('on' if v == 'True' else 'off' for v in uniq('lcc'))}")
    inf = []
    for c in cfgs:
        if c.get("dim") == 2:
            back = "logits upsampled bilinearly" if c.get("resize") == "bilinear" else "labels back with nearest"
            s = f"2D slice by slice, resized to {_fmt_val(c.get('patch_size'))} ({c.get('resize')}), {back}"
        else:
            s = f"3D sliding window {_fmt_val(c.get('patch_size'))}, stride {_fmt_val(c.get('stride') or c.get('patch_size'))}"
        if c.get("tta", "none") != "none":
            s += f", test-time augmentation {c.get('tta')}"
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
        from ..plots import plot_overlay, setting_slug
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

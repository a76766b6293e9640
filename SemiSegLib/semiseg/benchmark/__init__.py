"""Benchmarks a reviewer can trust: a grid of runs (methods x label counts x seeds), resumable, then
one table with the protocol printed above it (split, selection rule, metric conventions, every option
that differs from the recipe, hardware and versions).

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

Modules: :mod:`.grid` (the runs, resumption, training them), :mod:`.child` (one run in its own process),
:mod:`.records` (finished runs, aggregation over seeds), :mod:`.report` (results.md/.csv),
:mod:`.figures` (per-run figures, TensorBoard); :mod:`.speed` is ``semiseg bench`` (training speed, memory,
inference time; not accuracy).
"""
from .figures import export_tensorboard, make_run_figures
from .grid import RunSpec, derive_seeds, environment, parse_int_list, plan_grid, run_grid, run_name, run_state
from .records import (BASE_SEED, RUN_FILE, STD_DDOF, Group, RunRecord, collect_runs, find_runs, format_mean_std,
                      group_runs, group_stats, load_run, mean_std, run_value)
from .report import protocol_lines, results_markdown, results_rows, write_report

__all__ = ["BASE_SEED", "RUN_FILE", "STD_DDOF", "Group", "RunRecord", "RunSpec", "collect_runs", "derive_seeds",
           "environment", "export_tensorboard", "find_runs", "format_mean_std", "group_runs", "group_stats",
           "load_run", "make_run_figures", "mean_std", "parse_int_list", "plan_grid", "protocol_lines",
           "results_markdown", "results_rows", "run_grid", "run_name", "run_state", "run_value", "write_report"]

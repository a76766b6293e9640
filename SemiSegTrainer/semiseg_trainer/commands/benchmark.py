"""``semiseg benchmark`` (the grid: methods x label counts x seeds, then the tables), ``semiseg report``
(the tables of finished runs) and ``semiseg bench`` (training and inference speed)."""
from __future__ import annotations

import os
from pathlib import Path

from .. import protocol
from ..console import warner
from ..options import parse_method_sets, split_args
from ..stop import StopFlag

BENCHMARK_OWN = ("data", "labeled", "method", "seed", "method_options")  # set by the grid, not passed through


def _methods(text: str, option: str) -> list[str]:
    """A comma-separated method list; empty is an error naming the option."""
    from semiseg.errors import SemiSegError
    methods = [m for m in text.replace(" ", "").split(",") if m]
    if not methods:
        raise SemiSegError(f"{option} is empty")
    return methods


def _print_report(info: dict, reporter) -> None:
    if reporter.json:
        reporter({"event": "report", **info})
        return
    text = Path(info["results_md"]).read_text()
    start = text.find("## Results")
    end = text.find("## Per class")
    if start >= 0:
        print("\n" + text[start:end if end > start else None].rstrip())
    print(f"\n{info['runs']} runs; written: {info['results_md']}, {info['results_csv']}")
    for f in info["figures"]:
        if f.startswith("training curves overlaid"):
            print(f"figure: {f}")


def cmd_benchmark(ns, reporter) -> int:
    """Run every method at every label count with several seeds (resumable: finished runs are kept,
    interrupted ones resumed), then write OUT/results.md (protocol header + mean ± sample std over seeds) and
    OUT/results.csv. Example: semiseg benchmark --data acdc:../shared/data/ACDC --methods
    supervised,mean_teacher --labeled 3,7 --seeds 3 --out bench/acdc (add --parallel 4 on a GPU)"""
    from semiseg import benchmark
    from semiseg.config import matched_method, resolve_config
    methods = _methods(ns.methods, "--methods")
    common = split_args(ns)
    for k in BENCHMARK_OWN:
        common.pop(k, None)
    if ns.labeled:
        labeled = benchmark.parse_int_list(ns.labeled, "--labeled")
    else:
        labeled = [resolve_config({"data": ns.data, "method": matched_method(methods[0]), **common}).labeled]
    seeds = benchmark.derive_seeds(ns.seeds, ns.seed)
    specs = benchmark.plan_grid(ns.data, methods, labeled, seeds, ns.out, common,
                                parse_method_sets(ns.set, methods))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if not reporter.json:
        print(f"benchmark: {len(specs)} runs ({', '.join(methods)} x labeled {', '.join(map(str, labeled))} "
              f"x seeds {', '.join(map(str, seeds))}) in {out}")

    def forward(e: dict) -> None:
        if e.get("event") == "started":
            reporter.last_val = ""  # the console line must not show the previous run's validation Dice
        reporter(e)

    reporter.tag_runs = ns.parallel > 1  # interleaved events: each console line names its run
    benchmark.run_grid(specs, on_event=forward, should_stop=StopFlag(out), isolate=True, plots=ns.plots,
                       command=ns.command_line, parallel=ns.parallel)
    records = benchmark.collect_runs([s.dir for s in specs])
    _print_report(benchmark.write_report(records, out, plots=ns.plots, on_event=reporter), reporter)
    return protocol.EXIT_OK


def cmd_bench(ns, reporter) -> int:
    """Training iterations/s after warm-up, peak device memory, the share of time spent drawing batches, and
    inference seconds per volume, per method. Example: semiseg bench --data acdc:../shared/data/ACDC --method
    supervised,mean_teacher --iterations 10 --threads 2 --out bench.json"""
    from semiseg.benchmark.profile import format_profile_table
    from semiseg.benchmark.speed import bench_methods, format_bench_table, write_bench_json
    from semiseg.errors import SemiSegError
    methods = _methods(ns.method, "--method")
    if ns.bench_iterations < 1 or ns.warmup < 0:
        raise SemiSegError("--iterations must be at least 1 and --warmup at least 0")
    common = split_args(ns)
    for k in ("data", "method", "method_options"):
        common.pop(k, None)
    # the places the results go are made now: a wrong one is one error line before, not after, the measuring
    for option, folder in (("--out", Path(ns.out).parent if ns.out else None), ("--profile", ns.profile or None)):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise SemiSegError(f"bench {option}: cannot write into {folder}")

    def announce(method: str) -> None:
        print(f"bench {method}: {ns.warmup} warm-up + {ns.bench_iterations} measured iterations ...", flush=True)

    rows = bench_methods(common, ns.data, methods, parse_method_sets(ns.set, methods), ns.warmup,
                         ns.bench_iterations, ns.inference_volumes, ns.offset, on_warning=warner(reporter),
                         on_method=None if reporter.json else announce,
                         on_event=reporter if reporter.json else None, profile_dir=ns.profile or None,
                         on_rows=(lambda done: write_bench_json(done, ns.out, ns.command_line)) if ns.out else None)
    if not reporter.json:
        print(format_bench_table(rows))
        if ns.profile:
            print(format_profile_table(rows))
    if ns.out and not reporter.json:  # written after each method (on_rows)
        print(f"written: {ns.out}")
    return protocol.EXIT_OK


def cmd_report(ns, reporter) -> int:
    from semiseg import benchmark
    records = benchmark.collect_runs(ns.runs)
    if ns.plots:
        for r in records:  # figures a run does not have yet (e.g. trained with `semiseg train`)
            if not (r.dir / "curves.png").is_file() or not (r.dir / "qualitative.png").is_file():
                benchmark.make_run_figures(r.dir, reporter, qualitative=not (r.dir / "qualitative.png").is_file())
    _print_report(benchmark.write_report(records, ns.out, plots=ns.plots, on_event=reporter), reporter)
    return protocol.EXIT_OK

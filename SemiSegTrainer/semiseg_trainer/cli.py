"""``semiseg``: train, segment, suggest, evaluate, demo, and run a Slicer job.

Every error caused by input ends with one line ``semiseg: error: ...`` and exit code 2; a cancelled
run (Ctrl-C, SIGTERM, CANCEL file) writes its checkpoint and exits with code 3.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from semiseg.fields import parse_text
from semiseg.planning import PLAN_INPUT_FIELDS

from . import protocol
from .console import Reporter
from .options import add_config_options, add_train_options, describe_presets, split_args


class StopFlag:
    """Set by SIGINT/SIGTERM or by a CANCEL file in the job folder; polled by the loop between steps."""

    def __init__(self, cancel_dir: Path | None = None):
        self.stopped = False
        self.cancel_dir = cancel_dir
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, *_):
        if self.stopped:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stopped = True

    def __call__(self) -> bool:
        return self.stopped or (self.cancel_dir is not None and protocol.cancel_requested(self.cancel_dir))


# ------------------------------------------------------------------------------------------ train
def _pre_method(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--config", default=None)
    ns, _ = pre.parse_known_args(argv)
    if ns.method:
        return ns.method
    if ns.config:
        from semiseg.config import load_config_file
        return load_config_file(ns.config).get("method", "mean_teacher")
    return "mean_teacher"


def build_train_config(ns: argparse.Namespace):
    from semiseg.config import load_config_file, resolve_config
    file_values = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    return resolve_config(split_args(ns), file_values)


def _warner(reporter):
    """One ``semiseg: warning: ...`` line on stderr per data warning (and a log event for JSON readers)."""
    def warn(message: str) -> None:
        print(f"semiseg: warning: {message}", file=sys.stderr, flush=True)
        if reporter.json:
            reporter({"event": "log", "level": "warning", "message": message})
    return warn


def _report_plan(reporter, plan, path=None) -> None:
    if reporter.json:
        reporter({"event": "plan", "plan": plan.to_dict(), "text": plan.describe(), "path": str(path or "")})
    else:
        print(plan.describe() + (f"\n  written         {path}" if path else ""), flush=True)


def _report_recipe(reporter, text: str) -> None:
    if reporter.json:
        reporter({"event": "log", "level": "info", "message": text})
    else:
        print(text, flush=True)


def cmd_train(ns, reporter) -> int:
    from semiseg.config import load_config_file
    from semiseg.run import prepare_run
    from semiseg.train.loop import Trainer
    out = Path(ns.out)
    file_values = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    # users' own scans are planned (OUT/plan.json); benchmark datasets keep their recipes (plan=auto)
    # under torchrun only rank 0 writes OUT/plan.json and reports (the plan is deterministic on every rank)
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    cfg, data, _ = prepare_run(split_args(ns), file_values, out, resume=ns.resume, baseline=ns.baseline,
                               write_plan=rank0, on_warning=_warner(reporter) if rank0 else None,
                               on_plan=(lambda p: _report_plan(reporter, p, out / "plan.json")) if rank0 else None,
                               on_recipe=(lambda text: _report_recipe(reporter, text)) if rank0 else None)
    stop = StopFlag(out)
    summary = Trainer(cfg, out, data=data, on_event=reporter, should_stop=stop).run(resume=ns.resume)
    if not reporter.json and rank0:
        print_summary(summary)
    return protocol.EXIT_OK


def print_summary(summary: dict) -> None:
    print(f"\n{summary['method']}: {summary['iterations']} iterations in {summary['wall_time_s']:.0f} s "
          f"({summary['it_per_s']:.2f} it/s), peak memory {summary['peak_memory_mb']:.0f} MB; "
          f"checkpoint selected: {summary['selection']} (iteration {summary['selected_iteration']}); "
          f"{summary.get('protocol', '')}")
    for split in ("val", "test"):
        if split in summary:
            print(f"\n{split} ({summary[split]['cases']} cases):")
            print(format_table(summary[split]))


def format_table(s: dict) -> str:
    metrics = list(next(iter(s["per_class"].values())))
    head = f"{'class':<22}" + "".join(f"{m:>10}" for m in metrics)
    rows = [head, "-" * len(head)]
    scale = lambda m, v: 100 * v if m in ("dice", "jaccard") else v  # noqa: E731
    for name, vals in list(s["per_class"].items()) + [("mean", s["mean"])]:
        rows.append(f"{name:<22}" + "".join(f"{scale(m, vals[m]):>10.2f}" for m in metrics))
    rows.append("(Dice, Jaccard in %; hd95/asd in voxels, *_mm in mm; asd is one-directional as medpy)")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ plan
def cmd_plan(ns, reporter) -> int:
    """Fingerprint a dataset, print its plan in one block and write it as JSON (optionally preprocess)."""
    from semiseg.data.datasets import check_images, load_dataset
    from semiseg.planning import fingerprint_splits, make_plan, plan_overrides, preprocess_all
    given = {k: v for k, v in split_args(ns).items() if v not in (0, "", "auto", ())}
    data = load_dataset(ns.data, given.get("labeled"), None, None, given.get("dim"), class_map=given.get("class_map", ""))
    check_images(data)
    for w in data.warnings:
        _warner(reporter)(w)
    fp = fingerprint_splits(data, ns.data)
    plan = make_plan(fp, given.get("device", "auto"), given.get("memory_budget_gb", 0.0), plan_overrides(given))
    out = Path(ns.out)
    plan.save(out)
    _report_plan(reporter, plan, out)
    if ns.preprocess:
        for run in ("first", "second"):
            r = preprocess_all(data, plan, given.get("cache_dir") or None)
            msg = (f"preprocessing ({run} run): {r['cases']} cases in {r['seconds']:.2f} s, {r['misses']} computed, "
                   f"{r['hits']} read from the cache; cache {r['cache_bytes'] / 2**20:.1f} MiB in {r['cache_dir']}")
            reporter({"event": "preprocessed", "run": run, **r}) if reporter.json else print(msg)
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ segment
def cmd_segment(ns, reporter) -> int:
    from semiseg.predict import Segmenter, expand_inputs
    from semiseg.train.loop import select_device
    from semiseg.predict import write_uncertainty_csv
    seg = Segmenter(ns.model, select_device(ns.device), lcc=ns.lcc, stride=tuple(ns.stride) if ns.stride else None)
    files = expand_inputs(ns.input)
    stop = StopFlag()
    results = []
    for i, f in enumerate(files):
        if stop():
            reporter({"event": "finished", "status": "cancelled", "done": i})
            return protocol.EXIT_CANCELLED
        r = seg.segment_file(f, ns.out, uncertainty=ns.uncertainty)
        results.append(r)
        reporter({"event": "predicted", "index": i + 1, "total": len(files), **r})
    if ns.uncertainty:
        write_uncertainty_csv(Path(ns.out) / "uncertainty.csv", results)
    reporter({"event": "finished", "status": "completed", "outputs": str(ns.out)})
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ suggest
def cmd_suggest(ns, reporter) -> int:
    import json
    from semiseg.suggest import format_ranking, suggest_files
    from semiseg.train.loop import select_device
    ranking = suggest_files(ns.model, ns.input, ns.n, ns.strategy, ns.seed, ns.diversity, select_device(ns.device))
    if reporter.json:
        print(json.dumps({"strategy": ns.strategy, "ranking": ranking}), flush=True)
    else:
        print(format_ranking(ranking, ns.strategy))
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ loop-sim
LOOP_SIM_OWN = ("data", "labeled", "iterations", "seed", "init_from", "finetune_fraction")


def cmd_loop_sim(ns, reporter) -> int:
    from semiseg.loop_sim import format_table, simulate
    from semiseg.atomic import atomic_write
    import json
    common = {k: v for k, v in split_args(ns).items() if k not in LOOP_SIM_OWN}
    strategies = [s for s in ns.strategies.replace(" ", "").split(",") if s]
    out = Path(ns.out)
    results: dict[str, list] = {s: [] for s in strategies}
    forward = reporter if reporter.json else None
    for i in range(ns.seeds):
        seed = ns.seed + i
        initial = None
        for s in strategies:
            d = out / s / f"seed{seed}"
            rows = simulate(ns.data, s, seed, ns.rounds, ns.per_round, ns.iterations, ns.finetune_iterations, d,
                            common, scratch=(ns.scratch and initial is None) or ns.scratch_all, initial=initial,
                            on_event=forward)
            initial = initial or d / "round0"  # the strategies of a seed share its round-0 model
            results[s].append(rows)
            if not reporter.json:
                print(f"{s} seed {seed}: " + ", ".join(f"round {r['round']} ({r['labeled']} labeled) "
                                                      f"{100 * r['dice_warm']:.2f}" for r in rows), flush=True)
    atomic_write(out / "loop_sim.json", json.dumps(results, indent=2))
    table = format_table(results)
    atomic_write(out / "loop_sim.md", table + "\n")
    if reporter.json:
        reporter({"event": "loop_sim", "results": results, "path": str(out / "loop_sim.json")})
    else:
        print(table)
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ evaluate
def cmd_evaluate(ns, reporter) -> int:
    from semiseg.checkpoint import load_checkpoint, network_from_checkpoint
    from semiseg.data.datasets import load_dataset
    from semiseg.errors import SemiSegError
    from semiseg.evaluation import evaluate_cases, summarize, write_evaluation
    from semiseg.train.loop import select_device
    device = select_device(ns.device)
    ckpt = load_checkpoint(ns.model)
    net = network_from_checkpoint(ckpt, device)
    meta = ckpt["meta"]
    # the class matching the model was trained with (its --class-map) applies to the evaluated files too
    data = load_dataset(ns.data, ns.labeled or None, ns.val_split, ns.test_split, meta["dim"],
                        class_map=ckpt.get("config", {}).get("class_map", ""))
    refs = {"val": data.val, "test": data.test}[ns.split]
    if not refs:
        raise SemiSegError(f"{ns.data} has no '{ns.split}' cases (give --{ns.split}-split PATH)")
    res = evaluate_cases(net, refs, meta, full=True, empty=ns.empty, lcc=ns.lcc, half=device.type == "cuda")
    s = summarize(res)
    s.update(model=ckpt["path"], data=ns.data, split=ns.split, empty=ns.empty,
             lcc=bool(ns.lcc if ns.lcc is not None else meta.get("lcc")))
    out = Path(ns.out) if ns.out else Path(ckpt["path"]).parent
    write_evaluation(out, f"evaluate_{ns.split}", s, res)
    if reporter.json:
        reporter({"event": "evaluated", **s})
    else:
        print(f"{ns.split}: {s['cases']} cases, empty-prediction convention '{ns.empty}', largest component {'on' if s['lcc'] else 'off'}")
        print(format_table(s))
        print(f"written: {out / f'evaluate_{ns.split}.json'}, {out / f'evaluate_{ns.split}.csv'}")
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ demo
def cmd_demo(ns, reporter) -> int:
    from semiseg.data.classes import read_label
    from semiseg.data.io import write_volume
    from semiseg.data.segfile import write_segmentation
    from semiseg.metrics import dice_per_class_fast
    from semiseg.predict import Segmenter
    from semiseg.run import prepare_run
    from semiseg.train.loop import Trainer, select_device

    out = Path(ns.out)
    explicit = {"data": "phantom", "method": ns.method, "device": ns.device}
    if ns.iterations:
        explicit["iterations"] = ns.iterations
    cfg, data, _ = prepare_run(explicit, out_dir=out / "run", resume=ns.resume, on_warning=_warner(reporter))
    print(f"SemiSeg demo: {cfg.method} on the built-in phantom ({data.summary()}), {cfg.iterations} iterations")
    summary = Trainer(cfg, out / "run", data=data, on_event=reporter, should_stop=StopFlag(out / "run")).run(resume=ns.resume)
    # held-out phantom volumes written as files, segmented through the same path a user's scans take
    test_dir, pred_dir = out / "test_images", out / "predictions"
    test_dir.mkdir(parents=True, exist_ok=True)
    seg = Segmenter(out / "run" / "best.pt", select_device(ns.device))
    values = [c.value for c in data.classes]
    per_case = []
    for ref in data.test:
        img, lab = ref.image(), ref.label()
        write_volume(test_dir / f"{ref.name}.nrrd", img)
        write_segmentation(test_dir / f"{ref.name}_truth.seg.nrrd", lab.array, lab.geometry, data.classes)
        r = seg.segment_file(test_dir / f"{ref.name}.nrrd", pred_dir)
        reporter({"event": "predicted", **r})
        pred, _ = read_label(r["segmentation"], data.classes)
        per_case.append(dice_per_class_fast(pred.array, lab.array, values))
    print(f"\nHeld-out phantom volumes ({len(per_case)}), Dice % per class:")
    for c in data.classes:
        print(f"  {c.name:<18} {100 * sum(d[c.value] for d in per_case) / len(per_case):6.2f}")
    mean = sum(sum(d.values()) / len(d) for d in per_case) / len(per_case)
    print(f"  {'mean':<18} {100 * mean:6.2f}")
    print(f"\nModel: {out / 'run' / 'best.pt'}\nSegmentations (.seg.nrrd, open in 3D Slicer): {pred_dir}")
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ job
def cmd_run(ns, reporter) -> int:
    """Run a job folder written by the Slicer module (see :mod:`semiseg_trainer.protocol` for job.json).

    Every event goes to stdout and is appended to ``events.jsonl``. Whatever goes wrong ends in exactly
    one ``error`` event ({message: one actionable line, details}) and exit code 2; a cancel (CANCEL file,
    SIGTERM) checkpoints and exits with 3; the job folder is always kept.
    """
    import time
    import traceback
    job = Path(ns.job)
    job.mkdir(parents=True, exist_ok=True)
    events = open(job / protocol.EVENTS_FILE, "a")

    def tee(e):
        e = {"time": round(time.time(), 3), **e} if "time" not in e else e
        events.write(protocol.encode(e) + "\n")
        events.flush()
        reporter(e)

    def fail(message: str, details: str = "") -> int:
        tee({"event": "error", "message": message, "details": details, "job": str(job)})
        print(f"semiseg: error: {message}", file=sys.stderr)
        return protocol.EXIT_ERROR

    from semiseg.errors import CancelledError, SemiSegError
    spec_path = job / protocol.JOB_FILE
    try:
        if not spec_path.is_file():
            raise SemiSegError(f"no {protocol.JOB_FILE} in job folder {job}")
        try:
            spec = protocol.read_job(job)
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise SemiSegError(f"cannot read {spec_path}: {e}") from None
        task = spec.get("task", "train")
        if task == "train":
            from semiseg.config import resolve_config
            from semiseg.data.datasets import load_case_list
            from semiseg.run import prepare_run
            from semiseg.train.loop import Trainer
            explicit, resume = spec.get("config", {}), bool(spec.get("resume"))
            data = None
            if spec.get("dataset"):  # the job's case list and fixed class table (no class inference from files)
                ds = spec["dataset"]
                data = load_case_list(ds.get("cases", []), ds.get("classes", []), job, resolve_config(explicit).dim,
                                      spec_path)

            pending: list[dict] = []

            def on_plan(plan):  # the panel's log shows the plan; plan.json sits in the run folder
                pending.append({"event": "plan", "plan": plan.to_dict(), "path": str(job / "run" / "plan.json")})
                pending.append({"event": "log", "level": "info", "message": plan.describe()})

            def on_event(e):  # "started" stays the job's first event; the plan follows it
                tee(e)
                if e.get("event") == "started":
                    for p in pending:
                        tee(p)
                    pending.clear()

            cfg, data, _ = prepare_run(explicit, None, job / "run", resume=resume, data=data, on_plan=on_plan,
                                       on_recipe=lambda text: pending.append({"event": "log", "level": "info",
                                                                              "message": text}),
                                       on_warning=lambda m: tee({"event": "log", "level": "warning", "message": m}))
            Trainer(cfg, job / "run", data=data, on_event=on_event,
                    should_stop=StopFlag(job)).run(resume=resume)
            return protocol.EXIT_OK
        if task == "segment":
            import torch
            from semiseg.predict import Segmenter
            from semiseg.train.loop import select_device
            inputs = [job / p for p in spec.get("inputs", [])]
            if not inputs:
                raise SemiSegError(f"{spec_path}: no input volume to segment")
            model = Path(spec.get("model", ""))
            model = model if model.is_absolute() else job / model
            out = job / spec.get("outputs", "predictions")
            from semiseg.predict import write_uncertainty_csv
            seg = Segmenter(model, select_device(spec.get("device", "auto")), lcc=spec.get("lcc"))
            uncertainty = bool(spec.get("uncertainty"))
            stop = StopFlag(job)
            tee({"event": "started", "task": "segment", "total": len(inputs), "model": str(model), "device": str(seg.device)})
            results = []
            for i, f in enumerate(inputs):
                if stop():
                    tee({"event": "finished", "status": "cancelled", "task": "segment", "done": i})
                    return protocol.EXIT_CANCELLED
                try:
                    result = seg.segment_file(f, out, uncertainty=uncertainty)
                except torch.OutOfMemoryError:
                    raise SemiSegError(f"out of GPU memory while segmenting {f.name}: choose the CPU or a smaller "
                                       f"stride/patch model") from None
                results.append(result)
                tee({"event": "predicted", "index": i + 1, "total": len(inputs), **result})
            if uncertainty:
                write_uncertainty_csv(out / "uncertainty.csv", results)
            tee({"event": "finished", "status": "completed", "task": "segment", "outputs": str(out)})
            return protocol.EXIT_OK
        if task == "suggest":
            from semiseg.active import DEFAULT_DIVERSITY
            from semiseg.suggest import suggest_files
            from semiseg.train.loop import select_device
            inputs = [str(job / p) for p in spec.get("inputs", [])]
            if not inputs:
                raise SemiSegError(f"{spec_path}: no input volume to rank")
            model = Path(spec.get("model", ""))
            model = model if model.is_absolute() else job / model
            strategy = spec.get("strategy", "entropy")
            tee({"event": "started", "task": "suggest", "total": len(inputs), "model": str(model), "strategy": strategy})
            ranking = suggest_files(model, inputs, int(spec.get("n", 1)), strategy, int(spec.get("seed", 0)),
                                    float(spec.get("diversity", DEFAULT_DIVERSITY)),
                                    select_device(spec.get("device", "auto")))
            tee({"event": "suggested", "strategy": strategy, "ranking": ranking})
            tee({"event": "finished", "status": "completed", "task": "suggest"})
            return protocol.EXIT_OK
        raise SemiSegError(f"{spec_path}: unknown task '{task}' (train, segment or suggest)")
    except CancelledError as e:
        print(f"semiseg: {e}", file=sys.stderr)
        return protocol.EXIT_CANCELLED
    except SemiSegError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        tee({"event": "finished", "status": "cancelled"})
        return protocol.EXIT_CANCELLED
    except ModuleNotFoundError as e:
        return fail(f"a Python package the trainer needs is missing: {e.name} (install SemiSeg's requirements)",
                    traceback.format_exc())
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen environment problem: still one event
        from semiseg.errors import device_error
        known = device_error(e)
        if known is not None:
            return fail(str(known), traceback.format_exc())
        return fail(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                    f"(details in {job / protocol.EVENTS_FILE})", traceback.format_exc())
    finally:
        events.close()


# ------------------------------------------------------------------------------------------ benchmark, report
BENCHMARK_OWN = ("data", "labeled", "method", "seed", "method_options")  # set by the grid, not passed through


def add_benchmark_train_options(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field the grid does not set itself, passed through to each run."""
    add_config_options(parser, "options passed to every run (defaults from the preset; see `semiseg presets`)",
                       skip=BENCHMARK_OWN)


def parse_method_sets(items: list[str], methods: list[str]) -> dict[str, dict]:
    """``--set METHOD.OPTION=VALUE`` (one method) or ``--set OPTION=VALUE`` (every listed method that has it)."""
    import dataclasses
    from semiseg.config import matched_method
    from semiseg.errors import SemiSegError
    from semiseg.methods import get_method
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SemiSegError(f"--set {item}: expected [METHOD.]OPTION=VALUE")
        target, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        targets = [target] if target else methods
        if target and target not in methods:
            raise SemiSegError(f"--set {item}: method '{target}' is not in --methods ({', '.join(methods)})")
        hit = False
        for m in targets:  # supervised@X takes X's options (its baseline is derived from X's run)
            fields = {f.name: f for f in dataclasses.fields(get_method(matched_method(m)).Options)}
            if name not in fields:
                if target:
                    raise SemiSegError(f"--set {item}: method '{m}' has no option '{name}' "
                                       f"(options: {', '.join(fields) or 'none'})")
                continue
            try:
                out.setdefault(m, {})[name] = parse_text(fields[name], value)
            except ValueError as e:
                raise SemiSegError(f"--set {item}: {e}") from None
            hit = True
        if not hit:
            raise SemiSegError(f"--set {item}: none of {', '.join(methods)} has an option '{name}'")
    return out


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
    import shlex
    from semiseg import benchmark
    from semiseg.config import matched_method, resolve_config
    from semiseg.errors import SemiSegError
    methods = [m for m in ns.methods.replace(" ", "").split(",") if m]
    if not methods:
        raise SemiSegError("--methods is empty")
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
    command = "semiseg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    def forward(e: dict) -> None:
        if e.get("event") == "started":
            reporter.last_val = ""  # the console line must not show the previous run's validation Dice
        reporter(e)

    benchmark.run_grid(specs, on_event=forward, should_stop=StopFlag(out), isolate=True, plots=ns.plots,
                       command=command)
    records = benchmark.collect_runs([s.dir for s in specs])
    _print_report(benchmark.write_report(records, out, plots=ns.plots, on_event=reporter), reporter)
    return protocol.EXIT_OK


_ARGV: list[str] = []


def cmd_bench(ns, reporter) -> int:
    import shlex
    from semiseg.benchmark.speed import bench_method, format_bench_table, write_bench_json
    from semiseg.config import resolve_config
    from semiseg.errors import SemiSegError
    from semiseg.run import load_run_data, prepare_run
    methods = [m for m in ns.method.replace(" ", "").split(",") if m]
    if not methods:
        raise SemiSegError("--method is empty")
    if ns.bench_iterations < 1 or ns.warmup < 0:
        raise SemiSegError("--iterations must be at least 1 and --warmup at least 0")
    common = split_args(ns)
    for k in ("data", "method", "method_options"):
        common.pop(k, None)
    sets = parse_method_sets(ns.set, methods)
    rows, raw = [], None
    for m in methods:
        explicit = {**common, "data": ns.data, "method": m, **({"method_options": sets[m]} if m in sets else {})}
        if raw is None:  # the same cases for every method: loaded once
            raw = load_run_data(resolve_config(explicit), explicit.get("dim") or None)
        # users' folders are planned as `semiseg train` plans them (no plan.json written)
        cfg, data, _ = prepare_run(explicit, data=raw, on_warning=_warner(reporter))
        if not reporter.json:
            print(f"bench {m}: {ns.warmup} warm-up + {ns.bench_iterations} measured iterations ...", flush=True)
        rows.append(bench_method(cfg, ns.warmup, ns.bench_iterations, ns.inference_volumes, ns.offset, data=data,
                                 on_event=reporter if reporter.json else None))
    if not reporter.json:
        print(format_bench_table(rows))
    if ns.out:
        write_bench_json(rows, ns.out, "semiseg " + " ".join(shlex.quote(a) for a in (_ARGV or sys.argv[1:])))
        if not reporter.json:
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


# ------------------------------------------------------------------------------------------ main
def build_parser(method: str) -> argparse.ArgumentParser:
    from semiseg.active import DEFAULT_DIVERSITY, STRATEGIES
    p = argparse.ArgumentParser(prog="semiseg", description="SemiSeg: semi-supervised medical image segmentation.")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=None,
                   help="progress as JSON lines (default: when stdout is not a terminal)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a segmentation model. Example: semiseg train --data acdc:../shared/data/ACDC "
                                   "--labeled 7 --method mean_teacher --iterations 1000 --out runs/mt")
    t.add_argument("--out", required=True, help="run folder (config.json, best.pt, last.pt, progress.jsonl, metrics.json)")
    t.add_argument("--config", help="YAML or JSON file of options (command-line options win)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--baseline", action="store_true",
                   help="train the method's matched supervised baseline instead: the same network, inference "
                        "resize, schedule, budget and supervised loss, no unlabeled term (the fair comparison)")
    add_train_options(t, method)

    s = sub.add_parser("segment", help="segment image files with a trained model")
    s.add_argument("--model", required=True, help="checkpoint file or run folder (uses best.pt)")
    s.add_argument("--input", nargs="+", required=True, help="image files (NRRD, NIfTI, MHA) or folders")
    s.add_argument("--out", required=True, help="output folder: NAME.label.nrrd and NAME.seg.nrrd per input")
    s.add_argument("--device", default="auto")
    s.add_argument("--largest-component", "--lcc", dest="lcc", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the largest connected component per class (default: as trained; --lcc is an alias)")
    s.add_argument("--stride", nargs=3, type=int, help="3D sliding-window stride (default: as trained)")
    s.add_argument("--uncertainty", action="store_true",
                   help="also NAME.uncertainty.nrrd (float32 normalised entropy of the softmax, 0..1, on the input's "
                        "grid), a per-volume score in the events and OUT/uncertainty.csv")

    sg = sub.add_parser("suggest", help="rank unlabeled volumes: which to label next",
                        description="Rank unlabeled volumes by the model's uncertainty (the score is the mean voxel "
                                    "uncertainty over the predicted structures, dilated by one voxel, and every voxel "
                                    "at least 0.5 uncertain) and pick N of them, passing over near-duplicates of "
                                    "earlier picks. Example: semiseg suggest --model runs/v1 --input pool/ --n 3")
    sg.add_argument("--model", required=True, help="checkpoint file or run folder (uses best.pt)")
    sg.add_argument("--input", nargs="+", required=True, help="unlabeled image files or folders (the pool)")
    sg.add_argument("--n", type=int, default=1, help="volumes to pick")
    sg.add_argument("--strategy", default="entropy", choices=list(STRATEGIES),
                    help="entropy (of the softmax), margin (1 - gap of the top two classes), teacher-disagreement "
                         "(student vs EMA teacher; methods with a teacher), random (for comparison)")
    sg.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    sg.add_argument("--diversity", type=float, default=DEFAULT_DIVERSITY,
                    help="pass over a candidate whose thumbnail's cosine similarity to a picked one exceeds "
                         "1 - DIVERSITY (0 = off)")
    sg.add_argument("--device", default="auto")

    ls = sub.add_parser("loop-sim", help="simulate the label-correct-retrain loop on a labeled dataset",
                        description="Start from 1 labeled training volume; each round suggest PER_ROUND volumes, "
                                    "reveal their ground truth, warm-start a new version (and, for comparison, "
                                    "train from scratch for the same total iterations); validation Dice per round, "
                                    "per strategy, over seeds. Example: semiseg loop-sim --data phantom:10 "
                                    "--strategies entropy,random --seeds 3 --rounds 3 --out sim/")
    ls.add_argument("--data", required=True, help="a fully labeled dataset: phantom[:N], phantom_ct[:N], a folder")
    ls.add_argument("--strategies", default="entropy,random", help="comma-separated suggestion strategies")
    ls.add_argument("--seeds", type=int, default=3, help="seeds SEED ... SEED+N-1")
    ls.add_argument("--seed", type=int, default=1337)
    ls.add_argument("--rounds", type=int, default=3)
    ls.add_argument("--per-round", type=int, default=1, help="volumes revealed per round")
    ls.add_argument("--iterations", type=int, default=200, help="round-0 training iterations")
    ls.add_argument("--finetune-iterations", type=int, default=100, help="iterations of each warm-started round")
    ls.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=True,
                    help="also train from scratch at equal total iterations (first strategy of each seed)")
    ls.add_argument("--scratch-all", action="store_true", help="the scratch arm for every strategy")
    ls.add_argument("--out", required=True)
    add_config_options(ls, "training options of every run (defaults from the preset)", skip=LOOP_SIM_OWN)

    e = sub.add_parser("evaluate", help="evaluate a model on a dataset split")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=["val", "test"], default="val")
    e.add_argument("--labeled", type=int, default=0)
    e.add_argument("--val-split", default=None)
    e.add_argument("--test-split", default=None)
    e.add_argument("--empty", choices=["zero", "penalty"], default="zero", help="empty-prediction convention")
    e.add_argument("--largest-component", "--lcc", dest="lcc", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the largest connected component per class (default: as trained; --lcc is an alias)")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="folder for evaluate_SPLIT.json/.csv (default: the model's folder)")

    d = sub.add_parser("demo", help="train + segment on the built-in phantom (no download)")
    d.add_argument("--out", default="semiseg-demo")
    d.add_argument("--method", default="mean_teacher")
    d.add_argument("--iterations", type=int, default=0, help="default: the phantom preset's")
    d.add_argument("--device", default="auto")
    d.add_argument("--resume", action="store_true")

    pl = sub.add_parser("plan", help="print and write the preprocessing/training plan of a dataset",
                        description="Fingerprint a dataset (spacings, sizes, labeled-foreground intensities) and "
                                    "decide target spacing, 2D/3D, patch and batch for a memory budget, and "
                                    "intensity normalisation. Example: semiseg plan my_scans/ --out plan.json")
    pl.add_argument("data", help="dataset: a folder or CSV of your scans, or acdc:PATH, la:PATH, phantom[:N]")
    pl.add_argument("--out", default="plan.json", help="plan JSON to write (train with --plan PATH to use it)")
    add_config_options(pl, "plan options (the same as train's; what is given overrides the plan)",
                       only=PLAN_INPUT_FIELDS)
    pl.add_argument("--preprocess", action="store_true", help="also preprocess every case twice (timing, cache size)")
    mth = sub.add_parser("methods", help="list the methods and their hyper-parameters")
    mth.add_argument("--deviations", action="store_true",
                     help="instead: every known difference of each method from its reference (paper and code), "
                          "with its reason and the option that restores the reference")
    sub.add_parser("devices", help="torch/CUDA versions, GPUs and their memory, Apple MPS, the CPU "
                                   "(--json: one JSON object)")
    sub.add_parser("catalog", help="the Slicer panel's catalog as JSON: methods, options, recipes, devices")
    sub.add_parser("presets", help="list the dataset recipes")
    r = sub.add_parser("run", help="run a job folder (the Slicer module's protocol)")
    r.add_argument("--job", required=True)

    b = sub.add_parser("benchmark", help="train a grid of methods x label counts x seeds and tabulate it",
                       description="Run every method at every label count with several seeds (resumable: "
                                   "finished runs are kept, interrupted ones resumed), then write OUT/results.md "
                                   "(protocol header + mean ± sample std over seeds) and OUT/results.csv. Example: "
                                   "semiseg benchmark --data acdc:../shared/data/ACDC --methods supervised,mean_teacher "
                                   "--labeled 3,7 --seeds 3 --out bench/acdc")
    b.add_argument("--data", required=True, help="dataset: acdc:PATH, la:PATH, phantom[:N], a folder or a CSV")
    b.add_argument("--methods", required=True, help="comma-separated methods (see `semiseg methods`); "
                                                    "supervised@METHOD = METHOD's matched supervised baseline "
                                                    "(same network, resize, schedule, supervised loss)")
    b.add_argument("--labeled", default="", help="comma-separated label counts (default: the preset's)")
    b.add_argument("--seeds", default="3", help="number of seeds N (seeds SEED, SEED+1, ..., SEED+N-1) or a "
                                                "comma-separated list of seeds")
    b.add_argument("--seed", type=int, default=1337, help="first seed when --seeds is a count (lineage default 1337)")
    b.add_argument("--set", action="append", default=[], metavar="[METHOD.]OPTION=VALUE",
                   help="a method hyper-parameter for one method, or for every listed method that has it (repeatable)")
    b.add_argument("--out", required=True, help="benchmark folder (runs/, results.md, results.csv, figures)")
    b.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="training curves and a qualitative figure per run, curves overlaid per setting")
    add_benchmark_train_options(b)

    bn = sub.add_parser("bench", help="measure training speed, peak memory, data-loading share and inference time",
                        description="Training iterations/s after warm-up, peak device memory, the share of time spent "
                                    "drawing batches, and inference seconds per volume, per method. Example: semiseg "
                                    "bench --data acdc:../shared/data/ACDC --method supervised,mean_teacher "
                                    "--iterations 10 --threads 2 --out bench.json")
    bn.add_argument("--data", required=True, help="dataset: acdc:PATH, la:PATH, phantom[:N], a folder or a CSV")
    bn.add_argument("--method", required=True, help="comma-separated methods (see `semiseg methods`)")
    bn.add_argument("--iterations", dest="bench_iterations", type=int, default=10,
                    help="measured training iterations (after the warm-up)")
    bn.add_argument("--warmup", type=int, default=3, help="untimed iterations first (allocator, autotuning, compile)")
    bn.add_argument("--offset", type=int, default=None,
                    help="iteration number the steps run at (default: the middle of the schedule, so delayed "
                         "and ramped loss terms are active)")
    bn.add_argument("--inference-volumes", type=int, default=2, help="validation volumes timed for inference (0 = skip)")
    bn.add_argument("--set", action="append", default=[], metavar="[METHOD.]OPTION=VALUE",
                    help="a method hyper-parameter (repeatable)")
    bn.add_argument("--out", default="", help="write the results as JSON to this file")
    add_config_options(bn, "training options (defaults from the preset; see `semiseg presets`)",
                       skip=("data", "method", "iterations", "method_options"))

    rp = sub.add_parser("report", help="rebuild the benchmark tables from finished runs (no training)")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders searched for them")
    rp.add_argument("--out", default=".", help="folder for results.md, results.csv and the overlaid curves")
    rp.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                    help="also draw the figures runs do not have yet, and the overlaid curves")
    return p


def cmd_describe(ns) -> int:
    """``semiseg devices`` (one line, or JSON with --json) and ``semiseg catalog`` (JSON for the panel)."""
    import json
    from semiseg import devices
    if ns.command == "catalog":
        from semiseg_trainer import panel_catalog
        print(json.dumps(panel_catalog.build()))
    elif ns.json:
        print(json.dumps(devices.describe()))
    else:
        print(devices.summary(devices.describe()))
    return protocol.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from semiseg.errors import CancelledError, SemiSegError
    from semiseg.methods import METHODS
    try:
        method = _pre_method(argv)
    except SemiSegError as e:
        print(f"semiseg: error: {e}", file=sys.stderr)
        return protocol.EXIT_ERROR
    if next((a for a in argv if not a.startswith("-")), "") == "bench":
        method = "mean_teacher"  # bench takes a comma-separated --method list (checked by resolve_config)
    if method not in METHODS:
        print(f"semiseg: error: unknown method '{method}'; available: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return protocol.EXIT_ERROR
    ns = build_parser(method).parse_args(argv)
    _ARGV[:] = argv  # the command line as given (recorded by `semiseg bench --out`)
    reporter = Reporter(ns.json)
    if ns.command == "methods" and ns.deviations:
        from semiseg.methods.reference import table_lines
        print("\n".join(table_lines(sorted(METHODS))))
        return protocol.EXIT_OK
    if ns.command == "methods":
        import dataclasses
        for name, cls in sorted(METHODS.items()):
            print(f"{name}: {cls.description}")
            for f in dataclasses.fields(cls.Options):
                print(f"    --{f.name.replace('_', '-')} (default {f.default}): {f.metadata.get('help', '')}")
        return protocol.EXIT_OK
    if ns.command == "presets":
        print(describe_presets())
        return protocol.EXIT_OK
    if ns.command in ("devices", "catalog"):
        return cmd_describe(ns)
    handler = {"plan": cmd_plan, "train": cmd_train, "segment": cmd_segment, "suggest": cmd_suggest,
               "loop-sim": cmd_loop_sim, "evaluate": cmd_evaluate, "demo": cmd_demo, "run": cmd_run,
               "benchmark": cmd_benchmark, "report": cmd_report,
               "bench": cmd_bench}
    try:
        return handler[ns.command](ns, reporter)
    except CancelledError as e:
        print(f"semiseg: {e}", file=sys.stderr)
        return protocol.EXIT_CANCELLED
    except (SemiSegError, NotImplementedError) as e:
        from semiseg.errors import device_error
        if not isinstance(e, SemiSegError):
            e = device_error(e) or e
            if not isinstance(e, SemiSegError):
                raise
        if reporter.json:
            reporter({"event": "error", "message": str(e)})
        print(f"semiseg: error: {e}", file=sys.stderr)
        return protocol.EXIT_ERROR
    except KeyboardInterrupt:
        print("semiseg: interrupted", file=sys.stderr)
        return protocol.EXIT_CANCELLED

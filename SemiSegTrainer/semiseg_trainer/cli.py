"""``semiseg``: train, segment, suggest, evaluate, demo, and run a Slicer job.

This module builds the parser and dispatches; the commands' bodies are in :mod:`semiseg_trainer.commands`.
Every error caused by input ends with one line ``semiseg: error: ...`` and exit code 2; a cancelled
run (Ctrl-C, SIGTERM, CANCEL file) writes its checkpoint and exits with code 3.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from semiseg.planning import PLAN_INPUT_FIELDS

from . import protocol
from .commands import benchmark, demo, description, info, job, loop_sim, segment, train
from .console import Reporter
# build_train_config and parse_method_sets: callers import them from here too
from .options import add_config_options, add_train_options, build_train_config, parse_method_sets  # noqa: F401

HANDLERS = {"train": train.cmd_train, "plan": train.cmd_plan, "segment": segment.cmd_segment,
            "suggest": segment.cmd_suggest, "evaluate": segment.cmd_evaluate, "loop-sim": loop_sim.cmd_loop_sim,
            "demo": demo.cmd_demo, "run": job.cmd_run, "benchmark": benchmark.cmd_benchmark,
            "bench": benchmark.cmd_bench, "report": benchmark.cmd_report, "methods": info.cmd_methods,
            "presets": info.cmd_presets, "devices": info.cmd_devices, "catalog": info.cmd_catalog}


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


def build_parser(method: str) -> argparse.ArgumentParser:
    from semiseg.active import DEFAULT_DIVERSITY, MAPS, STRATEGIES
    from semiseg.inference import TTA_MODES
    p = argparse.ArgumentParser(prog="semiseg", description="SemiSeg: semi-supervised medical image segmentation.")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=None,
                   help="progress as JSON lines (default: when stdout is not a terminal)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description=description(train.cmd_train))
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
    s.add_argument("--tta", choices=list(TTA_MODES), default=None,
                   help="test-time augmentation (default: as trained): none, flips or reflections")
    s.add_argument("--uncertainty", nargs="?", const="entropy", default=None, choices=list(MAPS), metavar="MAP",
                   help="also NAME.uncertainty.nrrd (float32, 0..1, on the input's grid), a per-volume score in the "
                        "events and OUT/uncertainty.csv. MAP: entropy (of the softmax; the default), margin, "
                        "teacher-disagreement (with the EMA teacher), mc-dropout (BALD over 8 dropout passes)")

    sg = sub.add_parser("suggest", help="rank unlabeled volumes: which to label next",
                        description=description(segment.cmd_suggest))
    sg.add_argument("--model", required=True, help="checkpoint file or run folder (uses best.pt)")
    sg.add_argument("--input", nargs="+", required=True, help="unlabeled image files or folders (the pool)")
    sg.add_argument("--n", type=int, default=1, help="volumes to pick")
    sg.add_argument("--strategy", default="entropy", choices=list(STRATEGIES),
                    help="entropy (of the softmax), margin (1 - gap of the top two classes), teacher-disagreement "
                         "(student vs EMA teacher; methods with a teacher), mc-dropout (BALD over 8 dropout passes), random "
                         "(for comparison)")
    sg.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    sg.add_argument("--diversity", type=float, default=DEFAULT_DIVERSITY,
                    help="pass over a candidate whose thumbnail's cosine similarity to a picked one exceeds "
                         "1 - DIVERSITY (0 = off)")
    sg.add_argument("--device", default="auto")

    ls = sub.add_parser("loop-sim", help="simulate the label-correct-retrain loop on a labeled dataset",
                        description=description(loop_sim.cmd_loop_sim))
    ls.add_argument("--data", required=True, help="a fully labeled dataset: phantom[:N], phantom_ct[:N], a folder, "
                                                  "acdc:PATH (a scan is a patient frame, its slices together)")
    ls.add_argument("--strategies", default="entropy,random", help="comma-separated suggestion strategies")
    ls.add_argument("--seeds", type=int, default=3, help="seeds SEED ... SEED+N-1")
    ls.add_argument("--seed", type=int, default=1337)
    ls.add_argument("--rounds", type=int, default=3)
    ls.add_argument("--per-round", type=int, default=1, help="scans revealed per round")
    ls.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a hyper-parameter of the method (repeatable); its iteration-valued ramps and delays apply "
                         "to the runs from scratch, the warm-started rounds start past them")
    ls.add_argument("--iterations", type=int, default=200, help="round-0 training iterations")
    ls.add_argument("--finetune-iterations", type=int, default=100, help="iterations of each warm-started round")
    ls.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=True,
                    help="also train from scratch at equal total iterations (first strategy of each seed)")
    ls.add_argument("--scratch-all", action="store_true", help="the scratch arm for every strategy")
    ls.add_argument("--out", required=True)
    add_config_options(ls, "training options of every run (defaults from the preset)", skip=loop_sim.LOOP_SIM_OWN)

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
    e.add_argument("--tta", choices=list(TTA_MODES), default=None,
                   help="test-time augmentation (default: as trained): none, flips or reflections")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="folder for evaluate_SPLIT.json/.csv (default: the model's folder)")

    d = sub.add_parser("demo", help="train + segment on the built-in phantom (no download)")
    d.add_argument("--out", default="semiseg-demo")
    d.add_argument("--method", default="mean_teacher")
    d.add_argument("--iterations", type=int, default=0, help="default: the phantom preset's")
    d.add_argument("--device", default="auto")
    d.add_argument("--resume", action="store_true")

    pl = sub.add_parser("plan", help="print and write the preprocessing/training plan of a dataset",
                        description=description(train.cmd_plan))
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
                       description=description(benchmark.cmd_benchmark))
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
    b.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train N runs at once, each in a process of its own (one GPU holds several 2D runs; "
                        "on a CPU each run gets 1/N of the threads unless --threads is given)")
    add_config_options(b, "options passed to every run (defaults from the preset; see `semiseg presets`)",
                       skip=benchmark.BENCHMARK_OWN)

    bn = sub.add_parser("bench", help="measure training speed, peak memory, data-loading share and inference time",
                        description=description(benchmark.cmd_bench))
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
    bn.add_argument("--profile", default="", metavar="DIR",
                    help="afterwards, profile a few training steps per method: time per operator (printed), a "
                         "Chrome trace per method in DIR, and on CUDA the host synchronisations per step")
    add_config_options(bn, "training options (defaults from the preset; see `semiseg presets`)",
                       skip=("data", "method", "iterations", "method_options"))

    rp = sub.add_parser("report", help="rebuild the benchmark tables from finished runs (no training)")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders searched for them")
    rp.add_argument("--out", default=".", help="folder for results.md, results.csv and the overlaid curves")
    rp.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                    help="also draw the figures runs do not have yet, and the overlaid curves")
    return p




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
    ns.command_line = "semiseg " + " ".join(shlex.quote(a) for a in argv)  # recorded by benchmark and bench
    reporter = Reporter(ns.json)

    def error(message) -> int:
        if reporter.json:
            reporter({"event": "error", "message": str(message)})
        print(f"semiseg: error: {message}", file=sys.stderr)
        return protocol.EXIT_ERROR
    try:
        return HANDLERS[ns.command](ns, reporter)
    except CancelledError as e:
        print(f"semiseg: {e}", file=sys.stderr)
        return protocol.EXIT_CANCELLED
    except (SemiSegError, NotImplementedError) as e:
        from semiseg.errors import device_error
        if not isinstance(e, SemiSegError):
            e = device_error(e) or e
            if not isinstance(e, SemiSegError):
                raise
        return error(e)
    except OSError as e:  # a folder or file the command was pointed at that cannot be made, read or written
        where = " ".join(str(f) for f in (e.filename, e.filename2) if f)
        return error(f"cannot use {where}: {e.strerror}" if where and e.strerror else e)
    except KeyboardInterrupt:
        print("semiseg: interrupted", file=sys.stderr)
        return protocol.EXIT_CANCELLED

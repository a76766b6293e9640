"""``semiseg``: train, segment, evaluate, demo, and run a Slicer job.

Every error caused by input ends with one line ``semiseg: error: ...`` and exit code 2; a cancelled
run (Ctrl-C, SIGTERM, CANCEL file) writes its checkpoint and exits with code 3.
"""
from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
from pathlib import Path

from . import protocol
from .console import Reporter
from .options import METHOD_PREFIX, add_train_options, describe_presets, split_args


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


def cmd_train(ns, reporter) -> int:
    from semiseg.train.loop import Trainer
    cfg = build_train_config(ns)
    out = Path(ns.out)
    stop = StopFlag(out)
    summary = Trainer(cfg, out, on_event=reporter, should_stop=stop).run(resume=ns.resume)
    if not reporter.json:
        print_summary(summary)
    return protocol.EXIT_OK


def print_summary(summary: dict) -> None:
    print(f"\n{summary['method']}: {summary['iterations']} iterations in {summary['wall_time_s']:.0f} s "
          f"({summary['it_per_s']:.2f} it/s), peak memory {summary['peak_memory_mb']:.0f} MB; "
          f"checkpoint selected: {summary['selection']} (iteration {summary['selected_iteration']})")
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


# ------------------------------------------------------------------------------------------ segment
def cmd_segment(ns, reporter) -> int:
    from semiseg.predict import Segmenter, expand_inputs
    from semiseg.train.loop import select_device
    seg = Segmenter(ns.model, select_device(ns.device), lcc=ns.lcc, stride=tuple(ns.stride) if ns.stride else None)
    files = expand_inputs(ns.input)
    stop = StopFlag()
    for i, f in enumerate(files):
        if stop():
            reporter({"event": "finished", "status": "cancelled", "done": i})
            return protocol.EXIT_CANCELLED
        r = seg.segment_file(f, ns.out)
        reporter({"event": "predicted", "index": i + 1, "total": len(files), **r})
    reporter({"event": "finished", "status": "completed", "outputs": str(ns.out)})
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ evaluate
def cmd_evaluate(ns, reporter) -> int:
    from semiseg.checkpoint import load_checkpoint, network_from_checkpoint
    from semiseg.data.datasets import load_dataset
    from semiseg.errors import SemiSegError
    from semiseg.evaluation import evaluate_cases, summarize
    from semiseg.train.loop import select_device
    device = select_device(ns.device)
    ckpt = load_checkpoint(ns.model)
    net = network_from_checkpoint(ckpt, device)
    meta = ckpt["meta"]
    data = load_dataset(ns.data, ns.labeled or None, ns.val_split, ns.test_split, meta["dim"])
    refs = {"val": data.val, "test": data.test}[ns.split]
    if not refs:
        raise SemiSegError(f"{ns.data} has no '{ns.split}' cases (give --{ns.split}-split PATH)")
    res = evaluate_cases(net, refs, meta, full=True, empty=ns.empty, lcc=ns.lcc, half=device.type == "cuda")
    s = summarize(res)
    s.update(model=ckpt["path"], data=ns.data, split=ns.split, empty=ns.empty,
             lcc=bool(ns.lcc if ns.lcc is not None else meta.get("lcc")))
    out = Path(ns.out) if ns.out else Path(ckpt["path"]).parent
    out.mkdir(parents=True, exist_ok=True)
    from semiseg.checkpoint import atomic_write_text
    atomic_write_text(out / f"evaluate_{ns.split}.json", json.dumps({**s, "cases_detail": {r.case: r.per_class for r in res}}, indent=2))
    rows = []
    for r in res:
        for cname, m in r.per_class.items():
            rows.append({"case": r.case, "class": cname, **m})
    tmp = out / f".evaluate_{ns.split}.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / f"evaluate_{ns.split}.csv")
    if reporter.json:
        reporter({"event": "evaluated", **s})
    else:
        print(f"{ns.split}: {s['cases']} cases, empty-prediction convention '{ns.empty}', LCC {'on' if s['lcc'] else 'off'}")
        print(format_table(s))
        print(f"written: {out / f'evaluate_{ns.split}.json'}, {out / f'evaluate_{ns.split}.csv'}")
    return protocol.EXIT_OK


# ------------------------------------------------------------------------------------------ demo
def cmd_demo(ns, reporter) -> int:
    from semiseg.config import resolve_config
    from semiseg.data.io import read_label, write_segmentation, write_volume
    from semiseg.data.datasets import load_dataset
    from semiseg.metrics import dice_per_class_fast
    from semiseg.predict import Segmenter
    from semiseg.train.loop import Trainer, select_device

    out = Path(ns.out)
    explicit = {"data": "phantom", "method": ns.method, "device": ns.device}
    if ns.iterations:
        explicit["iterations"] = ns.iterations
    cfg = resolve_config(explicit)
    data = load_dataset("phantom", cfg.labeled)
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
    """Run a job folder written by the Slicer module: job.json {"task": "train"|"segment", ...}."""
    from semiseg.config import resolve_config
    from semiseg.errors import SemiSegError
    from semiseg.train.loop import Trainer
    job = Path(ns.job)
    spec_path = job / protocol.JOB_FILE
    if not spec_path.is_file():
        raise SemiSegError(f"no {protocol.JOB_FILE} in job folder {job}")
    spec = json.loads(spec_path.read_text())
    events = open(job / protocol.EVENTS_FILE, "a")

    def tee(e):
        events.write(protocol.encode(e) + "\n")
        events.flush()
        reporter(e)

    task = spec.get("task", "train")
    if task == "train":
        cfg = resolve_config(spec.get("config", {}))
        Trainer(cfg, job / "run", on_event=tee, should_stop=StopFlag(job)).run(resume=bool(spec.get("resume")))
        return protocol.EXIT_OK
    if task == "segment":
        from semiseg.predict import Segmenter
        seg = Segmenter(spec["model"], spec.get("device", "cpu"))
        stop = StopFlag(job)
        for i, f in enumerate(spec["inputs"]):
            if stop():
                tee({"event": "finished", "status": "cancelled", "done": i})
                return protocol.EXIT_CANCELLED
            tee({"event": "predicted", "index": i + 1, "total": len(spec["inputs"]),
                 **seg.segment_file(f, job / "predictions")})
        tee({"event": "finished", "status": "completed"})
        return protocol.EXIT_OK
    raise SemiSegError(f"{spec_path}: unknown task '{task}' (train or segment)")


# ------------------------------------------------------------------------------------------ main
def build_parser(method: str) -> argparse.ArgumentParser:
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
    add_train_options(t, method)

    s = sub.add_parser("segment", help="segment image files with a trained model")
    s.add_argument("--model", required=True, help="checkpoint file or run folder (uses best.pt)")
    s.add_argument("--input", nargs="+", required=True, help="image files (NRRD, NIfTI, MHA) or folders")
    s.add_argument("--out", required=True, help="output folder: NAME.label.nrrd and NAME.seg.nrrd per input")
    s.add_argument("--device", default="auto")
    s.add_argument("--lcc", action=argparse.BooleanOptionalAction, default=None,
                   help="largest connected component per class (default: as trained)")
    s.add_argument("--stride", nargs=3, type=int, help="3D sliding-window stride (default: as trained)")

    e = sub.add_parser("evaluate", help="evaluate a model on a dataset split")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=["val", "test"], default="val")
    e.add_argument("--labeled", type=int, default=0)
    e.add_argument("--val-split", default=None)
    e.add_argument("--test-split", default=None)
    e.add_argument("--empty", choices=["zero", "penalty"], default="zero", help="empty-prediction convention")
    e.add_argument("--lcc", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="folder for evaluate_SPLIT.json/.csv (default: the model's folder)")

    d = sub.add_parser("demo", help="train + segment on the built-in phantom (no download)")
    d.add_argument("--out", default="semiseg-demo")
    d.add_argument("--method", default="mean_teacher")
    d.add_argument("--iterations", type=int, default=0, help="default: the phantom preset's")
    d.add_argument("--device", default="auto")
    d.add_argument("--resume", action="store_true")

    sub.add_parser("methods", help="list the methods and their hyper-parameters")
    sub.add_parser("presets", help="list the dataset recipes")
    r = sub.add_parser("run", help="run a job folder (the Slicer module's protocol)")
    r.add_argument("--job", required=True)
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
    if method not in METHODS:
        print(f"semiseg: error: unknown method '{method}'; available: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return protocol.EXIT_ERROR
    ns = build_parser(method).parse_args(argv)
    reporter = Reporter(ns.json)
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
    handler = {"train": cmd_train, "segment": cmd_segment, "evaluate": cmd_evaluate, "demo": cmd_demo, "run": cmd_run}
    try:
        return handler[ns.command](ns, reporter)
    except CancelledError as e:
        print(f"semiseg: {e}", file=sys.stderr)
        return protocol.EXIT_CANCELLED
    except SemiSegError as e:
        if reporter.json:
            reporter({"event": "error", "message": str(e)})
        print(f"semiseg: error: {e}", file=sys.stderr)
        return protocol.EXIT_ERROR
    except KeyboardInterrupt:
        print("semiseg: interrupted", file=sys.stderr)
        return protocol.EXIT_CANCELLED

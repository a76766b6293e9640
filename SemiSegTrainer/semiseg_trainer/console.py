"""How events reach a person or a program: JSON lines (pipes, the Slicer module) or a
human-readable progress line when stdout is a terminal; the commands' summaries and tables."""
from __future__ import annotations

import sys

from .protocol import encode


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _budget_note(started: dict) -> str:
    """What a budgeted run's start line adds: its iteration count is an upper bound until the speed is known."""
    if not started.get("time_budget_s"):
        return ""
    return (f" at most; the {_fmt_time(started['time_budget_s'])} time budget sets the count once it has "
            "measured the speed")


class Reporter:
    def __init__(self, json_lines: bool | None = None, stream=None):
        self.stream = stream or sys.stdout
        self.json = (not self.stream.isatty()) if json_lines is None else json_lines
        self.last_val = ""
        self._open_line = False
        self.tag_runs = False  # several runs report at once (benchmark --parallel): prefix lines with the run

    def __call__(self, e: dict) -> None:
        if self.json:
            self.stream.write(encode(e) + "\n")
            self.stream.flush()
            return
        kind = e["event"]
        if kind == "iteration":
            n, total = e["iteration"], e["iterations"]
            width = 24
            bar = "#" * int(width * n / total) + "." * (width - int(width * n / total))
            terms = " ".join(f"{k} {v:.4f}" for k, v in e.items()
                             if k not in ("event", "time", "iteration", "iterations", "lr", "it_per_s", "eta_s",
                                          "remaining_s") and isinstance(v, float))
            left = f" ({_fmt_time(e['remaining_s'])} of the budget left)" if "remaining_s" in e else ""
            tag = f"{e['run']}: " if self.tag_runs and e.get("run") else ""
            val = "" if self.tag_runs else self.last_val  # validation lines are printed per run instead
            line = (f"\r{tag}[{bar}] {n}/{total} {terms} lr {e['lr']:.2e} {e['it_per_s']:.2f} it/s "
                    f"ETA {_fmt_time(e['eta_s'])}{left}{val}")
            self.stream.write(line[:200].ljust(120))
            self._open_line = True
        elif kind == "validation":
            dice = f"val Dice {100 * e['dice']:.2f} (best {100 * e['best_dice']:.2f})"
            self.last_val = f" | {dice}"
            if self.tag_runs and e.get("run"):
                self._line(f"{e['run']}: iteration {e.get('iteration')} {dice}")
        elif kind in ("started", "finished", "log", "predicted", "error", "budget"):
            msg = {"started": lambda: f"training {e.get('method')} on {e.get('data')} ({e.get('device')}), "
                                      f"iterations {e.get('iteration')}→{e.get('iterations')}{_budget_note(e)}",
                   "budget": lambda: f"time budget: {e.get('iterations')} iterations at {e.get('seconds_per_iteration')} "
                                     f"s/it, validation every {e.get('val_every')}, "
                                     f"{_fmt_time(e.get('remaining_s', 0))} left",
                   "finished": lambda: f"finished: {e.get('status')}",
                   "log": lambda: e.get("message", ""),
                   "predicted": lambda: f"segmented {e.get('input')} → {e.get('segmentation')}",
                   "error": lambda: f"error: {e.get('message')}"}[kind]()
            self._line((f"{e['run']}: " if self.tag_runs and e.get("run") and kind != "log" else "") + msg)
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")


def warner(reporter: Reporter):
    """One ``semiseg: warning: ...`` line on stderr per data warning (and a log event for JSON readers)."""
    def warn(message: str) -> None:
        print(f"semiseg: warning: {message}", file=sys.stderr, flush=True)
        if reporter.json:
            reporter({"event": "log", "level": "warning", "message": message})
    return warn


def report_plan(reporter: Reporter, plan, path=None) -> None:
    if reporter.json:
        reporter({"event": "plan", "plan": plan.to_dict(), "text": plan.describe(), "path": str(path or "")})
    else:
        print(plan.describe() + (f"\n  written         {path}" if path else ""), flush=True)


def report_recipe(reporter: Reporter, text: str) -> None:
    if reporter.json:
        reporter({"event": "log", "level": "info", "message": text})
    else:
        print(text, flush=True)


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

"""How events reach a person or a program: JSON lines (pipes, the Slicer module) or a
human-readable progress line when stdout is a terminal."""
from __future__ import annotations

import sys

from .protocol import encode


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Reporter:
    def __init__(self, json_lines: bool | None = None, stream=None):
        self.stream = stream or sys.stdout
        self.json = (not self.stream.isatty()) if json_lines is None else json_lines
        self.last_val = ""
        self._open_line = False

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
                             if k not in ("event", "time", "iteration", "iterations", "lr", "it_per_s", "eta_s")
                             and isinstance(v, float))
            line = (f"\r[{bar}] {n}/{total} {terms} lr {e['lr']:.2e} {e['it_per_s']:.2f} it/s "
                    f"ETA {_fmt_time(e['eta_s'])}{self.last_val}")
            self.stream.write(line[:200].ljust(120))
            self._open_line = True
        elif kind == "validation":
            self.last_val = f" | val Dice {100 * e['dice']:.2f} (best {100 * e['best_dice']:.2f})"
        elif kind in ("started", "finished", "log", "predicted", "error"):
            if self._open_line:
                self.stream.write("\n")
                self._open_line = False
            msg = {"started": lambda: f"training {e.get('method')} on {e.get('data')} ({e.get('device')}), "
                                      f"iterations {e.get('iteration')}→{e.get('iterations')}",
                   "finished": lambda: f"finished: {e.get('status')}",
                   "log": lambda: e.get("message", ""),
                   "predicted": lambda: f"segmented {e.get('input')} → {e.get('segmentation')}",
                   "error": lambda: f"error: {e.get('message')}"}[kind]()
            self.stream.write(msg + "\n")
        self.stream.flush()

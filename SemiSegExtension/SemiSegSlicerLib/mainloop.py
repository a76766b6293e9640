"""The two places where the module meets Qt's event loop (PythonQt inside Slicer): a repeating
``qt.QTimer`` that polls a job on the main thread, and ``slicer.app.processEvents()`` during a blocking
wait. Everything they call is plain Python (:mod:`SemiSegSlicerLib.process`).

PythonQt rules this follows: a timer's ``timeout()`` is delivered on the main thread only while Qt
processes events; an exception raised in the slot is printed and swallowed (so the slot catches and
logs its own, and keeps the timer's state right); nothing here is touched from another thread.
"""
from __future__ import annotations

import logging
from typing import Callable

POLL_INTERVAL_MS = 200


class MainThreadPoller:
    """Call ``tick()`` every ``interval_ms`` on the main thread until it returns False."""

    def __init__(self, tick: Callable[[], bool], interval_ms: int = POLL_INTERVAL_MS):
        import qt
        self.tick = tick
        self.timer = qt.QTimer()
        self.timer.setInterval(int(interval_ms))
        self.timer.connect("timeout()", self._onTimeout)

    def start(self) -> "MainThreadPoller":
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.stop()

    @property
    def active(self) -> bool:
        return bool(self.timer.isActive())

    def _onTimeout(self) -> None:
        try:
            keep = self.tick()
        except Exception:  # noqa: BLE001 - PythonQt would swallow it; log it and keep polling
            logging.exception("SemiSeg: polling the job failed")
            keep = True
        if not keep:
            self.timer.stop()


def process_events() -> None:
    """Let Slicer repaint and deliver queued events during a blocking wait (no-op outside Slicer)."""
    import slicer
    if hasattr(slicer, "app"):
        slicer.app.processEvents()


def progress_bar_format(text: str) -> str:
    """``text`` as a ``QProgressBar`` format. Qt replaces ``%p``, ``%v`` and ``%m`` in a format and has no
    escape for ``%`` (``%%`` shows two percent signs), so a literal percent sign stays as it is unless
    one of those letters follows it: then a zero-width space goes between them."""
    out = []
    for i, ch in enumerate(text):
        out.append(ch)
        if ch == "%" and text[i + 1:i + 2] in ("p", "v", "m"):
            out.append("\u200b")
    return "".join(out)

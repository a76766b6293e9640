"""A stop request for a running command: Ctrl-C, SIGTERM, or a CANCEL file in the job or run folder."""
from __future__ import annotations

import signal
from pathlib import Path

from . import protocol


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

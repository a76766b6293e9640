"""User-facing errors: one clear line that names the file, node or option at fault, and the exit codes
every SemiSeg process ends with (the command line, the Slicer job protocol, the benchmark's child runs)."""

EXIT_OK = 0
EXIT_ERROR = 2        # a SemiSegError: one line `semiseg: error: ...`
EXIT_CANCELLED = 3    # stopped on request (Ctrl-C, SIGTERM, CANCEL file); the last checkpoint is valid


class SemiSegError(Exception):
    """An error caused by the user's input or environment (not a bug).

    The message is a single line, printed as is by the command line and the Slicer module.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


class CancelledError(SemiSegError):
    """Training or inference stopped on request; the last checkpoint is valid."""

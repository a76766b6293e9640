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


MPS_FALLBACK_VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"


def device_error(exc: BaseException) -> SemiSegError | None:
    """A device's missing operation as one line (None for anything else): PyTorch's MPS backend raises
    ``NotImplementedError`` for an operator it lacks, which PyTorch can run on the CPU instead when
    ``PYTORCH_ENABLE_MPS_FALLBACK=1`` is set before it starts (the Slicer module sets it for its trainer)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, NotImplementedError) and "MPS" in text:
        op = text.split("'")[1] if text.count("'") >= 2 else "an operation"
        return SemiSegError(f"{op} is not implemented on Apple's MPS backend: set {MPS_FALLBACK_VARIABLE}=1 "
                            "to run it on the CPU, or train with --device cpu")
    return None

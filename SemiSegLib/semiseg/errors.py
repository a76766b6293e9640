"""User-facing errors: one clear line that names the file, node or option at fault."""


class SemiSegError(Exception):
    """An error caused by the user's input or environment (not a bug).

    The message is a single line, printed as is by the command line and the Slicer module.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


class CancelledError(SemiSegError):
    """Training or inference stopped on request; the last checkpoint is valid."""

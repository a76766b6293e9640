"""The bodies of the ``semiseg`` sub-commands, one module per command or small group of commands. Each
body takes the parsed options and the :class:`~semiseg_trainer.console.Reporter`, calls the engine and
returns the exit code; ``semiseg_trainer.cli`` builds the parser and dispatches. A body's docstring is its
sub-command's ``--help`` description."""
from __future__ import annotations


def description(body) -> str:
    """A command body's docstring as one paragraph (argparse reflows it the same way)."""
    return " ".join(body.__doc__.split())

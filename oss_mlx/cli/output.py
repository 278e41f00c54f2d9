"""Where the command line writes: rich in a terminal, plain unwrapped lines into a pipe or a file
(a log never gets a value folded at 80 columns)."""

from __future__ import annotations

import sys


def console(stderr: bool = False):
    """A rich Console for stdout (or stderr): the terminal's width in a terminal; elsewhere no
    colours and no wrapping, so every line of a table or a figure stays one line."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, width=100_000, no_color=True, highlight=False,
                   soft_wrap=True)

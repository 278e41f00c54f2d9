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


class LongPrefill:
    """Prefill progress for `chat` and `generate`: whether a prompt's prefill has run long
    enough to show (`AFTER_S` since its first chunk), and the words shown."""

    AFTER_S = 0.5

    def __init__(self, clock=None):
        import time

        self.clock = clock or time.monotonic
        self.t0 = None

    def due(self) -> bool:
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        return now - self.t0 >= self.AFTER_S

    def reset(self):
        self.t0 = None

    @staticmethod
    def text(read: int, total: int, tps: float) -> str:
        return f"reading the prompt: {read:,} / {total:,} tokens · {tps:,.0f} tok/s"

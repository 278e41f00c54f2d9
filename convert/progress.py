"""A byte-progress bar for the commands that write checkpoints (convert, synth)."""

from __future__ import annotations

from typing import Callable


class Progress:
    """A rich byte-progress bar on stderr; silent when stderr is not a terminal."""

    def __init__(self, total: int, description: str):
        import sys

        self.total, self.description = total, description
        self.enabled = sys.stderr.isatty()
        self._bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress,
                                   TextColumn, TimeRemainingColumn, TransferSpeedColumn)

        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False

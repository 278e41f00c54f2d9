"""The chat's two views of a streaming turn: a rich terminal view (reasoning dimmed, the answer
live then as markdown) and a plain one for pipes (the answer to stdout, the rest to stderr)."""

from __future__ import annotations

import sys

from oss_mlx.cli.chat.session import INTERRUPTED_NOTE
from oss_mlx.harmony import section_of


def footer_text(stats, max_context: int) -> tuple[str, float]:
    used = stats.prompt_tokens + stats.generated_tokens
    frac = used / max_context if max_context else 0.0
    parts = [f"{stats.generated_tokens} tokens", f"TTFT {stats.ttft_s:.2f} s"]
    if stats.decode_tps:
        parts.append(f"{stats.decode_tps:.1f} tok/s")
    parts.append(f"context {used:,}/{max_context:,} ({100 * frac:.0f}%)")
    if stats.cached_tokens:
        parts.append(f"{stats.cached_tokens:,} cached")
    if stats.prefilled_tokens and stats.cached_tokens:
        parts.append(f"{stats.prefilled_tokens:,} read")
    return " · ".join(parts), frac



class TerminalView:
    """Streams a turn with rich: reasoning dimmed, answer live, then markdown."""

    def __init__(self, hide_reasoning: bool):
        from rich.console import Console

        self.console = Console(highlight=False)
        self.hide_reasoning = hide_reasoning
        self.section = None
        self.text = ""
        self.live = None
        self.thinking_tokens = 0

    # messages outside a turn
    def info(self, msg: str):
        self.console.print(msg, markup=False, soft_wrap=True)  # the terminal wraps, not rich

    def note(self, msg: str):
        self.console.print(msg, style="dim", markup=False)

    def warn(self, msg: str):
        self.console.print(msg, style="yellow", markup=False)

    def error(self, msg: str):
        self.console.print(msg, style="bold red", markup=False)

    def markup(self, msg: str):
        self.console.print(msg)

    # a turn
    def start(self):
        from oss_mlx.cli.output import LongPrefill

        self.section, self.text, self.thinking_tokens = None, "", 0
        self.status, self.long = None, LongPrefill()

    def progress(self, read: int, total: int, tps: float):
        """A status line while a long prompt is read (the engine's prefill), until the turn's
        first text."""
        if not self.long.due():
            return
        text = self.long.text(read, total, tps)
        if self.status is None:
            self.status = self.console.status(text, spinner="dots")
            self.status.start()
        else:
            self.status.update(text)

    def _end_status(self):
        """The prompt is read: the status line goes, and the next prefill (a built-in tool's
        result, the next turn) is timed afresh."""
        self.long.reset()
        if getattr(self, "status", None) is not None:
            self.status.stop()
            self.status = None

    def delta(self, channel: str | None, recipient: str | None, text: str):
        self._end_status()
        kind = section_of(channel, recipient)
        if kind is None:
            return  # a channel harmony does not have: shown nowhere
        if kind != self.section:
            self._close()
            self._open(kind, recipient)
        if kind == "reasoning":
            self.thinking_tokens += 1
            if self.hide_reasoning:
                self.live.update(self._spinner())
            else:
                self._stream(text)
            return
        self.text += text  # the answer's Live reads it at each refresh (see _open)

    def finish(self, interrupted: bool = False):
        self._end_status()
        self._close(interrupted)

    def _open(self, kind, recipient):
        from rich.live import Live

        self.section, self.text = kind, ""
        if kind == "reasoning":
            if self.hide_reasoning:
                self.live = Live(self._spinner(), console=self.console, transient=True,
                                 refresh_per_second=8)
                self.live.start()
            else:
                self.console.print("Thinking", style="dim bold", markup=False)
                self.col, self.pending = 0, ""
        elif kind == "answer":
            # get_renderable: the answer is re-wrapped at each refresh, not at each token.
            self.live = Live(get_renderable=self._tail, console=self.console, transient=True,
                             refresh_per_second=12, vertical_overflow="crop")
            self.live.start()
        else:
            self.recipient = recipient

    def _close(self, interrupted: bool = False):
        from oss_mlx.cli.chat.tools import markdown as Markdown  # file:// citations link too

        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.section == "reasoning":
            if not self.hide_reasoning:
                self._stream("", flush=True)
                self.console.print()
                self.console.print()
            else:
                self.note(f"(thought for {self.thinking_tokens} tokens; /reasoning show to see)")
        elif self.section == "answer":
            self.console.print(Markdown(self.text))
        elif self.section == "tool":
            self.console.print(f"→ tool call {self.recipient}({self.text})", style="yellow",
                               markup=False)
        if interrupted:
            self.warn(INTERRUPTED_NOTE)
        self.section = None

    def _stream(self, text: str, flush: bool = False):
        """Print streamed reasoning, wrapping at word boundaries (the terminal would cut words).

        The trailing piece of a word is held back until the next delta shows where it ends.
        """
        import re

        from rich.cells import cell_len

        width = self.console.size.width
        self.pending += text
        pieces = re.findall(r"\S+|\s+", self.pending)
        self.pending = "" if flush or not pieces or pieces[-1].isspace() else pieces.pop()
        out = []
        for piece in pieces:
            n = cell_len(piece)
            if "\n" in piece:
                out.append("\n" * piece.count("\n"))
                self.col = 0
            elif piece.isspace():
                if self.col + n >= width:
                    out.append("\n")
                    self.col = 0
                elif self.col:
                    out.append(piece)
                    self.col += n
            else:
                if self.col and self.col + n > width:
                    out.append("\n")
                    self.col = 0
                out.append(piece)
                self.col = (self.col + n) % width if self.col + n > width else self.col + n
        if out:
            self.console.print("".join(out), style="dim italic", end="", markup=False,
                               highlight=False, soft_wrap=True)

    def _spinner(self):
        from rich.spinner import Spinner

        return Spinner("dots", text=f"thinking… {self.thinking_tokens} tokens", style="dim")

    def _tail(self):
        """The answer so far, cut to its last screenful while it streams."""
        from rich.text import Text

        height = max(self.console.size.height - 2, 3)
        lines = Text(self.text).wrap(self.console, self.console.size.width)
        return Text("\n").join(lines[-height:]) if len(lines) > height else Text(self.text)

    def footer(self, text: str):
        self.console.print(text, style="dim", markup=False)

    def end(self):
        self.console.print()


class PipeView:
    """Batch mode: the answer to stdout as it streams, everything else to stderr, no styling."""

    def __init__(self, hide_reasoning: bool):
        self.hide_reasoning = hide_reasoning
        self.section = None

    def _err(self, msg: str):
        print(msg, file=sys.stderr, flush=True)

    info = note = warn = error = markup = _err

    def start(self):
        self.section = None

    def progress(self, read: int, total: int, tps: float):
        pass  # a pipe gets the answer only

    def delta(self, channel, recipient, text):
        kind = section_of(channel, recipient)
        if kind is None:
            return  # a channel harmony does not have: shown nowhere
        if kind != self.section:
            self._close()
            self.section = kind
            if kind == "tool":
                sys.stderr.write(f"→ tool call {recipient}(")
        if kind == "answer":
            sys.stdout.write(text)
            sys.stdout.flush()
        elif kind == "tool" or not self.hide_reasoning:
            sys.stderr.write(text)
            sys.stderr.flush()

    def _close(self):
        if self.section == "answer":
            sys.stdout.write("\n")
            sys.stdout.flush()
        elif self.section == "tool":
            sys.stderr.write(")\n")
        elif self.section == "reasoning" and not self.hide_reasoning:
            sys.stderr.write("\n")
        self.section = None

    def finish(self, interrupted: bool = False):
        self._close()
        if interrupted:
            self._err(INTERRUPTED_NOTE)

    def footer(self, text: str):
        self._err(text)

    def end(self):
        pass



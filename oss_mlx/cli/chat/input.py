"""The chat's input: a terminal line editor with history across sessions (readline), pastes
kept as one message, and messages from a pipe."""

from __future__ import annotations

import sys
from pathlib import Path


def history_file() -> Path:
    from oss_mlx.store import home

    return home() / "chat_history"


def setup_readline():
    """Up-arrow history across sessions; returns the readline module or None."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline
        return None
    readline.set_auto_history(False)  # we add whole (multi-line) entries ourselves
    try:
        readline.read_history_file(history_file())
    except (OSError, UnicodeDecodeError):
        pass
    readline.set_history_length(1000)
    return readline


def save_readline(readline) -> None:
    if readline is None:
        return
    try:
        history_file().parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(history_file())
    except OSError:
        pass  # history is a convenience; never fail the exit over it


def _pending_input() -> bool:
    """True when more typed/pasted bytes are already waiting: the rest of a paste."""
    import select

    try:
        return bool(select.select([sys.stdin], [], [], 0.02)[0])
    except (OSError, ValueError):
        return False


def read_tty(readline, prompt: str = ">>> ") -> str:
    """One message from the terminal: a trailing backslash continues, a paste stays one message.

    Raises EOFError / KeyboardInterrupt like input().
    """
    # Lines typed while an answer streamed are separate messages; only input that arrives in
    # one burst after the prompt is shown is a paste.
    typed_ahead = _pending_input()
    lines = []
    line = input(prompt)
    while True:
        if line.endswith("\\"):
            lines.append(line[:-1])
            line = input("... ")
            continue
        lines.append(line)
        if typed_ahead or not _pending_input():
            break
        line = input("... ")
    text = "\n".join(lines).strip()
    if readline is not None and text:
        readline.add_history(text)
    return text


def read_pipe(stream):
    """Messages from a pipe: one per line, a trailing backslash joins the next line."""
    buf = []
    for line in stream:
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        text = "\n".join(buf).strip()
        buf = []
        if text:
            yield text
    if buf and "\n".join(buf).strip():
        yield "\n".join(buf).strip()



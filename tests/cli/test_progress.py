"""A long prompt's prefill, as `generate` and `chat` show it (the engine's progress callback,
after each prefill chunk), and the final figures: what was cached and what was read."""

from __future__ import annotations

import argparse
import io
import re

import pytest
from support.scripted import ScriptedModel

from oss_mlx.cli import generate
from oss_mlx.cli.output import LongPrefill
from oss_mlx.engine import Engine

REPLY = "<|channel|>final<|message|>Read it all.<|return|>"
LINE = re.compile(r"oss-mlx: reading the prompt: ([\d,]+) / ([\d,]+) tokens · [\d,]+ tok/s")


@pytest.fixture
def at_once(monkeypatch):
    """Progress shows from the first chunk on (not only after half a second)."""
    monkeypatch.setattr(LongPrefill, "AFTER_S", 0.0)


def run_generate(encoding, scripted_dir, *extra, words=2000):
    model = ScriptedModel(REPLY, encoding=encoding, max_context=8192)
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    args = p.parse_args(["--model", str(scripted_dir), "--prompt", "word " * words, *extra])
    return generate.main(args, load_engine=lambda folder: Engine(model, encoding))


def test_generate_stats_show_the_prefill_and_what_was_cached(encoding, scripted_dir, capsys,
                                                             at_once):
    assert run_generate(encoding, scripted_dir, "--stats") == 0
    out, err = capsys.readouterr()
    assert out == "Read it all.\n"
    lines = [LINE.match(x) for x in err.splitlines() if x.startswith("oss-mlx: reading")]
    assert len(lines) >= 3 and all(lines)
    reads = [int(m.group(1).replace(",", "")) for m in lines]
    total = int(lines[0].group(2).replace(",", ""))
    assert reads == sorted(reads) and reads[-1] == total - 1
    m = re.search(r"oss-mlx: prompt (\d+) tokens \((\d+) cached, (\d+) read at [\d.]+ tok/s\)",
                  err)
    assert m and int(m.group(1)) == total and m.group(2) == "0" and int(m.group(3)) == total


def test_generate_into_a_pipe_shows_no_progress_without_stats(encoding, scripted_dir, capsys,
                                                               at_once):
    assert run_generate(encoding, scripted_dir) == 0
    assert capsys.readouterr() == ("Read it all.\n", "")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_generate_on_a_terminal_rewrites_one_line_and_clears_it(at_once):
    out = Terminal()
    progress = generate.Progress(out)
    progress(16, 100, 300.0)
    progress(80, 100, 310.0)
    progress.clear()
    text = out.getvalue()
    assert text.count("\r") == 3 and "\n" not in text
    assert "80 / 100 tokens" in text and text.endswith("\r\x1b[K")


def test_a_short_prefill_shows_nothing():
    clock = iter([0.0, 0.1, 0.3]).__next__
    long = LongPrefill(clock)
    assert [long.due(), long.due(), long.due()] == [False, False, False]
    long = LongPrefill(iter([0.0, 0.6]).__next__)
    assert [long.due(), long.due()] == [False, True]


def test_chat_shows_a_status_line_while_a_long_prompt_is_read(encoding, at_once):
    from rich.console import Console

    from oss_mlx.cli.chat.repl import Chat
    from oss_mlx.cli.chat.session import Session, Settings
    from oss_mlx.cli.chat.view import TerminalView

    model = ScriptedModel(REPLY, encoding=encoding, max_context=8192)
    view = TerminalView(hide_reasoning=False)
    view.console = Console(file=io.StringIO(), force_terminal=True, width=200)
    statuses = []
    status = view.console.status

    def recording(text, **kw):
        statuses.append(text)
        return status(text, **kw)

    view.console.status = recording
    chat = Chat(Engine(model, encoding), Session(Settings(max_tokens=50)), view, "scripted")
    chat.ask("word " * 2000)
    shown = view.console.file.getvalue()
    assert statuses and statuses[0].startswith("reading the prompt: ")
    assert "reading the prompt: " in shown and "Read it all." in shown
    assert view.status is None  # stopped when the answer began
    st = chat.last_stats
    assert st.prefilled_tokens == st.prompt_tokens and st.cached_tokens == 0
    assert chat.totals["prefilled"] == st.prompt_tokens

"""`oss-mlx chat --tools python` and `--browse FOLDER`: the real chat on a scripted model.

In-process through a pipe (stdin a file: the batch mode), for exact prompts: the tool outputs
come back into the prompt as harmony tool messages, token by token as openai-harmony renders
them, and the answer follows; the python session keeps its variables across the turns of a
chat and loses them on /reset. Then a real terminal (pexpect): the call and its output in the
reasoning view, /tools, Ctrl-C stopping an endless cell, a citation shown as a link.
"""

from __future__ import annotations

import datetime
import io
import json
import re
import sys

import pytest
from openai_harmony import ReasoningEffort, SystemContent

from oss_mlx.cli import main as cli
from oss_mlx.tools import Browser, LocalFolder, PythonSession, python_support
from oss_mlx.tools.toolbox import browser_config, python_config
from support.scripted import ScriptedModel
from support.tooluse import (BROWSE_TURN, PYTHON_RESULTS, PYTHON_TURN, RecordingEngine,
                             check_tool_prompts, first_prompt, write_notes)

needs_sandbox = pytest.mark.skipif(not python_support().available,
                                   reason=python_support().reason)


def chat_in_pipe(monkeypatch, folder, engine, lines, *options):
    """`oss-mlx chat` with `lines` piped in; the exit status."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return cli(["chat", "--model", str(folder), "--reasoning", "low", *options],
               load_engine=lambda _: engine)


def system(*tools):
    content = (SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)
               .with_conversation_start_date(datetime.date.today().isoformat()))
    for tool in tools:
        content = content.with_tools(tool)
    return content


@pytest.mark.subprocess
@needs_sandbox
def test_python_in_a_piped_chat(monkeypatch, capsys, encoding, scripted_dir):
    turn2 = ["<|channel|>analysis to=python code<|message|>print(x * 2)<|call|>",
             "<|channel|>final<|message|>84.<|return|>"]
    after_reset = ["<|channel|>analysis to=python code<|message|>print(x)<|call|>",
                   "<|channel|>final<|message|>Gone.<|return|>"]
    model = ScriptedModel(*PYTHON_TURN, *turn2, *after_reset, encoding=encoding)
    engine = RecordingEngine(model, encoding)
    status = chat_in_pipe(monkeypatch, scripted_dir, engine,
                          ["What is 6*7+1?", "And twice x?", "/reset", "Print x."],
                          "--tools", "python")
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == "It is 43.\n84.\nGone.\n"

    # The first turn: each tool output back into the prompt as harmony renders a tool message.
    first = first_prompt(encoding, system(python_config(PythonSession())), "What is 6*7+1?")
    check_tool_prompts(encoding, engine.rendered[:3], model.prompts[:3], PYTHON_TURN,
                       PYTHON_RESULTS, first=first)
    # The next turn's python call sees x from the first turn: one session per chat.
    assert encoding.decode(engine.rendered[4]).endswith(
        "<|start|>python to=assistant<|channel|>analysis<|message|>84\n<|end|>"
        "<|start|>assistant")
    # /reset ended that session: x is gone, and the model was told so by the tool.
    assert "NameError: name 'x' is not defined" in encoding.decode(engine.rendered[6])

    # The calls and their outputs, in the reasoning view (stderr, the answer alone on stdout).
    assert "→ python\n  x = 6 * 7\n  print(x)\n← python\n  42\n" in err
    assert "→ python\n  print(x + 1)\n← python\n  43\n" in err
    assert "tools: python (landlock+seccomp sandbox)" in err or "seatbelt" in err


def test_browsing_a_folder_in_a_piped_chat(monkeypatch, capsys, encoding, scripted_dir, tmp_path):
    notes = write_notes(tmp_path)
    model = ScriptedModel(*BROWSE_TURN, encoding=encoding)
    engine = RecordingEngine(model, encoding)
    status = chat_in_pipe(monkeypatch, scripted_dir, engine, ["How do I get to the castle?"],
                          "--browse", str(notes))
    out, err = capsys.readouterr()
    assert status == 0, err
    trip = (notes / "trip.md").resolve().as_uri()
    assert out == f"Take the tram 28  ([trip.md]({trip})) .\n"  # the citation as a link

    # The tool's pages, as an independent Browser over the same folder shows them.
    oracle = Browser(LocalFolder(notes), encoding=encoding)
    pages = [oracle.call("search", '{"query": "tram castle"}'), oracle.call("open", '{"id": 0}'),
             oracle.call("find", '{"pattern": "tram"}')]
    assert pages[0].startswith("[0] tram castle\n")
    assert "【0†Trip to Lisbon†trip.md】" in pages[0]
    assert pages[1].startswith(f"[1] Trip to Lisbon ({trip})")
    assert pages[2].startswith("[2] Find results for text: `tram` in `Trip to Lisbon`")
    assert "secret" not in "".join(pages).lower()
    results = [(f"browser.{f}", p) for f, p in zip(("search", "open", "find"), pages)]
    first = first_prompt(encoding, system(browser_config(oracle)), "How do I get to the castle?")
    check_tool_prompts(encoding, engine.rendered, model.prompts, BROWSE_TURN, results, first=first)
    assert "sources=local files" in encoding.decode(engine.rendered[0])
    assert ('→ browser.search {"query": "tram castle"}\n← browser.search\n'
            '  [0] tram castle') in err


def test_options_are_checked_before_the_model_loads(monkeypatch, capsys, scripted_dir, tmp_path):
    def never(_):
        raise AssertionError("the model was loaded")

    for options, said in [(["--tools", "browser"], "the browser tool needs a backend"),
                          (["--browse", str(tmp_path / "nowhere")], "not a folder"),
                          (["--browse", str(tmp_path), "--search-url", "http://x"], "one backend"),
                          (["--search-url", "ftp://x"], "not an http(s) URL")]:
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        assert cli(["chat", "--model", str(scripted_dir), *options], load_engine=never) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("oss-mlx: error: ") and said in err[0], err
    with pytest.raises(SystemExit):
        cli(["chat", "--tools", "pyhton"])
    assert "name one or more of python, browser" in capsys.readouterr().err


def test_without_a_sandbox_python_is_not_offered(monkeypatch, capsys, encoding, scripted_dir):
    from oss_mlx import tools
    from oss_mlx.tools.sandbox import Support

    off = Support(False, "", "python tool off: Landlock is not enabled in this kernel")
    monkeypatch.setattr(tools, "python_support", lambda: off)
    model = ScriptedModel("<|channel|>final<|message|>Hi.<|return|>", encoding=encoding)
    engine = RecordingEngine(model, encoding)
    assert chat_in_pipe(monkeypatch, scripted_dir, engine, ["hi", "/tools python on"],
                        "--tools", "python") == 0
    out, err = capsys.readouterr()
    assert out == "Hi.\n"
    # Said once at the start and once at /tools python on.
    assert err.count("python tool off: Landlock is not enabled in this kernel") == 2
    assert "# Tools" not in encoding.decode(engine.rendered[0])  # not declared to the model


# ---- a real terminal --------------------------------------------------------------------------

pexpect = pytest.importorskip("pexpect")
from support import REPO, SUPPORT, child_env  # noqa: E402

PROMPT = ">>> "
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\r")


def plain(text):
    return ANSI.sub("", text or "")


def spawn(tmp_path, replies, *options):
    env = child_env()
    env.update(OSS_MLX_HOME=str(tmp_path / "home"), TERM="xterm", HF_HUB_OFFLINE="1",
               SCRIPTED_REPLIES=json.dumps(replies), SCRIPTED_LOG=str(tmp_path / "log.jsonl"))
    env.pop("SCRIPTED_PAUSE", None)
    child = pexpect.spawn(sys.executable, [str(SUPPORT / "scripted.py"), "chat", *options],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=60,
                          dimensions=(40, 120))
    child.expect_exact(PROMPT)
    return child


def command(child, line):
    child.sendline(line)
    child.expect_exact(PROMPT)
    return plain(child.before)


def finish(child):
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")


@pytest.mark.subprocess
@needs_sandbox
def test_tty_python_session(scripted_dir, tmp_path):
    endless = ("<|channel|>analysis to=python code<|message|>while True:\n    pass<|call|>")
    child = spawn(tmp_path, [*PYTHON_TURN, endless, "<|channel|>final<|message|>Never.<|return|>"],
                  "--model", str(scripted_dir), "--tools", "python")
    out = command(child, "What is 6*7+1?")
    # The reasoning, the call and its output, the next call, then the answer.
    # (A spinner says the code is running, until its output is in.)
    assert re.search(r"Let me compute\.\s+→ python\s+x = 6 \* 7\s+print\(x\)\s.*?"
                     r"← python\s+42\s+→ python\s+print\(x \+ 1\)\s.*?← python\s+43\s.*?"
                     r"It is 43\.", out, re.S), out
    assert "running python… (Ctrl-C stops it)" in out

    assert "tools: python" in command(child, "/tools")
    assert "tools: none" in command(child, "/tools python off")
    assert "tools: python" in command(child, "/tools python on")
    assert "usage: /tools" in command(child, "/tools pyhton on")

    # Ctrl-C while a cell runs forever: the cell is interrupted, the turn ends, the chat goes on.
    child.sendline("Loop forever.")
    child.expect_exact("running python")
    child.sendintr()
    child.expect_exact(PROMPT)
    out = plain(child.before)
    assert "Execution interrupted by the user" in out and "[interrupted by the user]" in out
    assert "Never." not in out
    finish(child)


@pytest.mark.subprocess
@needs_sandbox
def test_tty_a_cell_that_ignores_ctrl_c(scripted_dir, tmp_path):
    """A cell that ignores the interrupt is ended (2 s later), the model is told its session
    was restarted, and the next call runs in a new one."""
    stubborn = ("<|channel|>analysis to=python code<|message|>import signal\n"
                "signal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass<|call|>")
    after = ["<|channel|>analysis to=python code<|message|>print('fresh')<|call|>",
             "<|channel|>final<|message|>Back.<|return|>"]
    child = spawn(tmp_path, [stubborn, *after], "--model", str(scripted_dir), "--tools", "python")
    child.sendline("Loop.")
    child.expect_exact("running python")
    child.sendintr()
    child.expect_exact(PROMPT)
    out = plain(child.before)
    assert ("[ERROR] Execution interrupted by the user. The python session was restarted: its "
            "variables are lost.") in out
    assert "[interrupted by the user]" in out and "no harmony message" not in out
    out = command(child, "Again.")
    assert re.search(r"← python\s+fresh\s.*Back\.", out, re.S), out
    finish(child)


@pytest.mark.subprocess
def test_tty_browser_citation_is_a_link(scripted_dir, tmp_path):
    notes = write_notes(tmp_path)
    child = spawn(tmp_path, BROWSE_TURN, "--model", str(scripted_dir), "--browse", str(notes))
    child.sendline("How do I get to the castle?")
    child.expect_exact(PROMPT)
    raw = child.before
    out = plain(raw)
    assert '→ browser.search {"query": "tram castle"}' in out and "← browser.find" in out
    assert re.search(r"Take the tram 28\s+\(trip\.md\)\s*\.", out), out
    trip = (notes / "trip.md").resolve().as_uri()
    assert "\x1b]8;id=" in raw and f";{trip}\x1b\\" in raw  # a terminal hyperlink to the file
    finish(child)


@pytest.mark.subprocess
@needs_sandbox
def test_a_chat_cut_inside_a_call_restarts_python(monkeypatch, capsys, encoding, scripted_dir):
    """A KeyboardInterrupt inside a call (a third Ctrl-C, while the cell ignores the first two):
    the turn ends, the worker is ended rather than left mid-cell, the next call starts anew."""
    real_run = PythonSession.run
    sessions = []

    def run(self, code, cancel=None):
        if code == "cut here":
            real_run(self, "0")  # the worker and its folder exist
            sessions.append(self)
            raise KeyboardInterrupt
        return real_run(self, code, cancel)

    monkeypatch.setattr(PythonSession, "run", run)
    model = ScriptedModel("<|channel|>analysis to=python code<|message|>cut here<|call|>",
                          "<|channel|>analysis to=python code<|message|>print(1)<|call|>",
                          "<|channel|>final<|message|>One.<|return|>", encoding=encoding)
    engine = RecordingEngine(model, encoding)
    assert chat_in_pipe(monkeypatch, scripted_dir, engine, ["first", "second"], "--tools",
                        "python") == 0
    out, err = capsys.readouterr()
    assert out == "One.\n"
    assert "the python session was restarted: its variables are lost" in err
    assert sessions[0].workdir is None  # closed: its worker ended, its folder removed
    assert "[interrupted by the user]" in err and "no harmony message" not in err

"""`oss-mlx generate --tools python` and `--browse FOLDER`: the same turn as chat, without a
terminal. The real command on a scripted model: the tool outputs come back into the prompt as
openai-harmony renders tool messages, the answer goes to stdout, the calls to stderr, and
--json carries each call with its output."""

from __future__ import annotations

import datetime
import json

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


def generate(folder, engine, prompt, *options):
    return cli(["generate", "--model", str(folder), "--prompt", prompt, "--reasoning", "low",
                *options], load_engine=lambda _: engine)


def system(tool):
    return (SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)
            .with_conversation_start_date(datetime.date.today().isoformat()).with_tools(tool))


@needs_sandbox
def test_python_turn(capsys, encoding, scripted_dir):
    model = ScriptedModel(*PYTHON_TURN, encoding=encoding)
    engine = RecordingEngine(model, encoding)
    assert generate(scripted_dir, engine, "What is 6*7+1?", "--tools", "python") == 0
    out, err = capsys.readouterr()
    assert out == "It is 43.\n"
    assert err == ("→ python\n  x = 6 * 7\n  print(x)\n← python\n  42\n"
                   "→ python\n  print(x + 1)\n← python\n  43\n")
    first = first_prompt(encoding, system(python_config(PythonSession())), "What is 6*7+1?")
    check_tool_prompts(encoding, engine.rendered, model.prompts, PYTHON_TURN, PYTHON_RESULTS,
                       first=first)


@needs_sandbox
def test_python_turn_as_json(capsys, encoding, scripted_dir):
    model = ScriptedModel(*PYTHON_TURN, encoding=encoding)
    assert generate(scripted_dir, RecordingEngine(model, encoding), "6*7+1?", "--tools", "python",
                    "--json") == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = json.loads(out)
    assert data["final"] == "It is 43." and data["stop_reason"] == "stop"
    assert data["analysis"] == "Let me compute."
    assert data["tool_calls"] == []  # none left to the caller: both ran
    assert data["tool_outputs"] == [
        {"name": "python", "channel": "analysis", "input": "x = 6 * 7\nprint(x)",
         "output": "42\n", "error": None},
        {"name": "python", "channel": "analysis", "input": "print(x + 1)", "output": "43\n",
         "error": None}]


@needs_sandbox
def test_an_error_in_the_code_is_the_models_to_read(capsys, encoding, scripted_dir):
    model = ScriptedModel("<|channel|>analysis to=python code<|message|>1/0<|call|>",
                          "<|channel|>final<|message|>Cannot divide by zero.<|return|>",
                          encoding=encoding)
    engine = RecordingEngine(model, encoding)
    assert generate(scripted_dir, engine, "1/0?", "--tools", "python", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert "ZeroDivisionError" in data["tool_outputs"][0]["output"]
    assert data["final"] == "Cannot divide by zero."
    assert "ZeroDivisionError: division by zero" in encoding.decode(engine.rendered[1])


def test_browser_turn_with_a_citation(capsys, encoding, scripted_dir, tmp_path):
    notes = write_notes(tmp_path)
    model = ScriptedModel(*BROWSE_TURN, encoding=encoding)
    engine = RecordingEngine(model, encoding)
    assert generate(scripted_dir, engine, "How do I get to the castle?", "--browse",
                    str(notes)) == 0
    out, err = capsys.readouterr()
    assert out == f"Take the tram 28  ([trip.md]({(notes / 'trip.md').resolve().as_uri()})) .\n"
    oracle = Browser(LocalFolder(notes), encoding=encoding)
    pages = [oracle.call("search", '{"query": "tram castle"}'), oracle.call("open", '{"id": 0}'),
             oracle.call("find", '{"pattern": "tram"}')]
    results = [(f"browser.{f}", p) for f, p in zip(("search", "open", "find"), pages)]
    first = first_prompt(encoding, system(browser_config(oracle)), "How do I get to the castle?")
    check_tool_prompts(encoding, engine.rendered, model.prompts, BROWSE_TURN, results, first=first)
    assert "→ browser.find {\"pattern\": \"tram\"}\n← browser.find\n  [2] Find results" in err


def test_without_a_sandbox_the_reason_is_one_line(capsys, encoding, scripted_dir, monkeypatch):
    from oss_mlx import tools
    from oss_mlx.tools.sandbox import Support

    monkeypatch.setattr(tools, "python_support",
                        lambda: Support(False, "", "python tool off: no sandbox for win32"))
    model = ScriptedModel("<|channel|>final<|message|>Hi.<|return|>", encoding=encoding)
    engine = RecordingEngine(model, encoding)
    assert generate(scripted_dir, engine, "hi", "--tools", "python") == 0
    out, err = capsys.readouterr()
    assert out == "Hi.\n" and err == "oss-mlx: note: python tool off: no sandbox for win32\n"
    assert "# Tools" not in encoding.decode(engine.rendered[0])

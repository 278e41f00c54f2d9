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


@pytest.mark.subprocess
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


@pytest.mark.subprocess
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


@pytest.mark.subprocess
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


class _SearchEndpoint:
    """A search endpoint on loopback (GET /search?q=&n= -> JSON results) whose one result is a
    page it serves itself (GET /tram28 -> HTML)."""

    def __enter__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        base = {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if urlparse(self.path).path == "/search":
                    body, kind = json.dumps({"results": [{
                        "title": "Tram 28", "url": base["url"] + "/tram28",
                        "snippet": "The tram to the castle."}]}), "application/json"
                else:
                    body, kind = ("<html><head><title>Tram 28</title></head><body><p>Tram 28 "
                                  "climbs from Martim Moniz to the castle.</p></body></html>",
                                  "text/html")
                self.send_response(200)
                self.send_header("content-type", kind)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base["url"] = self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_configured_search_endpoint(capsys, encoding, scripted_dir):
    from oss_mlx.tools import HttpJson

    turn = ['<|channel|>analysis to=browser.search code<|message|>{"query": "tram castle"}<|call|>',
            '<|channel|>analysis to=browser.open code<|message|>{"id": 0}<|call|>',
            "<|channel|>final<|message|>Tram 28 【1†L3】.<|return|>"]
    model = ScriptedModel(*turn, encoding=encoding)
    engine = RecordingEngine(model, encoding)
    with _SearchEndpoint() as web:
        assert generate(scripted_dir, engine, "Castle?", "--search-url", web.url + "/search") == 0
        oracle = Browser(HttpJson(web.url + "/search"), encoding=encoding)
        pages = [oracle.call("search", '{"query": "tram castle"}'),
                 oracle.call("open", '{"id": 0}')]
    out, _ = capsys.readouterr()
    host = web.url.split("//")[1]
    assert out == f"Tram 28  ([{host}]({web.url}/tram28)) .\n"
    assert "climbs from Martim Moniz to the castle" in pages[1]
    results = [("browser.search", pages[0]), ("browser.open", pages[1])]
    first = first_prompt(encoding, system(browser_config(oracle)), "Castle?")
    check_tool_prompts(encoding, engine.rendered, model.prompts, turn, results, first=first)
    assert "sources=web" in encoding.decode(engine.rendered[0])

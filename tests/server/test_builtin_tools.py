"""`oss-mlx serve --builtin-tools python,browser`: a Responses `code_interpreter` tool runs the
model's code here, Codex's `web_search` runs the browser over a folder of test documents.

Oracles: the openai package's own types, strictly, for every body and stream event
(serverkit.StrictTransport); openai-harmony's rendering of the tool messages the next prompt
must end with, token by token; an independent Browser over the same folder for the pages the
model is shown; the scripted replies themselves.
"""

from __future__ import annotations

import datetime
import logging

import httpx
import openai
import pytest
from openai_harmony import ReasoningEffort, SystemContent

from oss_mlx.server import create_app
from oss_mlx.server.builtin_tools import BuiltinTools
from oss_mlx.server.builtin_turn import BUSY
from oss_mlx.tools import Browser, LocalFolder, PythonSession, python_support
from oss_mlx.tools.toolbox import browser_config, python_config
from support.scripted import ScriptedModel
from support.serverkit import ServerThread, StrictTransport, sse_events
from support.tooluse import (BROWSE_TURN, PYTHON_RESULTS, PYTHON_TURN, RecordingEngine,
                             check_tool_prompts, first_prompt, write_notes)

MODEL = "scripted-oss"
CODE = {"type": "code_interpreter", "container": {"type": "auto"}}
needs_sandbox = pytest.mark.skipif(not python_support().available,
                                   reason=python_support().reason)


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    return write_notes(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="module")
def served(encoding, notes):
    model = ScriptedModel(encoding=encoding, max_context=32768)
    engine = RecordingEngine(model, encoding)
    tools = BuiltinTools(python=python_support().available, backend=LocalFolder(notes),
                         encoding=encoding, max_sessions=2)
    with ServerThread(create_app(engine, MODEL, builtin_tools=tools)) as srv:
        srv.model, srv.engine, srv.tools = model, engine, tools
        yield srv


@pytest.fixture
def srv(served):
    served.model.queue.clear()
    served.engine.rendered = []
    served.transport = StrictTransport()
    served.http = httpx.Client(base_url=served.url, transport=served.transport, timeout=60)
    yield served
    served.http.close()
    assert not served.transport.failures, served.transport.failures


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=srv.transport, timeout=60))


def system(tool):
    return (SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)
            .with_conversation_start_date(datetime.date.today().isoformat()).with_tools(tool))


@pytest.mark.subprocess
@needs_sandbox
def test_code_interpreter_runs_here(client, srv, encoding):
    for reply in PYTHON_TURN:
        srv.model.push(reply)
    r = client.responses.create(model=MODEL, input="What is 6*7+1?", tools=[CODE])
    assert [o.type for o in r.output] == ["reasoning", "code_interpreter_call",
                                          "code_interpreter_call", "message"]
    calls = r.output[1:3]
    assert [(c.code, [o.logs for o in c.outputs], c.status) for c in calls] == [
        ("x = 6 * 7\nprint(x)", ["42\n"], "completed"), ("print(x + 1)", ["43\n"], "completed")]
    assert calls[0].container_id == calls[1].container_id
    assert r.output_text == "It is 43." and r.status == "completed"

    # The outputs came back into the prompt as harmony tool messages, token by token.
    first = first_prompt(encoding, system(python_config(PythonSession())), "What is 6*7+1?")
    check_tool_prompts(encoding, srv.engine.rendered, srv.model.prompts[-3:], PYTHON_TURN,
                       PYTHON_RESULTS, first=first)
    # Usage counts every completion of the turn.
    sampled = sum(len(encoding.encode(t, allowed_special="all")) for t in PYTHON_TURN)
    assert r.usage.output_tokens == sampled
    assert r.usage.input_tokens == sum(map(len, srv.engine.rendered))

    # The next request continues the conversation: the same python session, its variables.
    srv.model.push("<|channel|>analysis to=python code<|message|>print(x * 2)<|call|>")
    srv.model.push("<|channel|>final<|message|>84.<|return|>")
    r2 = client.responses.create(model=MODEL, input="And twice x?", tools=[CODE],
                                 previous_response_id=r.id)
    assert r2.output[0].outputs[0].logs == "84\n" and r2.output_text == "84."
    assert r2.output[0].container_id == calls[0].container_id


@pytest.mark.subprocess
@needs_sandbox
def test_code_interpreter_streams_the_openai_events(srv):
    for reply in PYTHON_TURN:
        srv.model.push(reply)
    resp = srv.http.post("/v1/responses", json={"model": MODEL, "input": "6*7+1?",
                                                "tools": [CODE], "stream": True})
    events = sse_events(resp)
    ci = [e for e in events if "code_interpreter" in e["type"]
          or e.get("item", {}).get("type") == "code_interpreter_call"]
    first = [e["type"] for e in ci if e.get("output_index") == 1]
    deltas = first.count("response.code_interpreter_call_code.delta")
    assert deltas > 1  # the code streams as the model writes it
    assert first == (["response.output_item.added", "response.code_interpreter_call.in_progress"]
                     + ["response.code_interpreter_call_code.delta"] * deltas
                     + ["response.code_interpreter_call_code.done",
                        "response.code_interpreter_call.interpreting",
                        "response.code_interpreter_call.completed", "response.output_item.done"])
    code = "".join(e["delta"] for e in ci if e["type"].endswith("code.delta")
                   and e["output_index"] == 1)
    assert code == "x = 6 * 7\nprint(x)"
    done = [e["item"] for e in ci if e["type"] == "response.output_item.done"]
    assert [d["outputs"] for d in done] == [[{"type": "logs", "logs": "42\n"}],
                                            [{"type": "logs", "logs": "43\n"}]]
    final = events[-1]
    assert final["type"] == "response.completed"
    assert [o["type"] for o in final["response"]["output"]] == [
        "reasoning", "code_interpreter_call", "code_interpreter_call", "message"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


@pytest.mark.subprocess
@needs_sandbox
def test_a_stateless_client_sends_the_calls_back(client, srv, encoding):
    """store=false and the whole output sent back as input (as Codex does): the calls and
    results come back as the harmony messages they were, so the next prompt is exactly
    openai-harmony's rendering of the conversation (the finished turn's analysis, calls and
    results dropped)."""
    from openai_harmony import Conversation, Message, Role

    from oss_mlx.harmony import assistant_message, tool_result_message, user_message
    from oss_mlx.server.builtin_tools import python_call

    for reply in PYTHON_TURN:
        srv.model.push(reply)
    r = client.responses.create(model=MODEL, input="6*7+1?", tools=[CODE], store=False,
                                prompt_cache_key="conversation-1")
    srv.model.push("<|channel|>final<|message|>Yes.<|return|>")
    history = [{"role": "user", "content": "6*7+1?"},
               *[o.model_dump(exclude_none=True) for o in r.output],
               {"role": "user", "content": "Sure?"}]
    r2 = client.responses.create(model=MODEL, input=history, tools=[CODE], store=False,
                                 prompt_cache_key="conversation-1")
    assert r2.output_text == "Yes."
    conv = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system(python_config(PythonSession()))),
        user_message("6*7+1?"), assistant_message("Let me compute.", "analysis"),
        python_call("x = 6 * 7\nprint(x)"), tool_result_message("python", "42\n", "analysis"),
        python_call("print(x + 1)"), tool_result_message("python", "43\n", "analysis"),
        assistant_message("It is 43."), user_message("Sure?")])
    assert srv.engine.rendered[3] == encoding.render_conversation_for_completion(conv,
                                                                                 Role.ASSISTANT)
    # The prompt cache resumed at the boundary before the dropped analysis: what was computed
    # is the answer and the new question.
    assert encoding.decode(srv.model.prompts[-1]) == (
        "<|channel|>final<|message|>It is 43.<|end|><|start|>user<|message|>Sure?<|end|>"
        "<|start|>assistant")


def test_web_search_browses_the_folder(client, srv, encoding, notes):
    for reply in BROWSE_TURN:
        srv.model.push(reply)
    r = client.responses.create(model=MODEL, input="How do I get to the castle?",
                                tools=[{"type": "web_search"}])
    trip = (notes / "trip.md").resolve().as_uri()
    searches = [o for o in r.output if o.type == "web_search_call"]
    assert [s.action.model_dump(exclude_none=True) for s in searches] == [
        {"type": "search", "query": "tram castle", "sources": [{"type": "url", "url": trip}]},
        {"type": "open_page", "url": trip},
        {"type": "find_in_page", "pattern": "tram", "url": trip}]
    assert all(s.status == "completed" for s in searches)
    message = r.output[-1]
    link = f" ([trip.md]({trip})) "
    assert message.content[0].text == f"Take the tram 28 {link}."
    note = message.content[0].annotations[0]
    assert (note.type, note.url, note.title) == ("url_citation", trip, "trip.md")
    assert message.content[0].text[note.start_index:note.end_index] == link

    oracle = Browser(LocalFolder(notes), encoding=encoding)
    pages = [oracle.call("search", '{"query": "tram castle"}'), oracle.call("open", '{"id": 0}'),
             oracle.call("find", '{"pattern": "tram"}')]
    results = [(f"browser.{f}", p) for f, p in zip(("search", "open", "find"), pages)]
    first = first_prompt(encoding, system(browser_config(oracle)), "How do I get to the castle?")
    check_tool_prompts(encoding, srv.engine.rendered, srv.model.prompts[-4:], BROWSE_TURN,
                       results, first=first)


def test_web_search_streams_its_events_and_the_annotation(srv, notes):
    for reply in BROWSE_TURN:
        srv.model.push(reply)
    resp = srv.http.post("/v1/responses", json={"model": MODEL, "input": "Castle?",
                                                "tools": [{"type": "web_search"}],
                                                "stream": True})
    types = [e["type"] for e in sse_events(resp)]
    one = ["response.output_item.added", "response.web_search_call.in_progress",
           "response.web_search_call.searching", "response.web_search_call.completed",
           "response.output_item.done"]
    assert [t for t in types if "web_search" in t or t.startswith("response.output_item")][:15] \
        == one * 3
    assert types.count("response.output_text.annotation.added") == 1
    assert types.index("response.output_text.annotation.added") < types.index(
        "response.output_text.done")


def test_a_tool_the_server_does_not_run_is_left_out(client, srv, encoding, caplog):
    from oss_mlx.server import conversation

    conversation._unserved.discard("file_search")
    srv.model.push("<|channel|>final<|message|>Hi.<|return|>")
    with caplog.at_level(logging.WARNING, logger="oss_mlx.server"):
        r = client.responses.create(model=MODEL, input="hi", tools=[
            {"type": "file_search", "vector_store_ids": ["v"]}])
    assert r.output_text == "Hi." and "# Tools" not in encoding.decode(srv.engine.rendered[0])
    assert any("file_search" in rec.getMessage() for rec in caplog.records)


def test_without_the_flag_the_log_says_how_to_enable(caplog):
    from oss_mlx.server import conversation
    from oss_mlx.server.protocol import ResponsesRequest

    for kind in ("code_interpreter", "web_search"):
        conversation._unserved.discard(kind)
    req = ResponsesRequest(model=MODEL, input="x", tools=[CODE, {"type": "web_search"}])
    with caplog.at_level(logging.WARNING, logger="oss_mlx.server"):
        assert conversation.responses_tools(req) == []
    said = [r.getMessage() for r in caplog.records]
    assert ("the 'code_interpreter' tool runs on OpenAI's side and no backend for it is "
            "configured here: leaving it out of the prompt (`oss-mlx serve --builtin-tools "
            "python` runs it here)") in said
    assert any("`oss-mlx serve --builtin-tools browser --browse FOLDER` runs it here" in s
               for s in said)


# ---- sessions: one per conversation, a cap on live workers, an idle timeout ------------------


@pytest.mark.subprocess
@needs_sandbox
def test_live_workers_are_capped_and_idle_ones_closed(tmp_path):
    tools = BuiltinTools(python=True, max_sessions=1, idle_s=60)
    try:
        a = tools.acquire(["a"])
        assert tools.make_room(a) and a.python.run("x = 1").error is None and a.live
        b = tools.acquire(["b"])
        assert not tools.make_room(b)  # a is busy: no room, the call is told so
        tools.release(a, "resp_a")
        assert tools.make_room(b) and not a.live  # the idle one made room
        assert b.python.run("print('b')").text == "b\n"
        assert tools.acquire(["resp_a"]) is a  # its response id names the conversation
        tools.release(a)
        tools.release(b)
        b.used -= 61  # unused for longer than idle_s
        c = tools.acquire(["c"])
        assert not b.live and tools.acquire(["b"]) is not b  # closed and forgotten
        tools.release(c)
    finally:
        tools.close()


@pytest.mark.subprocess
@needs_sandbox
def test_a_busy_server_tells_the_model(client, srv, encoding):
    held = [srv.tools.acquire([f"held-{i}"]) for i in range(2)]
    try:
        for s in held:
            assert srv.tools.make_room(s) and s.python.run("0").error is None
        srv.model.push("<|channel|>analysis to=python code<|message|>print(1)<|call|>")
        srv.model.push("<|channel|>final<|message|>Busy.<|return|>")
        r = client.responses.create(model=MODEL, input="x", tools=[CODE])
        assert r.output[0].outputs[0].logs == BUSY and r.output_text == "Busy."
        assert BUSY in encoding.decode(srv.engine.rendered[1])
    finally:
        for s in held:
            srv.tools.release(s)


# ---- the command ------------------------------------------------------------------------------


@pytest.mark.subprocess
@needs_sandbox
def test_the_serve_command(tmp_path, notes):
    """`serve --builtin-tools python --browse FOLDER` (tests/support/serve_scripted.py: the real
    command on a scripted engine) says what it runs, runs it, and leaves no worker folder
    behind when it stops."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading

    from support import SUPPORT, child_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    replies = [x for r in PYTHON_TURN for x in ("--reply", r)]
    proc = subprocess.Popen(
        [sys.executable, str(SUPPORT / "serve_scripted.py"), "--port", str(port),
         "--builtin-tools", "python", "--browse", str(notes), *replies],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=child_env({**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}))
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        lines = []
        while "serving" not in (line := proc.stdout.readline()):
            assert line, f"serve exited: {''.join(lines)}"
            lines.append(line)
        said = (f"oss-mlx: built-in tools: python ({python_support().kind} sandbox) · browser "
                f"over {notes}, for the Responses requests that ask for code_interpreter or "
                "web_search\n")
        assert said in lines, lines
        transport = StrictTransport()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, http_client=httpx.Client(transport=transport,
                                                                       timeout=60))
        r = client.responses.create(model="scripted-oss", input="6*7+1?", tools=[CODE])
        assert [o.outputs[0].logs for o in r.output if o.type == "code_interpreter_call"] == [
            "42\n", "43\n"]
        assert r.output_text == "It is 43." and not transport.failures
        assert len(list(tmp.glob("oss-mlx-python-*"))) == 1  # the conversation's folder
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not list(tmp.glob("oss-mlx-python-*"))  # removed with its worker
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""The Responses API as Codex and the OpenAI types see it: every tool type, recorded Codex
traffic replayed, sealed reasoning, stored responses, and the wire defects of issue 11.

Oracles: the openai package's own types (every body and event, strictly, through
serverkit.StrictTransport); Codex's requests as the real CLI sent them (tests/traffic/codex-*.json,
recorded from codex-cli 0.171.0 against tests/serve_scripted.py); harmony's own rendering of the
expected prompt; the scripted replies themselves.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from support.scripted import ScriptedModel
from support import SUPPORT, child_env
from support.serverkit import ServerThread, StrictTransport, sse_events

from oss_mlx.engine import Engine
from oss_mlx.server import create_app

MODEL = "scripted-oss"
TRAFFIC = Path(__file__).parent / "traffic"

NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
             "tools": [{"type": "function", "name": "wait_agent", "description": "Wait.",
                        "strict": False,
                        "parameters": {"type": "object", "properties": {
                            "targets": {"type": "array", "items": {"type": "string"}}},
                            "required": ["targets"]}}]}
EXEC = {"type": "function", "name": "exec_command", "description": "Run a command.",
        "strict": False, "parameters": {"type": "object", "properties": {
            "cmd": {"type": "string"}}, "required": ["cmd"]}}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files.",
         "format": {"type": "grammar", "syntax": "lark",
                    "definition": 'start: "*** Begin Patch" /(.|\\n)*/ "*** End Patch"'}}

CALL_WAIT = ("<|channel|>analysis<|message|>Wait for the helper.<|end|><|start|>assistant"
             "<|channel|>commentary to=multi_agent_v1.wait_agent <|constrain|>json"
             '<|message|>{"targets": ["a1"]}<|call|>')
PATCH_TEXT = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
CALL_PATCH = ("<|channel|>analysis<|message|>Write the file.<|end|><|start|>assistant"
              "<|channel|>commentary to=functions.apply_patch <|constrain|>json<|message|>"
              + json.dumps(PATCH_TEXT) + "<|call|>")
CALL_SHELL = ("<|channel|>analysis<|message|>List them.<|end|><|start|>assistant"
              "<|channel|>commentary to=functions.local_shell <|constrain|>json"
              '<|message|>{"command": ["ls", "-la"], "working_directory": "/tmp"}<|call|>')
ANSWER = ("<|channel|>analysis<|message|>Done.<|end|><|start|>assistant<|channel|>final"
          "<|message|>All done.<|return|>")


@pytest.fixture(scope="module")
def scripted(encoding):
    model = ScriptedModel(encoding=encoding, max_context=32768)
    engine = Engine(model, encoding)
    with ServerThread(create_app(engine, MODEL)) as srv:
        srv.model, srv.engine = model, engine
        yield srv


@pytest.fixture
def srv(scripted):
    scripted.model.queue.clear()
    scripted.transport = StrictTransport()
    scripted.http = httpx.Client(base_url=scripted.url, transport=scripted.transport, timeout=60)
    yield scripted
    scripted.http.close()
    assert not scripted.transport.failures, scripted.transport.failures


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=srv.transport, timeout=60))


def last_prompt(srv) -> str:
    """The last request's prompt and completion (the tokens the prompt cache holds)."""
    return srv.model.encoding.decode(srv.engine.cached_tokens)


def full_prompt(srv) -> str:
    return last_prompt(srv)


def post_stream(srv, body: dict) -> list[dict]:
    r = srv.http.post("/v1/responses", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    return sse_events(r)


# ---- recorded Codex traffic, replayed -----------------------------------------------------


@pytest.mark.parametrize("name", ["codex-single.json", "codex-multi.json"])
def test_codex_recorded_session_replays(srv, name):
    rec = json.loads((TRAFFIC / name).read_text())
    previous = None
    for body, reply in zip((r["body"] for r in rec["requests"]), rec["replies"], strict=True):
        assert body["stream"] and "reasoning.encrypted_content" in body["include"]
        srv.model.push(reply)
        events = post_stream(srv, body)
        final = events[-1]
        assert final["type"] == "response.completed", final
        out = final["response"]["output"]
        assert final["response"]["parallel_tool_calls"] is True  # as Codex asked
        if "to=functions.exec_command" in reply:
            call = json.loads(reply.split("<|message|>")[-1].removesuffix("<|call|>"))
            assert [o["type"] for o in out] == ["reasoning", "function_call"]
            assert out[1]["name"] == "exec_command" and json.loads(out[1]["arguments"]) == call
            assert out[0]["encrypted_content"]
        else:
            text = reply.split("<|message|>")[-1].removesuffix("<|return|>")
            assert out[-1]["type"] == "message" and out[-1]["content"][0]["text"] == text
        prompt = srv.model.encoding.decode(srv.model.prompts[-1])
        usage = final["response"]["usage"]
        assert usage["input_tokens_details"]["cache_write_tokens"] == (
            usage["input_tokens"] - usage["input_tokens_details"]["cached_tokens"])
        if previous is not None and body["input"][-1]["type"] == "function_call_output":
            # Inside the tool loop the prompt extends the last one: Codex's items render back
            # the reasoning as the model wrote it, after the whole previous prompt (reused from
            # the cache but for its last token, where the engine keeps a snapshot).
            thought = reply_of_previous.split("<|message|>")[1].split("<|end|>")[0]
            assert f"<|end|><|start|>assistant<|channel|>analysis<|message|>{thought}<|end|>" \
                "<|start|>assistant<|channel|>commentary to=functions.exec_command" \
                in full_prompt(srv)
            assert usage["input_tokens_details"]["cached_tokens"] >= previous_input - 1
            assert prompt.endswith(f"<|message|>{body['input'][-1]['output']}<|end|>"
                                   "<|start|>assistant")
        previous, previous_input, reply_of_previous = True, usage["input_tokens"], reply
    full = srv.model.encoding.decode(srv.engine.cached_tokens)
    # Codex's namespace tool is a harmony namespace; web_search is left out of the prompt.
    assert "namespace multi_agent_v1 {" in full and "type wait_agent = " in full
    assert "namespace functions {" in full and "type exec_command = " in full
    assert "web_search" not in full
    assert "You are a coding agent running in the Codex CLI" in full  # developer items


# ---- every tool type ----------------------------------------------------------------------


def test_namespace_call_round_trip(client, srv):
    srv.model.push(CALL_WAIT)
    r = client.responses.create(model=MODEL, input="Wait for a1.", tools=[NAMESPACE, EXEC])
    call = r.output[1]
    assert call.type == "function_call" and call.name == "wait_agent"
    assert call.namespace == "multi_agent_v1" and json.loads(call.arguments) == {"targets": ["a1"]}
    srv.model.push(ANSWER)
    r2 = client.responses.create(model=MODEL, tools=[NAMESPACE, EXEC], input=[
        {"role": "user", "content": "Wait for a1."},
        *[o.model_dump(exclude_none=True) for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "a1 finished"}])
    assert r2.output_text == "All done."
    assert ("<|start|>assistant<|channel|>commentary to=multi_agent_v1.wait_agent "
            '<|constrain|>json<|message|>{"targets": ["a1"]}<|call|>'
            "<|start|>multi_agent_v1.wait_agent to=assistant<|channel|>commentary"
            "<|message|>a1 finished<|end|>") in last_prompt(srv)
    # Streamed, the call item carries its namespace from the start.
    srv.model.push(CALL_WAIT)
    events = post_stream(srv, {"model": MODEL, "input": "Wait.", "tools": [NAMESPACE]})
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[-1]["namespace"] == "multi_agent_v1"


def test_custom_tool_is_freeform(client, srv):
    srv.model.push(CALL_PATCH)
    r = client.responses.create(model=MODEL, input="Add a.txt", tools=[PATCH])
    call = r.output[1]
    assert call.type == "custom_tool_call" and call.name == "apply_patch"
    assert call.input == PATCH_TEXT
    prompt = last_prompt(srv)
    assert "type apply_patch = (_: string) => any;" in prompt and "*** Begin Patch" in prompt
    srv.model.push(CALL_PATCH)
    events = post_stream(srv, {"model": MODEL, "input": "Add a.txt", "tools": [PATCH]})
    types = [e["type"] for e in events]
    assert "response.custom_tool_call_input.done" in types
    (done,) = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert done["input"] == PATCH_TEXT
    srv.model.push(ANSWER)
    r2 = client.responses.create(model=MODEL, tools=[PATCH], input=[
        {"role": "user", "content": "Add a.txt"},
        *[o.model_dump(exclude_none=True) for o in r.output],
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"}])
    assert r2.output_text == "All done."
    assert ("<|channel|>commentary to=functions.apply_patch <|constrain|>json<|message|>"
            + json.dumps(PATCH_TEXT) + "<|call|><|start|>functions.apply_patch to=assistant"
            "<|channel|>commentary<|message|>Done!<|end|>") in last_prompt(srv)


def test_local_shell_call(client, srv):
    srv.model.push(CALL_SHELL)
    r = client.responses.create(model=MODEL, input="ls", tools=[{"type": "local_shell"}])
    call = r.output[1]
    assert call.type == "local_shell_call"
    assert call.action.command == ["ls", "-la"] and call.action.working_directory == "/tmp"
    srv.model.push(ANSWER)
    r2 = client.responses.create(model=MODEL, tools=[{"type": "local_shell"}], input=[
        {"role": "user", "content": "ls"},
        *[o.model_dump(exclude_none=True) for o in r.output],
        {"type": "local_shell_call_output", "call_id": call.call_id, "output": "a.txt"}])
    assert r2.output_text == "All done."
    prompt = last_prompt(srv)
    assert "type local_shell = " in prompt
    assert "<|start|>functions.local_shell to=assistant<|channel|>commentary<|message|>a.txt" in prompt


def test_hosted_tools_are_left_out_not_refused(client, srv):
    srv.model.push(ANSWER)
    r = client.responses.create(model=MODEL, input="Search.", tools=[
        {"type": "web_search"}, {"type": "web_search_preview"}, {"type": "file_search",
                                                                 "vector_store_ids": ["v"]}])
    assert r.output_text == "All done."
    prompt = last_prompt(srv)
    assert "# Tools" not in prompt and "search" not in prompt.split("<|start|>user")[0]
    r = srv.http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                             "tools": [{"type": "telepathy"}]})
    assert r.status_code == 400 and "telepathy" in r.json()["error"]["message"]


def test_hosted_tool_is_logged_once(caplog):
    from oss_mlx.server import conversation
    from oss_mlx.server.protocol import ResponsesRequest

    conversation._unserved.discard("web_search")
    req = ResponsesRequest(model=MODEL, input="x", tools=[{"type": "web_search"}, EXEC])
    with caplog.at_level("WARNING", logger="oss_mlx.server"):
        for _ in range(3):
            assert [t.name for t in conversation.responses_tools(req)] == ["exec_command"]
    assert [r.getMessage() for r in caplog.records].count(
        "the 'web_search' tool runs on OpenAI's side and no backend for it is configured here: "
        "leaving it out of the prompt (`oss-mlx serve --builtin-tools browser --browse FOLDER` "
        "runs it here)") == 1


def test_parallel_calls_sent_back_become_pairs(client, srv):
    srv.model.push(ANSWER)
    r = client.responses.create(model=MODEL, tools=[EXEC], parallel_tool_calls=True, input=[
        {"role": "user", "content": "Two things."},
        {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": '{"cmd": "a"}'},
        {"type": "function_call", "call_id": "c2", "name": "exec_command", "arguments": '{"cmd": "b"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "A"},
        {"type": "function_call_output", "call_id": "c2", "output": "B"}])
    assert r.parallel_tool_calls is True
    prompt = last_prompt(srv)
    assert prompt.index('{"cmd": "a"}') < prompt.index(">A<") < prompt.index('{"cmd": "b"}') \
        < prompt.index(">B<")
    srv.model.push(ANSWER)
    r = client.responses.create(model=MODEL, input="x", parallel_tool_calls=False)
    assert r.parallel_tool_calls is False


# ---- sealed reasoning and stored responses ------------------------------------------------


def test_encrypted_reasoning_is_restored_exactly(client, srv):
    srv.model.push(CALL_WAIT)
    r = client.responses.create(model=MODEL, input="Wait for a1.", tools=[NAMESPACE],
                                include=["reasoning.encrypted_content"], store=False)
    reasoning, call = r.output
    assert reasoning.encrypted_content
    thought = reasoning.content[0].text
    assert thought == "Wait for the helper."

    def follow_up(encrypted, content=None):
        srv.model.push(ANSWER)
        text = {"content": [{"type": "reasoning_text", "text": content}]} if content else {}
        # A stateless client: the reasoning item comes back with its sealed form only, and
        # the call ids are new to this server (nothing to recall them by).
        client.responses.create(model=MODEL, tools=[NAMESPACE], store=False, input=[
            {"role": "user", "content": "Wait for a1."},
            {"type": "reasoning", "id": reasoning.id, "summary": [],
             "encrypted_content": encrypted, **text},
            {"type": "function_call", "call_id": "fresh", "name": "wait_agent",
             "namespace": "multi_agent_v1", "arguments": call.arguments},
            {"type": "function_call_output", "call_id": "fresh", "output": "ok"}])
        return last_prompt(srv)

    assert ("<|start|>assistant<|channel|>analysis<|message|>Wait for the helper.<|end|>"
            "<|start|>assistant<|channel|>commentary to=multi_agent_v1.wait_agent"
            ) in follow_up(reasoning.encrypted_content)
    tampered = reasoning.encrypted_content[:-2] + ("A" if reasoning.encrypted_content[-2] != "A" else "B") \
        + reasoning.encrypted_content[-1]
    assert "Wait for the helper." not in follow_up(tampered)  # not ours: dropped, not trusted
    for junk in ("oss-mlx.1.\u2603.\u2603", "oss-mlx.1.", "gAAAAB-from-openai", ""):
        assert "Wait for the helper." not in follow_up(junk)  # never a 500
    # Sealed and plain text both sent: the sealed one is what the model wrote, it wins.
    assert "Wait for the helper." in follow_up(reasoning.encrypted_content, "Edited thought.")
    assert "Edited thought." in follow_up(tampered, "Edited thought.")
    srv.model.push(ANSWER)
    r = client.responses.create(model=MODEL, input="Hi")
    assert r.output[0].encrypted_content is None  # only when asked for


def test_store_and_previous_response_id(client, srv):
    srv.model.push(CALL_WAIT)
    r1 = client.responses.create(model=MODEL, input="Wait for a1.", tools=[NAMESPACE],
                                 instructions="Be brief.")
    assert client.responses.retrieve(r1.id).output[1].call_id == r1.output[1].call_id
    srv.model.push(ANSWER)
    r2 = client.responses.create(model=MODEL, tools=[NAMESPACE], previous_response_id=r1.id,
                                 input=[{"type": "function_call_output",
                                         "call_id": r1.output[1].call_id, "output": "a1 done"}])
    assert r2.previous_response_id == r1.id and r2.output_text == "All done."
    prompt = last_prompt(srv)
    assert "<|start|>user<|message|>Wait for a1.<|end|>" in prompt
    assert ("Wait for the helper.<|end|><|start|>assistant<|channel|>commentary"
            " to=multi_agent_v1.wait_agent") in prompt
    assert "Be brief." not in prompt  # instructions are not carried over (as OpenAI)
    # Not stored, unknown or deleted: a clear 400 / 404.
    srv.model.push(ANSWER)
    r3 = client.responses.create(model=MODEL, input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r3.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id=r3.id)
    assert e.value.code == "previous_response_not_found"
    client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r1.id)


def test_store_is_bounded():
    from oss_mlx.server.service import Memory

    m = Memory(3)
    for i in range(5):
        m.put(f"r{i}", i)
    assert len(m) == 3 and m.get("r0") is None and m.get("r1") is None and m.get("r4") == 4
    m.get("r2")
    m.put("r2", 2)  # touched: now the newest
    m.put("r5", 5)
    assert m.get("r3") is None and m.get("r2") == 2


@pytest.mark.parametrize("effort,harmony", [("none", "low"), ("minimal", "low"), ("low", "low"),
                                            ("high", "high"), ("xhigh", "high"),
                                            ("max", "high")])
def test_reasoning_effort(client, srv, effort, harmony):
    srv.model.push(ANSWER)
    r = client.responses.create(model=MODEL, input="x", reasoning={"effort": effort,
                                                                   "summary": "auto"})
    assert r.reasoning.effort == effort and r.reasoning.summary == "auto"
    assert f"\nReasoning: {harmony}\n" in last_prompt(srv)


# ---- wire defects -------------------------------------------------------------------------


def test_seed_range(client, srv):
    srv.model.push(ANSWER)
    r = client.chat.completions.create(model=MODEL, seed=-1,  # "random", as clients send it
                                       messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "All done."
    srv.model.push(ANSWER)
    assert client.responses.create(model=MODEL, input="x", extra_body={"seed": 2**64 - 1}).output_text
    for seed in (2**64, -2, -(2**70)):
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/responses", {"input": "x"})):
            r = srv.http.post(path, json={"model": MODEL, "seed": seed, **body})
            assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text


def test_405_names_the_allowed_methods(srv):
    r = srv.http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = srv.http.post("/v1/responses/resp_x")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}
    r = srv.http.post("/health")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_openapi_publishes_request_bodies(srv):
    doc = srv.http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, name, fields in (("/v1/chat/completions", "ChatRequest", {"messages", "tools"}),
                               ("/v1/responses", "ResponsesRequest",
                                {"input", "tools", "previous_response_id"})):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert ref == {"$ref": f"#/components/schemas/{name}"}
        assert fields <= set(schemas[name]["properties"])
    # Every reference resolves.
    refs = set()

    def walk(x):
        if isinstance(x, dict):
            if "$ref" in x:
                refs.add(x["$ref"].rsplit("/", 1)[-1])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    assert refs <= set(schemas)


SERVE = [sys.executable, str(SUPPORT / "serve_scripted.py"), "--port", "0"]


def _serve_then_stop(sig, streaming: bool):
    """Start the real command, answer one request, then stop it with `sig`, with a client
    streaming the long reply at that moment or not: exit status 0, no traceback."""
    import threading

    short = "<|channel|>final<|message|>ok<|return|>"
    long = "<|channel|>final<|message|>" + "la " * 5000 + "<|return|>"
    proc = subprocess.Popen([*SERVE, "--reply", short, "--reply", long],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**child_env(), "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        line = proc.stdout.readline()
        assert " at http" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        r = httpx.post(url + "/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.json()["choices"][0]["message"]["content"] == "ok"
        if streaming:  # a client streaming the long reply when the signal comes
            started = threading.Event()

            def read():
                with httpx.stream("POST", url + "/chat/completions", timeout=60, json={
                        "model": MODEL, "stream": True,
                        "messages": [{"role": "user", "content": "y"}]}) as s:
                    for line in s.iter_lines():
                        if line:
                            lines.append(line)
                            started.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert started.wait(60)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, (sig, streaming, proc.returncode, err)
    assert "Traceback" not in err and "terminate called" not in err, (sig, streaming, err)
    if streaming:
        reader.join(30)
        assert lines[-1] == "data: [DONE]" and len(lines) < 5000 * 2  # ended, and early


@pytest.mark.slow
@pytest.mark.subprocess
def test_serve_stops_cleanly_on_sigterm_and_sigint():
    """The real command stopped by SIGTERM and by SIGINT, idle and with a stream in flight: four
    servers, each its own process, two at a time (a child's start-up is CPU-bound: one per
    core), bounded. Each stop is exit status 0 with nothing on stderr but our own lines."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(sig, streaming) for streaming in (False, True)
             for sig in (signal.SIGTERM, signal.SIGINT)]
    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(_serve_then_stop, *case) for case in cases]:
            done.result()  # re-raises a case's failure


ODD_BODIES = [
    {"input": [{"type": "reasoning", "encrypted_content": None, "summary": []}]},
    {"input": [{"type": "function_call", "name": "f"}]},
    {"input": [{"type": "custom_tool_call_output", "call_id": "nope", "output": "x"}]},
    {"input": [{"type": "local_shell_call", "call_id": "c", "action": None},
               {"type": "local_shell_call_output", "call_id": "c", "output": "ok"}]},
    {"input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]},
    {"input": "x", "tools": [{"type": "namespace", "name": "n", "description": "d",
                              "tools": [{"type": "namespace", "name": "m", "tools": []}]}]},
    {"input": "x", "tools": [{"type": "namespace", "name": "n", "description": "d",
                              "tools": [PATCH]}]},
    {"input": "x", "tools": [{"type": "function"}]},
    {"input": "x", "tools": [{"type": "custom", "name": "c", "format": {"type": "text"}}],
     "tool_choice": {"type": "custom", "name": "c"}},
    {"input": "x", "tool_choice": {"type": "web_search_preview"},
     "tools": [{"type": "web_search_preview"}]},
    {"input": "x", "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                   "tools": [{"type": "function", "name": "exec_command"}]},
     "tools": [EXEC, NAMESPACE]},
    {"input": "x", "reasoning": {"effort": "ultra"}},
    {"input": "x", "include": ["reasoning.encrypted_content", "message.output_text.logprobs"],
     "store": False, "parallel_tool_calls": False, "prompt_cache_key": "k",
     "client_metadata": {"a": "b"}, "text": {"verbosity": "low"}},
]


@pytest.mark.parametrize("body", ODD_BODIES, ids=range(len(ODD_BODIES)))
def test_odd_requests_get_an_answer_or_a_4xx(srv, body):
    srv.model.push(ANSWER)
    r = srv.http.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"].startswith(("invalid request", "input", "tools"))

"""What `oss-mlx serve` refuses, and says so: a body over the limit (413, before it is read), a
wrong type for a boolean, integer or number (400 naming the field, never converted), a tool
whose `parameters` is not a JSON Schema (400 naming the tool); and the OpenAPI document lists
those error answers and the path parameters. Real HTTP to the real app on a ScriptedModel; every
body the clients read is checked against the openai types (serverkit.StrictTransport)."""

from __future__ import annotations

import json
import socket

import httpx
import jsonschema
import openai
import pytest
from support.scripted import ScriptedModel
from support.serverkit import ServerThread, StrictTransport

from oss_mlx.engine import Engine
from oss_mlx.server import create_app

MODEL = "scripted-oss"
LIMIT = 64_000
ANSWER = "<|channel|>final<|message|>Fine.<|return|>"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
RESPONSES = {"model": MODEL, "input": "Hi"}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def server(encoding):
    model = ScriptedModel(encoding=encoding, max_context=32768)
    app = create_app(Engine(model, encoding), MODEL, max_body=LIMIT)
    with ServerThread(app) as srv:
        srv.model = model
        yield srv


@pytest.fixture
def srv(server):
    server.model.queue.clear()
    server.model.push(ANSWER)  # so a request that is (wrongly) accepted is answered
    server.transport = StrictTransport()
    server.http = httpx.Client(base_url=server.url, transport=server.transport, timeout=60)
    yield server
    server.http.close()
    server.model.queue.clear()
    assert not server.transport.failures, server.transport.failures


def raw(srv, head: bytes, body_parts) -> bytes:
    """Send a request by hand (so it can stop half-way through its body); the answer's head
    and body, as much as arrives within the timeout."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def error_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


# ---- the body limit -------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(srv):
    """50 MB announced, 1 KB sent: the answer comes without the rest (a server that reads the
    whole body first would still be waiting)."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 50000000\r\n\r\n")
    status, err = error_of(raw(srv, head, [b"{" + b" " * 1023]))
    assert status == 413
    assert "50.0 MB" in err["message"] and "--max-body" in err["message"]
    assert err["code"] == "request_too_large"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(srv):
    """A chunked body (no length announced) is counted as it arrives and refused at the limit;
    its last chunk is never sent."""
    head = (b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    part = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    status, err = error_of(raw(srv, head, [part] * (LIMIT // 0x4000 + 2)))
    assert status == 413 and "over 64.0 KB" in err["message"]


def test_the_openai_client_reads_the_413(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(transport=srv.transport, timeout=60))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "word " * (LIMIT // 5)}])
    assert e.value.status_code == 413 and "--max-body" in e.value.message
    small = client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "word " * (LIMIT // 10)}])
    assert small.choices[0].message.content == "Fine."


# ---- strict types ---------------------------------------------------------------------------

WRONG_TYPES = [
    ("chat", {"stream": "yes"}, "stream"),
    ("chat", {"stream": 1}, "stream"),
    ("chat", {"max_tokens": 1.5}, "max_tokens"),
    ("chat", {"max_tokens": 2.0}, "max_tokens"),
    ("chat", {"max_tokens": "2"}, "max_tokens"),
    ("chat", {"max_completion_tokens": True}, "max_completion_tokens"),
    ("chat", {"n": True}, "n"),
    ("chat", {"seed": "7"}, "seed"),
    ("chat", {"temperature": "0.5"}, "temperature"),
    ("chat", {"top_p": False}, "top_p"),
    ("chat", {"stream": True, "stream_options": {"include_usage": "true"}},
     "stream_options.include_usage"),
    ("chat", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": WEATHER, "strict": "yes"}}]}, "tools.0.function.strict"),
    ("responses", {"store": 0}, "store"),
    ("responses", {"stream": "false"}, "stream"),
    ("responses", {"parallel_tool_calls": 1}, "parallel_tool_calls"),
    ("responses", {"max_output_tokens": 10.0}, "max_output_tokens"),
]


@pytest.mark.parametrize("api,fields,name", WRONG_TYPES,
                         ids=[f"{a}-{n}-{json.dumps(f)[:30]}" for a, f, n in WRONG_TYPES])
def test_a_wrong_type_is_a_400_naming_the_field(srv, api, fields, name):
    path, base = ("/v1/chat/completions", CHAT) if api == "chat" else ("/v1/responses", RESPONSES)
    r = srv.http.post(path, json={**base, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == name and f"invalid request: {name}: " in err["message"], err


def test_right_types_still_pass(srv):
    r = srv.http.post("/v1/chat/completions", json={**CHAT, "temperature": 1, "top_p": 1,
                                                     "max_tokens": 50, "stream": False,
                                                     "seed": -1, "n": 1})
    assert r.status_code == 200, r.text


# ---- tool schemas ---------------------------------------------------------------------------

NOT_SCHEMAS = [{"type": "frob"}, {"type": "object", "properties": 3},
               {"type": "object", "required": "city"}]


@pytest.mark.parametrize("params", NOT_SCHEMAS, ids=range(len(NOT_SCHEMAS)))
def test_a_tool_that_is_not_a_json_schema_is_a_400_naming_it(srv, params):
    chat = {**CHAT, "tools": [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
        {"type": "function", "function": {"name": "frobnicate", "parameters": params}}]}
    responses = {**RESPONSES, "tools": [
        {"type": "function", "name": "get_weather", "parameters": WEATHER},
        {"type": "namespace", "name": "lab", "description": "d", "tools": [
            {"type": "function", "name": "frobnicate", "parameters": params}]}]}
    for path, body, where in (("/v1/chat/completions", chat, "tools[1].function.parameters"),
                              ("/v1/responses", responses, "tools[1].tools[0].parameters")):
        r = srv.http.post(path, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "'frobnicate'" in err["message"] and "not a valid JSON Schema" in err["message"]
        assert err["param"] == where and err["code"] == "invalid_function_parameters"


def test_schemas_of_every_draft_clients_write_pass(srv):
    drafts = [WEATHER,
              {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
               "properties": {"pair": {"type": "array", "items": [{"type": "string"}]}},
               "additionalProperties": False},
              {"type": "object", "properties": {"when": {"type": ["string", "null"],
                                                         "format": "date-time"}}}]
    tools = [{"type": "function", "function": {"name": f"t{i}", "parameters": p}}
             for i, p in enumerate(drafts)]
    r = srv.http.post("/v1/chat/completions", json={**CHAT, "tools": tools})
    assert r.status_code == 200, r.text


# ---- the OpenAPI document -------------------------------------------------------------------


def test_openapi_lists_the_error_answers_and_path_parameters(srv):
    doc = srv.http.get("/openapi.json").json()
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    expected = {("/v1/chat/completions", "post"): {400, 401, 404, 405, 413, 500, 503},
                ("/v1/responses", "post"): {400, 401, 404, 405, 413, 500, 503},
                ("/v1/models", "get"): {401, 405, 500},
                ("/v1/models/{name}", "get"): {401, 404, 405, 500},
                ("/v1/responses/{response_id}", "get"): {401, 404, 405, 500},
                ("/v1/responses/{response_id}", "delete"): {401, 404, 405, 500}}
    for (path, method), statuses in expected.items():
        op = doc["paths"][path][method]
        errors = {int(s) for s in op["responses"] if s.startswith(("4", "5"))}
        assert errors == statuses, (path, method, errors)
        for s in statuses:
            answer = op["responses"][str(s)]
            assert answer["description"]
            assert answer["content"]["application/json"]["schema"] == ref, (path, s)
        params = {p["name"]: p for p in op.get("parameters", [])}
        for name in ("name", "response_id"):
            if "{" + name + "}" in path:
                assert params[name]["in"] == "path" and params[name]["required"]
    # The documented error object is the one the server sends.
    schemas = doc["components"]["schemas"]
    body = srv.http.post("/v1/responses", json={**RESPONSES, "store": 0}).json()
    # (refs point into the document: validate from a root that holds its components)
    jsonschema.validate(body, {"$ref": "#/components/schemas/ErrorResponse",
                               "components": {"schemas": schemas}})
    assert "HTTPValidationError" not in schemas  # FastAPI's 422, which this server never sends

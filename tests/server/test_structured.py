"""Structured outputs and constrained tool arguments through `oss-mlx serve` and the openai client.

The tiny random-weight model runs behind the real server; tests/constrained.py's Steered engine
forces the header (final channel or a tool call) and keeps the JSON short, after the server's own
constraint. Oracle: `jsonschema` on what the openai client received (its own types parse every
response and stream event).
"""

import json

import jsonschema
import openai
import pytest
from support.constrained import FINAL, WEATHER_CALL, Steered
from test_constrain import SCHEMAS, WEATHER_SCHEMA, validate
from support.serverkit import ServerThread

from oss_mlx.harmony import load_encoding
from oss_mlx.model import load
from oss_mlx.server import create_app

MODEL = "tiny-steered"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": WEATHER_SCHEMA}}
USER = [{"role": "user", "content": "Weather in Oslo, as JSON."}]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Steered(load(tiny_model), load_encoding(tiny_model))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, MODEL)) as srv:
        yield srv


@pytest.fixture
def client(server, engine):
    engine.prefix = FINAL
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_format(name):
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def prompt_text(engine) -> str:
    return engine.encoding.decode(engine.cached_tokens)


@pytest.mark.parametrize("name", ["nested", "enums"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema(client, engine, name, stream):
    kw = dict(model=MODEL, messages=USER, response_format=chat_format(name), max_tokens=120,
              seed=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    validate(text, SCHEMAS[name])
    assert f"# Response Formats\n\n## {name}\n\n" in prompt_text(engine)  # the model is told


def test_chat_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=120, seed=1,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format(client, stream):
    fmt = {"type": "json_schema", "name": "arrays", "schema": SCHEMAS["arrays"], "strict": True}
    kw = dict(model=MODEL, input="Tags as JSON.", text={"format": fmt}, max_output_tokens=120,
              extra_body={"seed": 2})
    if stream:
        events = list(client.responses.create(stream=True, **kw))
        final = events[-1].response
        assert events[-1].type == "response.completed"
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == final.output_text
    else:
        final = client.responses.create(**kw)
    assert final.status == "completed"
    assert final.text.format.type == "json_schema"
    validate(final.output_text, SCHEMAS["arrays"])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_arguments_validate(client, engine, stream):
    engine.prefix = WEATHER_CALL
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], max_tokens=120, seed=3)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                       for tc in c.choices[0].delta.tool_calls or [])
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.chat.completions.create(**kw)
        (call,) = r.choices[0].message.tool_calls
        args, finish = call.function.arguments, r.choices[0].finish_reason
    assert finish == "tool_calls"
    validate(args, WEATHER_SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_arguments_validate(client, engine, stream):
    engine.prefix = WEATHER_CALL
    tool = {"type": "function", **WEATHER["function"]}
    kw = dict(model=MODEL, input="Weather in Oslo?", tools=[tool], max_output_tokens=120,
              extra_body={"seed": 4})
    if stream:
        events = list(client.responses.create(stream=True, **kw))
        r = events[-1].response
        deltas = "".join(e.delta for e in events
                         if e.type == "response.function_call_arguments.delta")
    else:
        r = client.responses.create(**kw)
    (call,) = [o for o in r.output if o.type == "function_call"]
    if stream:
        assert deltas == call.arguments
    assert call.name == "get_weather"
    validate(call.arguments, WEATHER_SCHEMA)


def test_no_constrain_tools_leaves_arguments_free(engine):
    """`serve --no-constrain-tools`: the same steering now writes arguments that do not parse."""
    engine.prefix = WEATHER_CALL
    with ServerThread(create_app(engine, MODEL, constrain_tools=False)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER],
                                           max_tokens=40, seed=3)
    calls = r.choices[0].message.tool_calls or []
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError, IndexError)):
        validate(calls[0].function.arguments, WEATHER_SCHEMA)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_unsupported_schema_is_a_400_naming_the_keyword(client, api):
    schema = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        if api == "chat":
            client.chat.completions.create(model=MODEL, messages=USER, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        else:
            client.responses.create(model=MODEL, input="x", text={"format": {
                "type": "json_schema", "name": "x", "schema": schema}})
    err = e.value.body
    assert "'uniqueItems'" in err["message"] and err["code"] == "unsupported_schema"
    assert err["param"] == ("response_format" if api == "chat" else "text.format")


def test_strict_tool_with_unsupported_keyword_is_a_400(client):
    tool = json.loads(json.dumps(WEATHER))
    tool["function"]["strict"] = True
    tool["function"]["parameters"]["properties"]["city"]["not"] = {"const": "x"}
    with pytest.raises(openai.BadRequestError, match="'not'"):
        client.chat.completions.create(model=MODEL, messages=USER, tools=[tool], max_tokens=8)

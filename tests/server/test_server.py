"""`oss-mlx serve` through the real `openai` client over loopback HTTP.

Random-weight models never decide to call a tool, so most tests drive the real engine, harmony
parser and HTTP layers with ScriptedModel, which replays exact harmony token streams (a tool call,
analysis then final, a malformed stream). The expected answers are the scripted texts themselves,
and the expected prompts are harmony's own renderings (docs/harmony.md §5.3-5.5). One test runs the tiny
synthetic model end to end.
"""

import json
import socket

import httpx
import openai
import pytest
from support.scripted import ScriptedModel
from support.serverkit import JobLog, ServerThread, StrictTransport, gated

from oss_mlx.engine import Engine
from oss_mlx.server import create_app
from oss_mlx.server.wire import StopFilter

MODEL = "scripted-oss"
KEY = "sk-test-key"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
FLAT_WEATHER = {"type": "function", **WEATHER["function"]}

THINK_THEN_ANSWER = ("<|channel|>analysis<|message|>The user greets me.<|end|>"
                     "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>")
CALL_WEATHER = ("<|channel|>analysis<|message|>Need the weather tool.<|end|>"
                "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                '<|message|>{"city": "Paris"}<|call|>')
ANSWER_WEATHER = ("<|channel|>analysis<|message|>It is sunny.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Sunny, 20 degrees in Paris.<|return|>")


Gated = gated(ScriptedModel)


@pytest.fixture(scope="module")
def scripted(encoding):
    model = Gated(encoding=encoding, max_context=2048)
    engine = Engine(model, encoding)
    app = create_app(engine, MODEL)
    with ServerThread(app) as srv:
        srv.model, srv.engine, srv.service = model, engine, app.state.service
        yield srv


@pytest.fixture
def srv(scripted):
    scripted.model.queue.clear()
    scripted.model.free()
    scripted.jobs = JobLog(scripted.service.scheduler)
    scripted.transport = StrictTransport()
    scripted.http = httpx.Client(base_url=scripted.url, transport=scripted.transport, timeout=60)
    yield scripted
    scripted.model.free()
    scripted.jobs.close()
    scripted.model.queue.clear()
    scripted.http.close()
    assert not scripted.transport.failures, scripted.transport.failures


def strict_client(srv, **kw) -> openai.OpenAI:
    """An openai client whose every answer is checked against the openai types (serverkit)."""
    kw = {"api_key": "unused", "max_retries": 0, "timeout": 60, **kw}
    return openai.OpenAI(base_url=srv.url + "/v1", **kw,
                         http_client=httpx.Client(transport=srv.transport, timeout=kw["timeout"]))


@pytest.fixture
def client(srv):
    return strict_client(srv)


def prompt_text(srv) -> str:
    """What the engine was last given (prompt + completion), decoded with its special tokens."""
    return srv.model.encoding.decode(srv.engine.cached_tokens)


def no_markup(text):
    assert text is None or ("<|" not in text and "|>" not in text), text


# ---- plumbing ---------------------------------------------------------------------------------


def test_models_and_health(client, srv):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert srv.http.get("/health").json()["status"] == "ok"


def test_stop_filter_holds_back_partial_matches():
    f = StopFilter(["END"])
    assert f.feed("abc E") == "abc "  # "E" may begin "END": held back
    assert f.feed("x") == "Ex"
    assert f.feed("yEN") == "y"
    assert f.feed("Dzz") == "" and f.hit
    assert f.flush() == ""
    g = StopFilter(["ab", "b!"])
    assert g.feed("xa") == "x" and g.feed("c") == "ac" and g.flush() == ""


# ---- chat completions -------------------------------------------------------------------------


def test_chat_plain(client, srv):
    srv.model.push(THINK_THEN_ANSWER)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be kind."},
                               {"role": "user", "content": "Hi"}])
    choice = r.choices[0]
    assert choice.message.content == "Hello! How can I help?"
    assert choice.message.reasoning_content == "The user greets me."
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    # The system message became developer instructions; the default effort is medium.
    prompt = prompt_text(srv)
    assert "<|start|>developer<|message|># Instructions\n\nBe kind.<|end|>" in prompt
    assert "\nReasoning: medium\n" in prompt
    assert prompt.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant"
                           "<|channel|>analysis<|message|>The user greets me.<|end|>"
                           "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?")
    completion_tokens = len(srv.model.encoding.encode(THINK_THEN_ANSWER, allowed_special="all"))
    assert r.usage.completion_tokens == completion_tokens
    assert r.usage.prompt_tokens + completion_tokens == r.usage.total_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_chat_streamed_with_usage(client, srv):
    srv.model.push(THINK_THEN_ANSWER)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    assert content == "Hello! How can I help?" and reasoning == "The user greets me."
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_chat_raw_sse_ends_with_done(srv):
    srv.model.push(THINK_THEN_ANSWER)
    with srv.http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        no_markup(json.dumps(json.loads(ln[6:])["choices"][0]["delta"]))


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_reaches_system_prompt(client, srv, effort):
    srv.model.push(THINK_THEN_ANSWER)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                   reasoning_effort=effort)
    assert f"\nReasoning: {effort}\n" in prompt_text(srv)


def test_chat_tool_call_round_trip(client, srv):
    srv.model.push(CALL_WEATHER)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "Need the weather tool."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The tools were rendered as a harmony `functions` namespace (docs/harmony.md §5.4).
    prompt = prompt_text(srv)
    assert ("namespace functions {\n\n// Current weather in a city.\ntype get_weather = (_: {\n"
            "city: string,\n}) => any;\n\n} // namespace functions") in prompt
    assert "Calls to these tools must go to the commentary channel: 'functions'." in prompt

    # Send the call back with its result, as a client does; the reasoning of the tool chain in
    # progress goes back too (docs/harmony.md §5.7 keeps it until a final answer).
    messages += [
        {"role": "assistant", "content": None, "reasoning_content": "Need the weather tool.",
         "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sunny": true, "temp": 20}'},
    ]
    srv.model.push(ANSWER_WEATHER)
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == "Sunny, 20 degrees in Paris."
    prompt = prompt_text(srv)
    # (the call as the model wrote it, channel before recipient: exact token history)
    assert ("<|start|>user<|message|>Weather in Paris?<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>Need the weather tool.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
            '<|message|>{"city": "Paris"}<|call|>'
            "<|start|>functions.get_weather to=assistant<|channel|>commentary"
            '<|message|>{"sunny": true, "temp": 20}<|end|><|start|>assistant') in prompt
    # The conversation grew: the engine reused its cache for the shared prefix.
    assert r2.usage.prompt_tokens_details.cached_tokens > 100


def test_reasoning_of_a_tool_call_is_restored_when_the_client_drops_it(client, srv):
    # Most clients send back the tool call without its reasoning; the server remembers it, so
    # the model keeps its plan (docs/harmony.md §5.7) and the prompt still matches what it generated.
    srv.model.push(CALL_WEATHER)
    r = client.chat.completions.create(model=MODEL, tools=[WEATHER],
                                       messages=[{"role": "user", "content": "Weather?"}])
    call = r.choices[0].message.tool_calls[0]
    srv.model.push(ANSWER_WEATHER)
    client.chat.completions.create(model=MODEL, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert ("<|start|>user<|message|>Weather?<|end|><|start|>assistant<|channel|>analysis"
            "<|message|>Need the weather tool.<|end|><|start|>assistant<|channel|>commentary"
            " to=functions.get_weather") in prompt_text(srv)  # the call as sampled

    srv.model.push(CALL_WEATHER)
    r = client.responses.create(model=MODEL, input="Weather?", tools=[FLAT_WEATHER])
    fc = r.output[-1]
    srv.model.push(ANSWER_WEATHER)
    client.responses.create(model=MODEL, tools=[FLAT_WEATHER], input=[
        {"role": "user", "content": "Weather?"}, fc.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}])
    assert "<|channel|>analysis<|message|>Need the weather tool.<|end|>" in prompt_text(srv)
    # An unknown call id has nothing to restore, and a finished turn still drops it.
    srv.model.push(THINK_THEN_ANSWER)
    client.chat.completions.create(model=MODEL, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"}])
    assert "Need the weather tool." not in prompt_text(srv)


def test_call_token_is_a_stop(client, srv):
    # What a model may write after <|call|> (an invented tool result) is never generated.
    invented = ("<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
                '{"sunny": false}<|end|><|start|>assistant<|channel|>final<|message|>Rain.<|return|>')
    srv.model.push(CALL_WEATHER + invented)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}],
                                       tools=[WEATHER])
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert r.usage.completion_tokens == len(
        srv.model.encoding.encode(CALL_WEATHER, allowed_special="all"))


def test_growing_conversation_reuses_the_prompt_cache(client, srv):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    srv.model.push(THINK_THEN_ANSWER)
    r1 = client.chat.completions.create(model=MODEL, messages=history)
    history += [{"role": "assistant", "content": r1.choices[0].message.content},
                {"role": "user", "content": "And now?"}]
    srv.model.push(THINK_THEN_ANSWER)
    r2 = client.chat.completions.create(model=MODEL, messages=history)
    # Everything up to the end of turn 1's prompt is reused (its analysis is dropped, docs/harmony.md §5.7).
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens


def test_chat_tool_call_streamed(client, srv):
    srv.model.push(CALL_WEATHER)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
        tool_choice="auto", stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas)
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_renders_no_tools(client, srv):
    srv.model.push(THINK_THEN_ANSWER)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                   tools=[WEATHER], tool_choice="none")
    prompt = prompt_text(srv)
    assert "get_weather" not in prompt and "namespace functions" not in prompt


def test_tool_choice_named_renders_that_tool(client, srv):
    other = {"type": "function", "function": {"name": "get_time", "description": "Time."}}
    srv.model.push(CALL_WEATHER)
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[other, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    prompt = prompt_text(srv)
    assert "type get_weather" in prompt and "get_time" not in prompt
    with pytest.raises(openai.BadRequestError, match="nope"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}})


def test_tool_call_on_analysis_channel_is_still_a_call(client, srv):
    # gpt-oss sometimes writes the call on analysis; it must not end up in the reasoning.
    srv.model.push('<|channel|>analysis to=functions.get_weather <|constrain|>json'
                   '<|message|>{"city": "Oslo"}<|call|>')
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}],
                                       tools=[WEATHER])
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert not r.choices[0].message.reasoning_content


def test_finished_turns_drop_their_reasoning(client, srv):
    srv.model.push(THINK_THEN_ANSWER)
    client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "OLD THOUGHT"},
        {"role": "user", "content": "Again"}])
    prompt = prompt_text(srv)
    assert "OLD THOUGHT" not in prompt
    assert "<|start|>assistant<|channel|>final<|message|>Hello.<|end|>" in prompt


def test_malformed_stream_keeps_what_was_parsed(client, srv):
    # A control token in the middle of the answer: the parser stops there, nothing leaks.
    bad = ("<|channel|>analysis<|message|>Thinking.<|end|><|start|>assistant<|channel|>final"
           "<|message|>Partial answer<|channel|>final<|message|>junk<|return|>")
    srv.model.push(bad)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}])
    assert r.choices[0].message.content == "Partial answer"
    assert r.choices[0].message.reasoning_content == "Thinking."
    # ... and says the turn was cut: content_filter, not a clean "stop".
    assert r.choices[0].finish_reason == "content_filter"
    srv.model.push(bad)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "?"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Partial answer"
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    srv.model.push(bad)
    resp = client.responses.create(model=MODEL, input="?")
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "content_filter"
    assert resp.output_text == "Partial answer"
    srv.model.push(bad)
    events = list(client.responses.create(model=MODEL, input="?", stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    # A stray stop token after a complete answer is a normal end, not an error.
    srv.model.push("<|channel|>final<|message|>Done.<|end|><|return|>")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}])
    assert r.choices[0].message.content == "Done." and r.choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client, srv):
    srv.model.push(THINK_THEN_ANSWER)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    srv.model.push(THINK_THEN_ANSWER)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=5,
        stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_tool_call_cut_by_max_tokens_is_not_a_call(client, srv):
    n = len(srv.model.encoding.encode(CALL_WEATHER, allowed_special="all"))
    srv.model.push(CALL_WEATHER)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}],
                                       tools=[WEATHER], max_tokens=n - 3)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls is None
    srv.model.push(CALL_WEATHER)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "?"}], tools=[WEATHER],
        max_tokens=n - 3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"  # the partial arguments are cut
    srv.model.push(CALL_WEATHER)
    events = list(client.responses.create(model=MODEL, input="?", tools=[FLAT_WEATHER],
                                          max_output_tokens=n - 3, stream=True))
    assert events[-1].type == "response.incomplete"
    (cut,) = [e.item for e in events if e.type == "response.output_item.done"
              and e.item.type == "function_call"]
    assert cut.status == "incomplete"
    srv.model.push(CALL_WEATHER)
    r = client.responses.create(model=MODEL, input="?", tools=[FLAT_WEATHER],
                                max_output_tokens=n - 3)
    assert r.status == "incomplete" and [o.type for o in r.output] == ["reasoning"]


def test_stop_strings_cut_the_answer(client, srv):
    srv.model.push("<|channel|>final<|message|>one two three four five six seven<|return|>")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}],
                                       stop=[" four", "zzz"])
    assert r.choices[0].message.content == "one two three"
    assert r.choices[0].finish_reason == "stop"
    srv.model.push("<|channel|>final<|message|>one two three four five six seven<|return|>")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "?"}], stop=" four", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- responses --------------------------------------------------------------------------------


def test_responses_plain(client, srv):
    srv.model.push(THINK_THEN_ANSWER)
    r = client.responses.create(model=MODEL, input="Hi", instructions="Be kind.",
                                reasoning={"effort": "high"})
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user greets me."
    assert r.output_text == "Hello! How can I help?"
    assert r.usage.output_tokens > 0 and r.usage.output_tokens_details.reasoning_tokens > 0
    prompt = prompt_text(srv)
    assert "\nReasoning: high\n" in prompt and "# Instructions\n\nBe kind." in prompt


def test_responses_tool_call_round_trip(client, srv):
    srv.model.push(CALL_WEATHER)
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[FLAT_WEATHER])
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert "type get_weather" in prompt_text(srv)

    srv.model.push(ANSWER_WEATHER)
    r2 = client.responses.create(model=MODEL, tools=[FLAT_WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        *[o.model_dump(exclude_none=True) for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sunny": true}'},
    ])
    assert r2.output_text == "Sunny, 20 degrees in Paris."
    prompt = prompt_text(srv)
    assert ("<|start|>assistant<|channel|>analysis<|message|>Need the weather tool.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
            '<|message|>{"city": "Paris"}<|call|><|start|>functions.get_weather to=assistant'
            '<|channel|>commentary<|message|>{"sunny": true}<|end|><|start|>assistant') in prompt


def test_responses_streamed_events(client, srv):
    srv.model.push(CALL_WEATHER)
    events = list(client.responses.create(model=MODEL, input="Weather?", tools=[FLAT_WEATHER],
                                          stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.reasoning_text.delta" in types
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["reasoning", "function_call"]
    assert [o.type for o in events[-1].response.output] == ["reasoning", "function_call"]

    srv.model.push(THINK_THEN_ANSWER)
    events = list(client.responses.create(model=MODEL, input="Hi", stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello! How can I help?"
    assert events[-1].response.output_text == text
    (done_text,) = [e.text for e in events if e.type == "response.output_text.done"]
    assert done_text == text


def test_responses_max_output_tokens_is_incomplete(client, srv):
    srv.model.push(THINK_THEN_ANSWER)
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


# ---- errors -----------------------------------------------------------------------------------


def test_context_overflow_is_400(client, srv):
    long = "word " * 3000  # > 2048 tokens, the scripted model's context
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}])
    assert e.value.code == "context_length_exceeded"
    assert e.value.body["type"] == "invalid_request_error" and "2048" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=long)
    assert e.value.code == "context_length_exceeded"


def test_bad_requests_are_4xx_with_clear_messages(client, srv):
    post = srv.http.post
    r = post("/v1/chat/completions", content=b'{"model": "x", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", json={"model": MODEL, "messages": "hello"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard",
                                                                          "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", json={"model": MODEL, "max_tokens": "ten",
                                           "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    r = post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "tool", "tool_call_id": "call_x", "content": "{}"}]})
    assert r.status_code == 400 and "call_x" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    r = post("/v1/responses", json={"model": MODEL, "input": [{"type": "telepathy"}]})
    assert r.status_code == 400 and "telepathy" in r.json()["error"]["message"]
    r = post("/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found" and MODEL in e.value.body["message"]
    # Nothing above reached the engine, and it still serves.
    srv.model.push(THINK_THEN_ANSWER)
    assert client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}]).choices[0].message.content


def test_api_key_required(encoding):
    model = ScriptedModel(encoding=encoding)
    with ServerThread(create_app(Engine(model, encoding), MODEL, api_key=KEY)) as s:
        s.transport = StrictTransport()
        http = httpx.Client(base_url=s.url, transport=s.transport)
        r = http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = strict_client(s, api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert http.get("/health").status_code == 200  # liveness needs no key
        good = strict_client(s, api_key=KEY)
        model.push(THINK_THEN_ANSWER)
        r = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content == "Hello! How can I help?"
        assert [m.id for m in good.models.list()] == [MODEL]
        assert not s.transport.failures, s.transport.failures


LONG = "<|channel|>final<|message|>" + "la " * 600 + "<|return|>"


def steps_after(srv, request: int, job) -> int:
    """Let the held engine go once `job` is cancelled; the decode steps request `request` took
    after that (the next request runs only once it has ended)."""
    assert job.cancel.wait(10), "the server did not notice the client leave"
    at_cancel = srv.model.steps.get(request, 0)
    srv.model.free()
    srv.model.push(THINK_THEN_ANSWER)
    r = srv.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["choices"][0]["message"]["content"] == "Hello! How can I help?"
    return srv.model.steps[request] - at_cancel


def test_disconnect_cancels_generation(client, srv):
    # A streaming client that leaves after three words: its generation stops at the next step.
    srv.model.hold()
    srv.model.allow(10)  # the header and a few words, then the engine waits
    srv.model.push(LONG)
    request = len(srv.model.prompts)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sing"}], stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    stream.close()
    assert steps_after(srv, request, srv.jobs.wait(1)) <= 1

    # A non-streaming client that hangs up mid-generation is cancelled too.
    srv.model.hold()
    srv.model.allow(5)
    srv.model.push(LONG)
    request = len(srv.model.prompts)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body))
        job = srv.jobs.wait(3)  # jobs 1 (the streaming one) and 2 (the follow-up) came before
    assert steps_after(srv, request, job) <= 1


def test_client_leaving_while_queued_is_never_run(client, srv):
    srv.model.hold()
    srv.model.push("<|channel|>final<|message|>" + "la " * 300 + "<|return|>")  # A, running
    srv.model.push("<|channel|>final<|message|>B never runs<|return|>")           # B, queued
    requests_before = len(srv.model.prompts)
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                       stream=True)
    next(iter(a))
    job_a = srv.jobs.wait(1)
    b = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "b"}],
                                       stream=True)
    assert next(iter(b)).choices[0].delta.role == "assistant"  # accepted, waiting its turn
    job_b = srv.jobs.wait(2)
    b.close()
    assert job_b.cancel.wait(10)  # the server saw B leave while A still runs
    a.close()
    assert job_a.cancel.wait(10)
    srv.model.queue.clear()  # drop B's reply: if B ran after all, C would find none
    srv.model.free()
    srv.model.push("<|channel|>final<|message|>C<|return|>")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "c"}])
    assert r.choices[0].message.content == "C"
    assert len(srv.model.prompts) - requests_before == 2  # A and C reached the model, B did not


def test_engine_failure_is_reported_not_fatal(client, srv):
    # No reply queued: ScriptedModel raises inside the engine, as a real failure would.
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "server_error" and "generation failed" in e.value.body["message"]
    with pytest.raises(openai.APIError, match="generation failed"):
        list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True))
    events = list(client.responses.create(model=MODEL, input="x", stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "error",
                                        "response.failed"]
    assert "generation failed" in events[2].message
    assert events[3].response.status == "failed"
    srv.model.push(THINK_THEN_ANSWER)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content == "Hello! How can I help?"


def test_requests_are_served_in_order(client, srv):
    from concurrent.futures import ThreadPoolExecutor

    srv.model.hold()  # request 0 holds the engine while 1, 2 and 3 arrive, in that order
    for i in range(4):
        srv.model.push(f"<|channel|>final<|message|>answer {i}<|return|>")

    def ask(i):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}]).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        futures = []
        for i in range(4):
            futures.append(pool.submit(ask, i))
            srv.jobs.wait(i + 1)  # request i is queued before request i + 1 is sent
        srv.model.free()
        answers = [f.result(timeout=60) for f in futures]
    assert answers == [f"answer {i}" for i in range(4)]  # FIFO: replies were queued in order
    prompts = [srv.model.encoding.decode(p) for p in srv.model.prompts[-4:]]
    assert [f"q{i}" in p for i, p in enumerate(prompts)] == [True] * 4


# ---- the tiny synthetic model, end to end -----------------------------------------------------


@pytest.mark.slow
def test_tiny_model_end_to_end(tiny_model):
    engine = Engine.load(str(tiny_model))
    with ServerThread(create_app(engine, "tiny")) as s:
        transport = StrictTransport()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120,
                          http_client=httpx.Client(transport=transport, timeout=120))
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                      max_tokens=8, temperature=0, seed=1)
        assert r.choices[0].finish_reason in ("length", "stop")
        assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 20
        no_markup(r.choices[0].message.content)
        no_markup(r.choices[0].message.reasoning_content)
        chunks = list(c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
            temperature=0, seed=1, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        # Greedy decoding: the streamed text equals the non-streamed one.
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == (r.choices[0].message.content or "")
        resp = c.responses.create(model="tiny", input="Hi", max_output_tokens=8, temperature=0)
        assert resp.status in ("completed", "incomplete") and resp.usage.output_tokens <= 8

        # A top_p that is 0 in float32 keeps only the top token: greedy, whatever the seed.
        def answer(**kw):  # the sampled tokens (random weights write no harmony text)
            c.chat.completions.create(model="tiny", max_tokens=8, messages=[
                {"role": "user", "content": "Hi"}], **kw)
            return engine.cached_tokens

        greedy = answer(temperature=0)
        assert all(answer(temperature=1, top_p=1e-50, seed=k) == greedy for k in (1, 2, 3))
        # (while sampling at temperature 1 does depend on the seed: the check can tell)
        assert any(answer(temperature=1, seed=k) != greedy for k in (1, 2, 3))
    assert not transport.failures, transport.failures


# ---- the command ------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_serve_command_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    def serve(*args):
        r = subprocess.run([sys.executable, "-m", "oss_mlx.cli", "serve", *args],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr.strip()

    rc, err = serve("--model", str(tmp_path / "missing"), "--port", "0")
    assert rc == 1 and err.startswith("oss-mlx: error: ") and "\n" not in err
    assert "missing" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc, err = serve("--model", str(tmp_path), "--port", str(taken.getsockname()[1]))
    assert rc == 1 and err.startswith("oss-mlx: error: cannot listen on 127.0.0.1:")
    assert "\n" not in err

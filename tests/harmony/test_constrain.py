"""Grammar-constrained decoding (oss_mlx.constrain) through the real engine.

Oracle: the `jsonschema` package validates every constrained output against its schema (with its
format checker); the harmony token streams are written out by hand from docs/harmony.md §5.5. The tiny
random-weight model is steered into the final channel or a tool call by a forced header and kept
short by a bias applied after the constraint (tests/constrained.py says why that leaves the
constraint the only thing deciding which tokens are possible).
"""

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from support.constrained import FINAL, WEATHER_CALL, Forced, short_json_bias, tokens

from oss_mlx.harmony import constrain
from oss_mlx.server import constraints
from oss_mlx import harmony
from oss_mlx.engine import Engine, SamplingParams

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "properties": {
                "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                "maxItems": 3},
                       "scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                             "maximum": 100}}},
        "required": ["tags", "scores"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                       "level": {"type": "string", "enum": ["low", "high"]},
                       "ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
        "required": ["unit", "level", "ok", "note"], "additionalProperties": False,
    },
    "formats": {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date-time"},
                       "day": {"type": "string", "format": "date"},
                       "mail": {"type": "string", "format": "email"},
                       "id": {"type": "string", "format": "uuid"},
                       "ip": {"type": "string", "format": "ipv4"}},
        "required": ["when", "day", "mail", "id", "ip"], "additionalProperties": False,
    },
    "refs_and_unions": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                              "y": {"type": "number"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"at": {"$ref": "#/$defs/point"},
                       "v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]},
                       "n": {"type": "string", "minLength": 3, "maxLength": 5}},
        "required": ["at", "v", "n"], "additionalProperties": False,
    },
    "json_object": constrain.JSON_OBJECT,
}

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False,
}


def validate(text: str, schema: dict):
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.load(str(tiny_model))


def run(engine, prefix: str, spec, seed: int, max_tokens: int = 200):
    procs = [Forced(tokens(engine.encoding, prefix))]
    if spec is not None:
        procs.append(constrain.processor(engine.encoding, spec))
    procs.append(short_json_bias(engine.encoding))
    conv = harmony.build_conversation([harmony.user_message("Answer in JSON.")], reasoning="low")
    return engine.complete(conv, SamplingParams(seed=seed, max_tokens=max_tokens,
                                                logits_processors=procs))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_final_answer_always_validates(engine, name):
    schema = SCHEMAS[name]
    for seed in (0, 1):
        c = run(engine, FINAL, constrain.Spec.build(final=schema), seed)
        assert c.stop_reason == "stop", (c.stop_reason, c.final)
        assert c.tokens[-1] == harmony.RETURN  # the constraint closed the turn, not <|end|>
        validate(c.final, schema)


def test_without_the_constraint_the_same_steering_breaks_the_json(engine):
    """The negative control: the bias alone does not make valid JSON, the constraint does."""
    broken = 0
    for seed in (0, 1):
        c = run(engine, FINAL, None, seed, max_tokens=40)
        try:
            validate(c.final, SCHEMAS["nested"])
        except (json.JSONDecodeError, jsonschema.ValidationError):
            broken += 1
    assert broken == 2


def test_tool_arguments_always_validate(engine):
    spec = constrain.Spec.build(tools={"functions.get_weather": (WEATHER_SCHEMA, False)})
    for seed in (0, 1, 2):
        c = run(engine, WEATHER_CALL, spec, seed)
        assert c.stop_reason == "tool_call", (c.stop_reason, c.tokens)
        (call,) = c.tool_calls
        assert call["name"] == "get_weather"
        validate(call["arguments"], WEATHER_SCHEMA)


def test_recipient_in_the_role_part_is_constrained_too(engine):
    spec = constrain.Spec.build(tools={"functions.get_weather": (WEATHER_SCHEMA, False)})
    c = run(engine, " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>",
            spec, seed=3)
    assert c.stop_reason == "tool_call"
    validate(c.tool_calls[0]["arguments"], WEATHER_SCHEMA)


# ---- the processor on scripted streams ---------------------------------------------------------


def allowed(out) -> set[int]:
    return set(np.nonzero(np.isfinite(np.array(out[0])))[0].tolist())


def test_only_constrained_messages_are_masked(engine):
    enc = engine.encoding
    spec = constrain.Spec.build(final={"type": "object", "properties": {"a": {"type": "integer"}},
                                       "required": ["a"], "additionalProperties": False})
    proc = constrain.processor(enc, spec)
    logits = mx.zeros((1, 201088))
    stream = tokens(enc, "<|channel|>analysis<|message|>Think {freely}.<|end|>"
                         "<|start|>assistant<|channel|>commentary<|message|>Preamble<|end|>"
                         "<|start|>assistant" + FINAL)
    for k in range(len(stream)):  # everything up to and including the final header is free
        assert proc(mx.array(stream[:k], dtype=mx.int32), logits) is logits
    body = tokens(enc, '{"a":')
    for k in range(len(body) + 1):
        out = proc(mx.array(stream + body[:k], dtype=mx.int32), logits)
        ok = allowed(out)
        if k < len(body):
            assert body[k] in ok and harmony.RETURN not in ok
    assert tokens(enc, "hello")[0] not in ok and tokens(enc, "12")[0] in ok
    done = stream + tokens(enc, '{"a":12}')
    assert allowed(proc(mx.array(done, dtype=mx.int32), logits)) == {harmony.RETURN}
    # After the turn's close nothing is masked.
    assert proc(mx.array(done + [harmony.RETURN], dtype=mx.int32), logits) is logits


def test_spaced_json_is_allowed(engine):
    """gpt-oss often writes `{"city": "Paris"}` (harmony's own examples do): not only compact.
    (Indented JSON is not: no newline or run of blanks, tests/server/test_structured_whitespace.)"""
    enc = engine.encoding
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["city", "n"]}
    for text in ('{"city": "Paris", "n": 3}', json.dumps({"city": "Paris", "n": 3})):
        proc = constrain.processor(enc, constrain.Spec.build(final=schema))
        stream = tokens(enc, FINAL + text)
        start = len(tokens(enc, FINAL))
        for k in range(start, len(stream) + 1):
            ok = allowed(proc(mx.array(stream[:k], dtype=mx.int32), mx.zeros((1, 201088))))
            assert (stream[k] if k < len(stream) else harmony.RETURN) in ok, (text, k)


def test_a_number_may_go_on_or_close(engine):
    enc = engine.encoding
    proc = constrain.processor(enc, constrain.Spec.build(final={"type": "integer"}))
    ok = allowed(proc(mx.array(tokens(enc, FINAL + "12"), dtype=mx.int32), mx.zeros((1, 201088))))
    assert harmony.RETURN in ok and tokens(enc, "3")[0] in ok and harmony.END not in ok


def test_tool_calls_close_with_call_and_other_recipients_are_free(engine):
    enc = engine.encoding
    spec = constrain.Spec.build(tools={"functions.get_weather": (WEATHER_SCHEMA, False)})
    proc = constrain.processor(enc, spec)
    logits = mx.zeros((1, 201088))
    other = tokens(enc, "<|channel|>commentary to=functions.other <|constrain|>json<|message|>")
    assert proc(mx.array(other, dtype=mx.int32), logits) is logits
    proc = constrain.processor(enc, spec)
    args = json.dumps({"city": "Oslo", "unit": "c", "days": 3}, separators=(",", ":"))
    ok = allowed(proc(mx.array(tokens(enc, WEATHER_CALL + args), dtype=mx.int32), logits))
    assert ok == {harmony.CALL}


def test_apply_bitmask_matches_numpy():
    rng = np.random.default_rng(0)
    words = rng.integers(-2**31, 2**31, size=201088 // 32, dtype=np.int64).astype(np.int32)
    logits = mx.array(rng.standard_normal((1, 201088)).astype(np.float32))
    out = np.array(constrain.apply_bitmask(logits, words))
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
    assert np.array_equal(np.isfinite(out[0]), bits)
    assert np.array_equal(out[0][bits], np.array(logits)[0][bits])


# ---- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyword, schema", [
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^a"}}),
])
def test_unsupported_keyword_is_named(keyword, schema):
    with pytest.raises(constrain.UnsupportedSchema) as e:
        constrain.Spec.build(final=schema)
    assert e.value.keyword == keyword and repr(keyword) in str(e.value)


def test_tool_schemas_are_lenient_unless_strict():
    schema = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    spec = constrain.Spec.build(tools={"functions.f": (schema, False), "functions.g": (None, False)})
    assert set(spec.tools) == {"functions.f", "functions.g"}
    with pytest.raises(constrain.UnsupportedSchema, match="uniqueItems"):
        constrain.Spec.build(tools={"functions.f": (schema, True)})


def test_response_format_shapes():
    s = {"type": "object"}
    assert constraints.response_format_schema(None) is None
    assert constraints.response_format_schema({"type": "text"}) is None
    assert constraints.response_format_schema({"type": "json_object"})[0] == constrain.JSON_OBJECT
    chat = {"type": "json_schema", "json_schema": {"name": "n", "schema": s, "strict": True}}
    resp = {"type": "json_schema", "name": "n", "schema": s, "strict": False}
    assert constraints.response_format_schema(chat) == constraints.response_format_schema(resp) == (s, "n", None)
    with pytest.raises(constrain.UnsupportedSchema, match="grammar"):
        constraints.response_format_schema({"type": "grammar"})


def test_a_schema_that_is_not_one_is_refused_with_the_reason():
    with pytest.raises(constrain.UnsupportedSchema, match="Invalid type: foo"):
        constraints.request_spec({"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "foo"}}}, "response_format", [])
    with pytest.raises(constrain.UnsupportedSchema, match="needs a `schema`"):
        constraints.request_spec({"type": "json_schema", "json_schema": {"name": "x"}},
                               "response_format", [])


# ---- the engine hook (SamplingParams.logits_processors) ------------------------------------------


def test_engine_gives_processors_this_turns_tokens_in_order(tiny_model):
    from support.scripted import ScriptedModel

    enc = harmony.load_encoding(tiny_model)
    reply = "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant" + FINAL + "Hi!<|return|>"
    eng = Engine(ScriptedModel(reply, encoding=enc), enc)
    seen, received = [], []
    boost = mx.zeros((1, 201088)).at[0, 7].add(2e9)

    def record(toks, logits):
        seen.append(toks.tolist())
        return logits

    conv = harmony.build_conversation([harmony.user_message("Hi")], reasoning="low")
    c = eng.complete(conv, SamplingParams(logits_processors=[record]))
    assert c.final == "Hi!"
    n = len(c.tokens)
    assert seen[:n] == [c.tokens[:k] for k in range(n)]  # the turn's tokens, no prompt
    assert seen[n:] in ([], [c.tokens])  # the step the engine queued ahead of the stop token

    def second(toks, logits):
        received.append(int(mx.argmax(logits, axis=-1).item()))
        return logits

    eng.model.push(reply)
    c = eng.complete(conv, SamplingParams(max_tokens=3, logits_processors=[
        lambda toks, logits: logits + boost, second]))
    # Applied in order, before sampling. The last token is fed too (the cache then holds the
    # whole completion for the next turn); that step's own sample is dropped, its processors ran.
    assert c.tokens == [7, 7, 7] and received in ([7, 7, 7], [7, 7, 7, 7])

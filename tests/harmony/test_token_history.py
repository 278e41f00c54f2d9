"""Exact token history: a past assistant turn this engine generated is rendered as the tokens it
sampled, matched by content whatever a client changed; anything else keeps harmony's rendering.
The oracle is the sampled token stream itself (ScriptedModel) and openai-harmony's renderer."""

from __future__ import annotations

import pytest

from oss_mlx.engine import Engine, SamplingParams
from oss_mlx.harmony import (
    assistant_message,
    build_conversation,
    load_encoding,
    render_prompt,
    tool_call_message,
    tool_result_message,
    user_message,
)
from oss_mlx.harmony.history import split_messages
from support.scripted import ScriptedModel, harmony_tokens, vocab_dir

TOOLS = [{"name": "shell", "parameters": {"type": "object",
                                          "properties": {"command": {"type": "string"}}}}]
CALL = ("<|channel|>analysis<|message|>List the files.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.shell <|constrain|>json"
        '<|message|>{"command": "ls",  "cwd": "/tmp"}<|call|>')
ANSWER = "<|channel|>final<|message|>Two files:  a and b.<|return|>"


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return load_encoding(vocab_dir(tmp_path_factory.mktemp("vocab")))


def conv(messages):
    return build_conversation(messages, date="", tools=TOOLS)


def session(enc):
    model = ScriptedModel(CALL, ANSWER, encoding=enc)
    engine = Engine(model, enc)
    p1 = engine.render(conv([user_message("files?")]))
    c1 = engine.complete(p1, SamplingParams(max_tokens=100))
    return engine, model, p1, c1


@pytest.mark.parametrize("variant", ["as-returned", "json-reserialised", "reasoning-dropped"])
def test_tool_round_trip_reuses_through_the_call(enc, variant):
    engine, model, p1, c1 = session(enc)
    analysis, call = c1.messages
    args = {"as-returned": call, "reasoning-dropped": call,
            "json-reserialised": tool_call_message("functions.shell",
                                                   '{"cwd":"/tmp","command":"ls"}')}[variant]
    history = [user_message("files?")]
    history += [] if variant == "reasoning-dropped" else [analysis]
    history += [args, tool_result_message("functions.shell", "a\nb")]
    p2 = engine.render(conv(history))
    sampled = harmony_tokens(enc, CALL)
    if variant == "reasoning-dropped":
        # the call alone, as sampled: it starts after the analysis message's span
        call_span = sampled[sampled.index(200006):]
        assert p2[len(p1) - 2: len(p1) - 2 + len(call_span)] == call_span
    else:
        assert p2[: len(p1) + len(sampled)] == p1 + sampled  # prompt + exactly what was sampled
        c2 = engine.complete(p2, SamplingParams(max_tokens=100))
        assert c2.stats.cached_tokens == len(p1) + len(sampled) - 1  # all but <|call|>
        assert c2.final == "Two files:  a and b."


def test_final_with_changed_whitespace_is_matched_and_closed_by_end(enc):
    engine, model, p1, c1 = session(enc)
    history = [user_message("files?")] + c1.messages + [tool_result_message("functions.shell", "a")]
    p2 = engine.render(conv(history))
    c2 = engine.complete(p2, SamplingParams(max_tokens=100))
    # the client strips and collapses the answer's spaces; the next prompt still has the
    # answer as sampled, <|return|> written as <|end|>
    later = history + [assistant_message("Two files: a and b."), user_message("thanks")]
    p3 = engine.render(conv(later))
    answer = harmony_tokens(enc, ANSWER)
    span = p2[-2:] + answer[:-1] + [200007]
    assert any(p3[i: i + len(span)] == span for i in range(len(p3)))
    # (harmony alone renders the collapsed text, which the model never wrote)
    assert render_prompt(enc, conv(later)) != p3


def test_unknown_assistant_messages_keep_harmonys_rendering(enc):
    engine, *_ = session(enc)
    history = [user_message("files?"), assistant_message("Something I never said."),
               user_message("ok")]
    assert engine.render(conv(history)) == render_prompt(enc, conv(history))


def test_split_messages_on_sampled_streams(enc):
    head = harmony_tokens(enc, "<|start|>assistant")
    toks = harmony_tokens(enc, CALL)
    spans = split_messages(head, toks)
    assert [enc.decode(s) for s in spans] == [
        "<|start|>assistant<|channel|>analysis<|message|>List the files.<|end|>",
        '<|start|>assistant<|channel|>commentary to=functions.shell <|constrain|>json'
        '<|message|>{"command": "ls",  "cwd": "/tmp"}<|call|>']
    # text outside a message: nothing is guessed
    assert split_messages(head, harmony_tokens(enc, "<|channel|>final<|message|>x<|end|>stray")) == []
    # a stray closer between messages is skipped; <|return|> is written as <|end|>
    assert split_messages(head, harmony_tokens(enc, "<|channel|>final<|message|>x<|end|><|return|>")) == [
        harmony_tokens(enc, "<|start|>assistant<|channel|>final<|message|>x<|end|>")]

"""The engine: the streaming harmony parser on hand-made token streams (ScriptedModel), stop
reasons, limits and cancellation; and on the tiny model: seeds, greedy decoding against a
no-cache forward pass, and prompt-cache reuse against a cold start."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from oss_mlx.engine import Engine, SamplingParams
from oss_mlx.errors import OssMlxError
from oss_mlx.harmony import (
    build_conversation,
    load_encoding,
    render_prompt,
    tool_result_message,
    user_message,
)
from support.scripted import ScriptedModel, harmony_tokens, vocab_dir

RETURN, CALL, END = 200002, 200012, 200007


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return load_encoding(vocab_dir(tmp_path_factory.mktemp("vocab")))


def conv(text="Hi", **kw):
    return build_conversation([user_message(text)], date="", **kw)


def run(enc, reply, params=None, cancel=None, **model_kw):
    model = ScriptedModel(reply, encoding=enc, **model_kw)
    events = list(Engine(model, enc).stream(conv(), params or SamplingParams(max_tokens=200), cancel))
    return events, events[-1].completion, model


def deltas(events, channel=None, recipient=None):
    return "".join(
        e.text for e in events if e.type == "delta" and e.channel == channel and e.recipient == recipient
    )


def assert_no_control_text(events):
    for e in events:
        assert "<|" not in e.text, e


# ---- the streaming parser on hand-made streams ----


def test_analysis_then_final(enc):
    events, c, _ = run(
        enc,
        "<|channel|>analysis<|message|>User says hi. Reply.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>",
    )
    assert [e.type for e in events].count("done") == 1 and events[-1].type == "done"
    assert deltas(events, "analysis") == "User says hi. Reply."
    assert deltas(events, "final") == "Hello! How can I help?"
    msgs = [e for e in events if e.type == "message"]
    assert [(m.channel, m.text) for m in msgs] == [
        ("analysis", "User says hi. Reply."), ("final", "Hello! How can I help?")
    ]
    # <|end|> closed the analysis message but did not stop the turn
    assert c.stop_reason == "stop" and c.tokens[-1] == RETURN
    assert c.analysis == "User says hi. Reply." and c.final == "Hello! How can I help?"
    assert [m.channel for m in c.messages] == ["analysis", "final"] and c.tool_calls == []
    # the analysis delta comes before the analysis message event, which comes before final deltas
    kinds = [(e.type, e.channel) for e in events]
    assert kinds.index(("message", "analysis")) < kinds.index(("delta", "final"))
    assert_no_control_text(events)


def test_tool_call_stops_on_call(enc):
    events, c, model = run(
        enc,
        "<|channel|>analysis<|message|>Need weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"location":"Paris"}<|call|>'
        "<|start|>functions.get_weather<|message|>invented result<|end|>",
    )
    assert c.stop_reason == "tool_call" and c.tokens[-1] == CALL
    assert c.tool_calls == [{
        "name": "get_weather", "recipient": "functions.get_weather",
        "arguments": '{"location":"Paris"}', "channel": "commentary",
        "content_type": "<|constrain|>json",
    }]
    # arguments stream as deltas tagged with the recipient; nothing after <|call|> is generated
    assert deltas(events, "commentary", "functions.get_weather") == '{"location":"Paris"}'
    assert "invented" not in "".join(e.text for e in events)
    assert c.final == "" and c.analysis == "Need weather."
    assert c.messages[-1].recipient == "functions.get_weather"
    assert_no_control_text(events)


def test_recipient_in_role_header_and_preamble(enc):
    events, c, _ = run(
        enc,
        "<|channel|>commentary<|message|>Checking the weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"location":"Oslo"}<|call|>',
    )
    assert c.stop_reason == "tool_call"
    assert c.commentary == "Checking the weather."
    assert c.tool_calls[0]["name"] == "get_weather" and c.tool_calls[0]["arguments"] == '{"location":"Oslo"}'


def test_tool_result_turn_reuses_and_answers(enc):
    model = ScriptedModel(
        '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"x": 1}<|call|>',
        "<|channel|>final<|message|>It is 2.<|return|>",
        encoding=enc,
    )
    engine = Engine(model, enc)
    history = [user_message("f?")]
    c1 = engine.complete(build_conversation(history, date=""), SamplingParams(max_tokens=50))
    history += c1.messages + [tool_result_message("functions.f", '{"y": 2}')]
    c2 = engine.complete(build_conversation(history, date=""), SamplingParams(max_tokens=50))
    assert (c1.stop_reason, c2.stop_reason, c2.final) == ("tool_call", "stop", "It is 2.")
    # exact token history: the second prompt holds the call as sampled (harmony alone writes
    # its recipient in the role header), so it reuses everything the cache held: the first
    # prompt and the call without its <|call|>
    p1 = render_prompt(enc, build_conversation(history[:1], date=""))
    p2 = engine.render(build_conversation(history, date=""))
    assert p2[: len(p1) + len(c1.tokens)] == p1 + c1.tokens
    rerendered = render_prompt(enc, build_conversation(history, date=""))
    assert rerendered[: len(p1) + 2] != p1 + c1.tokens[:2]
    assert c2.stats.cached_tokens == len(p1) + len(c1.tokens) - 1
    assert len(model.prompts[1]) == c2.stats.prompt_tokens - c2.stats.cached_tokens


def test_stray_control_token_inside_a_message_is_malformed(enc):
    events, c, _ = run(
        enc, "<|channel|>final<|message|>The answer<|channel|>final<|message|> is 4<|return|>"
    )
    assert c.stop_reason == "malformed"
    assert c.final == "The answer"  # kept, and no control token leaked into it
    assert_no_control_text(events)
    assert [m.channel for m in c.messages] == ["final"]  # the cut final is kept for the history


def test_text_between_messages_is_malformed_keeping_what_was_parsed(enc):
    _, c, _ = run(enc, "<|channel|>analysis<|message|>thinking<|end|>stray text<|return|>")
    assert c.stop_reason == "malformed" and c.analysis == "thinking" and c.final == ""


def test_return_after_end_is_a_clean_stop(enc):
    _, c, _ = run(enc, "<|channel|>final<|message|>4<|end|><|return|>")
    assert (c.stop_reason, c.final) == ("stop", "4")


def test_headerless_refusal_is_final(enc):
    events, c, _ = run(enc, "I can't help with that.<|return|>")
    assert (c.stop_reason, c.final) == ("stop", "I can't help with that.")
    assert deltas(events, None) == "I can't help with that."


def test_max_tokens_cut(enc):
    reply = "<|channel|>final<|message|>one two three four five six<|return|>"
    tokens = harmony_tokens(enc, reply)
    events, c, _ = run(enc, reply, SamplingParams(max_tokens=5))
    assert c.stop_reason == "length" and c.tokens == tokens[:5] and c.stats.generated_tokens == 5
    assert c.final == enc.decode(tokens[3:5]) and deltas(events, "final") == c.final
    assert [m.channel for m in c.messages] == ["final"]  # the partial answer, for the history


def test_cut_in_analysis_keeps_no_unfinished_reasoning_message(enc):
    _, c, _ = run(enc, "<|channel|>analysis<|message|>long long thought<|end|>", SamplingParams(max_tokens=5))
    assert c.stop_reason == "length" and c.analysis and c.messages == []


def test_context_limit(enc):
    prompt_len = len(render_prompt(enc, conv()))
    reply = "<|channel|>final<|message|>" + "word " * 50 + "<|return|>"
    model = ScriptedModel(reply, encoding=enc, max_context=prompt_len + 7)
    c = Engine(model, enc).complete(conv(), SamplingParams(max_tokens=100))
    assert c.stop_reason == "context" and c.stats.generated_tokens == 7
    # max_tokens within the room: "length", not "context"
    model.push(reply)
    c = Engine(model, enc).complete(conv(), SamplingParams(max_tokens=7))
    assert c.stop_reason == "length"


def test_prompt_longer_than_context_is_a_clear_error(enc):
    model = ScriptedModel("x", encoding=enc, max_context=20)
    with pytest.raises(OssMlxError, match="context_length_exceeded.*20 tokens"):
        Engine(model, enc).complete(conv(), SamplingParams(max_tokens=10))


def test_cancel_between_tokens(enc):
    model = ScriptedModel("<|channel|>final<|message|>" + "word " * 100 + "<|return|>", encoding=enc)
    cancel = threading.Event()
    seen = 0
    for ev in Engine(model, enc).stream(conv(), SamplingParams(max_tokens=500), cancel):
        if ev.type == "delta":
            seen += 1
            if seen == 3:
                cancel.set()
        if ev.type == "done":
            c = ev.completion
    assert c.stop_reason == "cancelled" and seen == 3
    assert c.final == "word word word" and c.stats.generated_tokens == 6


def test_multibyte_text_split_over_tokens(enc):
    text = "Grüße 🌍 数学"
    events, c, _ = run(enc, f"<|channel|>final<|message|>{text}<|return|>")
    assert c.final == text and deltas(events, "final") == text
    assert all("\ufffd" not in e.text for e in events)


def test_stats_fields(enc):
    _, c, _ = run(enc, "<|channel|>final<|message|>ok<|return|>")
    s = c.stats
    assert s.prompt_tokens == len(render_prompt(enc, conv())) and s.cached_tokens == 0
    assert s.generated_tokens == len(c.tokens) == 5
    assert s.ttft_s > 0 and s.prefill_tps > 0 and s.decode_tps > 0 and s.peak_memory_bytes > 0


def test_effort_reaches_the_prompt(enc):
    model = ScriptedModel("<|channel|>final<|message|>a<|return|>", "<|channel|>final<|message|>b<|return|>", encoding=enc)
    engine = Engine(model, enc)
    engine.complete(conv(reasoning="high"), SamplingParams(max_tokens=9))
    engine.reset_cache()
    engine.complete(conv(reasoning="low"), SamplingParams(max_tokens=9))
    assert "Reasoning: high" in enc.decode(model.prompts[0])
    assert "Reasoning: low" in enc.decode(model.prompts[1])


# ---- the tiny model ----


@pytest.fixture(scope="module")
def tiny(tiny_model):
    # float32: the CPU backend's fast path, and tight logits comparisons
    return Engine.load(str(tiny_model), dtype=mx.float32)


def tokens_prompt(enc, n_turn_words=30):
    words = " ".join(f"w{i}" for i in range(n_turn_words))
    return render_prompt(enc, build_conversation([user_message(words)], date="2025-01-01"))


def last_logits_no_cache(model, seq):
    """Reference: the whole sequence in one forward pass with no cache at all; only the last
    position goes through the (CPU-costly, 201088-row) unembedding."""
    h = model.hidden(mx.array(seq)[None])[:, -1:]
    return model.unembedding(model.norm(h))[0, -1].astype(mx.float32)


def no_cache_greedy(model, prompt, n):
    """Reference: greedy decoding that recomputes the whole sequence with no cache each step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(mx.argmax(last_logits_no_cache(model, seq)).item()))
    return seq[len(prompt):]


def test_greedy_matches_a_no_cache_forward(tiny):
    prompt = tokens_prompt(tiny.encoding)  # longer than the tiny window (8)
    tiny.reset_cache()
    c = tiny.complete(prompt, SamplingParams(temperature=0.0, max_tokens=12))
    assert c.tokens == no_cache_greedy(tiny.model, prompt, len(c.tokens))


def test_top_k_1_is_greedy(tiny):
    prompt = tokens_prompt(tiny.encoding, 5)
    tiny.reset_cache()
    a = tiny.complete(prompt, SamplingParams(temperature=0.0, max_tokens=8)).tokens
    tiny.reset_cache()
    b = tiny.complete(prompt, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=8)).tokens
    assert a == b


def test_same_seed_same_tokens(tiny):
    prompt = tokens_prompt(tiny.encoding, 5)
    runs = []
    for seed in (7, 7, 8):
        tiny.reset_cache()
        runs.append(tiny.complete(prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=16)).tokens)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # and the same with a warm cache (prompt fully cached but its last token)
    c = tiny.complete(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=16))
    assert c.stats.cached_tokens == len(prompt) - 1 and c.tokens == runs[0]


class StopAfter:
    """Wraps a model: the k-th decode step's logits force <|return|>, so a turn of a random
    model ends with a pipelined stop token like a real one."""

    def __init__(self, model, k):
        self.inner, self.k, self.n = model, k, 0
        self.config = model.config

    def make_cache(self):
        return self.inner.make_cache()

    def prefill(self, tokens, cache, chunk_size=512, logits=True):
        self.n = 0
        return self.inner.prefill(tokens, cache, chunk_size, logits=logits)

    def __call__(self, tokens, cache=None):
        logits = self.inner(tokens, cache)
        self.n += 1
        if self.n == self.k:
            logits = mx.where(mx.arange(logits.shape[-1]) == RETURN, 100.0, -100.0)[None, None]
        return logits


def cold_logits(model, prompt):
    return np.array(last_logits_no_cache(model, prompt))


def test_prompt_cache_reuse_matches_cold_start(tiny):
    """Four turns, all longer than the tiny window (8), through one warm engine; each turn's
    tokens and last-prompt logits must equal a cold start's."""
    enc, model = tiny.encoding, tiny.model
    warm = Engine(StopAfter(model, 6), enc, prefill_chunk=5)
    cold = Engine(StopAfter(model, 6), enc, prefill_chunk=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=40)

    def turn(prompt, expect_cached):
        c = warm.complete(prompt, greedy)
        cold.reset_cache()
        ref = cold.complete(prompt, greedy)
        assert c.stats.cached_tokens == expect_cached
        assert c.tokens == ref.tokens
        return c

    p1 = tokens_prompt(enc, 20)
    c1 = turn(p1, 0)
    assert c1.stop_reason == "stop" and c1.tokens[-1] == RETURN and len(c1.tokens) == 7
    # the cache holds prompt + completion without the (already fed) stop token
    assert warm.cached_tokens == p1 + c1.tokens[:-1]

    # turn 2 diverges exactly at the stop token (<|return|> rendered back as <|end|>)
    p2 = p1 + c1.tokens[:-1] + [END] + harmony_tokens(enc, "<|start|>user<|message|>more words here please<|end|><|start|>assistant")
    c2 = turn(p2, len(p1) + len(c1.tokens) - 1)

    # turn 3 diverges at the end of turn 2's prompt (its analysis dropped): the snapshot taken
    # at the prompt's end restores the wrapped rotating caches
    p3 = p2 + harmony_tokens(enc, "<|channel|>final<|message|>short<|end|><|start|>user<|message|>again and again<|end|><|start|>assistant")
    turn(p3, len(p2))

    # turn 4 diverges in the middle of turn 1's first message: back to the end of the first
    # prefill chunk (5 tokens), whose snapshot is the last one before, still right
    p4 = p1[:15] + harmony_tokens(enc, " something else entirely<|end|><|start|>assistant")
    turn(p4, 5)

    # logits of the last prompt position, reused path vs cold, for prompts around the window
    warm.reset_cache()
    for p in (p1, p2, p3, p2 + [END], p3[:-3]):
        got = np.array(warm.logits(p))
        np.testing.assert_allclose(got, cold_logits(model, p), rtol=1e-4, atol=1e-4)


def test_pipelined_stop_rollback_then_extension_logits(tiny):
    """The rotating caches rolled back past the stop token give the cold logits afterwards."""
    enc, model = tiny.encoding, tiny.model
    warm = Engine(StopAfter(model, 11), enc)
    p1 = tokens_prompt(enc, 12)
    c1 = warm.complete(p1, SamplingParams(temperature=0.0, max_tokens=40))
    assert c1.stop_reason == "stop" and len(c1.tokens) == 12
    for extra in ([END], [END, 200006, 1428], [END] + harmony_tokens(enc, " a longer tail of new words, well past the window")):
        p = p1 + c1.tokens[:-1] + extra
        warm_engine = Engine(StopAfter(model, 11), enc)
        warm_engine.complete(p1, SamplingParams(temperature=0.0, max_tokens=40))
        got = np.array(warm_engine.logits(p))
        np.testing.assert_allclose(got, cold_logits(model, p), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stream", [
    "<|channel|>analysis<|message|>a b<|end|><|start|>assistant<|channel|>final<|message|>c<|return|>",
    "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>",
    " to=functions.f<|channel|>commentary json<|message|>{}<|call|>",
    "no header at all<|end|><|end|><|start|>assistant<|channel|>final<|end|><|return|>",
    "<|channel|>final<|message|>x<|end|>oops",
    "<|channel|>final<|message|>x<|start|>assistant",
])
def test_tracked_parser_state_matches_harmony(enc, stream):
    """The collector tracks the parser's state itself (harmony's property is O(message));
    after every token it must agree with harmony's own."""
    from oss_mlx.harmony.parser import TurnParser

    col = TurnParser(enc)
    for tok in harmony_tokens(enc, stream):
        reason = col.feed(tok)
        if reason == "malformed":
            break
        assert col.state == col.parser.state, (enc.decode([tok]), col.state, col.parser.state)
        if reason:
            break


def test_abandoned_stream_keeps_a_consistent_cache(enc):
    """A consumer that stops reading (a server client going away) leaves the cache usable."""
    reply = "<|channel|>final<|message|>" + "word " * 20 + "<|return|>"
    model = ScriptedModel(reply, reply, encoding=enc)
    engine = Engine(model, enc)
    gen = engine.stream(conv(), SamplingParams(max_tokens=100))
    for i, ev in enumerate(gen):
        if i == 5:
            break
    gen.close()
    held = engine.cached_tokens
    assert held[: len(render_prompt(enc, conv()))] == render_prompt(enc, conv())
    # what the cache holds is what the model was fed, in order
    assert held == model.prompts[0] + model.fed
    c = engine.complete(conv(), SamplingParams(max_tokens=100))
    assert c.final == "word " * 20 and c.stop_reason == "stop"
    assert c.stats.cached_tokens == len(render_prompt(enc, conv())) - 1


def test_model_error_resets_the_cache(enc):
    class Broken(ScriptedModel):
        def __call__(self, tokens, cache=None):
            raise RuntimeError("device lost")

    model = Broken("<|channel|>final<|message|>hi<|return|>", encoding=enc)
    engine = Engine(model, enc)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.complete(conv(), SamplingParams(max_tokens=10))
    assert engine.cached_tokens == []


def test_logits_processors_see_the_history_and_steer_sampling(enc):
    """SamplingParams.logits_processors (mlx-lm style) get this turn's generated tokens, the
    token being fed included, and their logits are what is sampled from."""
    reply = "<|channel|>final<|message|>one two three<|return|>"
    model = ScriptedModel(reply, encoding=enc)
    seen = []
    prompt = render_prompt(enc, conv())
    target = harmony_tokens(enc, reply)

    def record(tokens, logits):
        seen.append([int(t) for t in tokens.tolist()])
        return logits

    c = Engine(model, enc).complete(conv(), SamplingParams(max_tokens=50, logits_processors=[record]))
    assert c.tokens == target
    # (one call more: the pipeline queues a step after the stop token before reading it)
    assert [len(s) for s in seen] == list(range(len(target) + 1))
    assert seen[len(target) - 1] == target[:-1] and seen[-1] == target

    def ban_return(tokens, logits):
        return mx.where(mx.arange(logits.shape[-1]) == RETURN, -1e9, logits)

    model.push(reply)
    params = SamplingParams(temperature=0.0, max_tokens=len(target) + 2,
                            logits_processors=[ban_return])
    c = Engine(model, enc).complete(conv(), params)
    assert RETURN not in c.tokens and c.stop_reason == "length"

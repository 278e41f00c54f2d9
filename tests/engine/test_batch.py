"""Continuous batching (oss_mlx.batch): batched decoding gives each request what it gets alone.

The oracle is the unbatched engine: Engine.complete on the same model, one request at a time.
The tiny model (float32, sliding window 8) has prompts and completions that cross its window, and
requests join the batch at different steps (prefill chunks of 4 tokens, one chunk per step), so
rows sit at different offsets with different left paddings. Cancellation is synchronised by the
batcher calling each job's put() on its own thread: a job that cancels itself at its k-th event
is cancelled at exactly that token.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest
from support.scripted import ScriptedModel, harmony_tokens

from oss_mlx.engine.batch import Batcher
from oss_mlx.bench.serve import LoopbackServer
from oss_mlx.engine import Engine, SamplingParams
from oss_mlx.harmony import START, load_encoding
from oss_mlx.model import load

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load(tiny_model, dtype=mx.float32), load_encoding(tiny_model)


class Job:
    """What the batcher needs of a request; records what it was given."""

    def __init__(self, prompt, params, cancel_at: int | None = None):
        self.conversation, self.params, self.key = prompt, params, None
        self.cancel = threading.Event()
        self.items: list = []
        self.cancel_at = cancel_at  # set our own cancel event on this many-th event

    def put(self, item):
        self.items.append(item)
        if self.cancel_at is not None and len(self.items) >= self.cancel_at:
            self.cancel.set()

    @property
    def completion(self):
        done = [e for e in self.items if getattr(e, "type", None) == "done"]
        assert len(done) == 1 and self.items[-1] is done[0], self.items[-3:]
        return done[0].completion


class RecordingEngine(Engine):
    """Keeps every cache handed back by the batcher (the real release runs too)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.released: list = []

    def release(self, tokens, cache, key=None):
        self.released.append((list(tokens), cache))
        super().release(tokens, cache, key)


def prompts(n_tokens=(3, 11, 20, 5)) -> list[list[int]]:
    return [[START + i % 3] + list(range(1000 + 7 * i, 1000 + 7 * i + n)) for i, n in
            enumerate(n_tokens)]


def alone(model, enc, prompt, params):
    return Engine(model, enc, prefill_chunk=4).complete(prompt, params)


def run(batcher, jobs):
    """Drive the batcher until every job is done; returns the largest batch seen."""
    widest = 0
    for job in jobs:
        batcher.add(job)
    while batcher.busy:
        batcher.step()
        widest = max(widest, len(batcher._rows))
    return widest


def test_four_streams_give_each_the_greedy_tokens_it_gets_alone(tiny):
    model, enc = tiny
    expected = [alone(model, enc, p, GREEDY).tokens for p in prompts()]
    jobs = [Job(p, GREEDY) for p in prompts()]
    widest = run(Batcher(Engine(model, enc, prefill_chunk=4)), jobs)
    assert widest == 4  # they really decoded together
    for job, want in zip(jobs, expected):
        assert job.completion.tokens == want
        assert job.completion.stop_reason == "length"
        assert len(want) == 24  # crosses the window of 8 several times


def test_each_row_keeps_its_own_sampling_settings(tiny):
    """Seeded sampling draws per row exactly what Engine.stream draws after mx.random.seed."""
    model, enc = tiny
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=16),
              SamplingParams(temperature=0.7, top_p=0.9, seed=2, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=20),
              SamplingParams(temperature=1.3, top_k=5, min_p=0.05, seed=3, max_tokens=16)]
    expected = [alone(model, enc, p, q).tokens for p, q in zip(prompts(), params)]
    assert len({tuple(t) for t in expected}) == 4
    jobs = [Job(p, q) for p, q in zip(prompts(), params)]
    run(Batcher(Engine(model, enc, prefill_chunk=4)), jobs)
    assert [j.completion.tokens for j in jobs] == expected


def test_cancelling_one_stream_leaves_the_others_intact(tiny):
    """One row is cancelled at its 6th event while decoding, another while it is prefilling;
    the other three get exactly their tokens alone."""
    model, enc = tiny
    ps = prompts()
    expected = [alone(model, enc, p, GREEDY).tokens for p in ps]
    song = "<|channel|>final<|message|>" + "la " * 40 + "<|return|>"
    prefilling = Job([START] + list(range(3000, 3040)), GREEDY)  # 10 prefill chunks

    class Singer(Job):  # a scripted row (random weights never reach a message body)
        def put(self, item):
            super().put(item)
            if len(self.items) == 2:  # the 40-token prompt is still prefilling
                prefilling.cancel.set()

    singer = Singer(ps[1], SamplingParams(temperature=0, max_tokens=64, logits_processors=[
        Script(enc, song)]), cancel_at=6)
    jobs = [Job(ps[0], GREEDY), singer, prefilling, Job(ps[2], GREEDY), Job(ps[3], GREEDY)]
    run(Batcher(Engine(model, enc, prefill_chunk=4)), jobs)
    cut = singer.completion
    assert cut.stop_reason == "cancelled"
    # Its 6th event is its 6th text delta ("la", " la", ...): cancelled right after that token.
    assert cut.final == "la" + " la" * 5
    assert cut.tokens == harmony_tokens(enc, song)[:9]
    assert prefilling.completion.stop_reason == "cancelled"
    assert prefilling.completion.tokens == []
    for job, i in zip([jobs[0], jobs[3], jobs[4]], (0, 2, 3)):
        assert job.completion.tokens == expected[i]


class Script:
    """A logits processor that forces a harmony reply (per row: each row has its own); it sees
    this turn's tokens, as SamplingParams.logits_processors do."""

    def __init__(self, enc, text: str):
        self.reply = harmony_tokens(enc, text)

    def __call__(self, tokens, logits):
        k = tokens.size
        tok = self.reply[min(k, len(self.reply) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == tok, 0.0, -1e9)[None].astype(logits.dtype)


def test_released_caches_hold_exactly_prompt_and_completion(tiny):
    """Each finished row's extracted cache continues like a cold prefill of the same tokens:
    after a <|return|> (rolled back) and after a length cut, across the sliding window."""
    model, enc = tiny
    replies = ["<|channel|>final<|message|>Hello there, friend.<|return|>",
               "<|channel|>analysis<|message|>Think it over once more.<|end|><|start|>assistant"
               "<|channel|>final<|message|>Done.<|return|>"]
    ps = prompts((6, 13, 9))
    params = [SamplingParams(temperature=0, max_tokens=64,
                             logits_processors=[Script(enc, replies[i])])
              for i in range(2)] + [GREEDY]
    jobs = [Job(p, q) for p, q in zip(ps, params)]
    engine = RecordingEngine(model, enc, prefill_chunk=4)
    run(Batcher(engine), jobs)
    assert jobs[0].completion.final == "Hello there, friend."
    assert jobs[1].completion.analysis == "Think it over once more."
    assert [j.completion.stop_reason for j in jobs] == ["stop", "stop", "length"]
    assert len(engine.released) == 3
    for job, p in zip(jobs, ps):
        tokens, cache = next((t, c) for t, c in engine.released if t[: len(p)] == p)
        done = job.completion.tokens
        held = done[:-1] if job.completion.stop_reason == "stop" else done
        assert tokens == p + held
        probe = tokens + [1234]
        warm = Engine(model, enc)
        warm._cache, warm._cached = cache, list(tokens)
        assert warm.logits(probe).tolist() == pytest.approx(
            Engine(model, enc).logits(probe).tolist(), abs=1e-4)


def test_a_follow_up_through_the_batcher_reuses_the_previous_prompt(tiny):
    """A next turn that branches after the previous prompt (as harmony's re-rendering does)
    reuses all of it, across the wrapped window (the snapshot taken once the last prompt token
    was fed, as for a lone request), and decodes as cold."""
    model, enc = tiny
    first = prompts((20,))[0]
    engine = Engine(model, enc, prefill_chunk=4)
    batcher = Batcher(engine)
    run(batcher, [Job(first, GREEDY)])
    follow = first + [4321, 4322, 4323]
    job = Job(follow, GREEDY)
    run(batcher, [job])
    assert job.completion.stats.cached_tokens == len(first)
    assert job.completion.tokens == alone(model, enc, follow, GREEDY).tokens


# ---- the server path: `serve --max-concurrency` with a scripted model ------------------------


class RowScripted(ScriptedModel):
    """A ScriptedModel for batches: each row replays the reply scripted for the marker its
    prompt contains, at the position it has reached, both read from the row's own cache (the
    stand-in keys are the token ids), so rows never see each other's state. `hold`: an Event
    that each row's first step waits for; `reached[marker]`: the longest completion seen;
    `widest`: the largest decode batch."""

    def __init__(self, encoding, replies: dict, **kw):
        super().__init__(encoding=encoding, **kw)
        self.scripts = {m: harmony_tokens(encoding, r) for m, r in replies.items()}
        self.head = harmony_tokens(encoding, "<|start|>assistant")
        self.reached: dict = {}
        self._markers: dict = {}  # prompt tokens -> marker
        self.widest = 0
        self.hold = None

    def _row_next(self, history: list[int]) -> int:
        j = next(i for i in range(len(history)) if history[i : i + 2] == self.head) + 2
        prompt = tuple(history[:j])
        if prompt not in self._markers:
            text = self.encoding.decode(list(prompt))
            self._markers[prompt] = next(m for m in self.scripts if m in text)
        marker = self._markers[prompt]
        k = len(history) - j
        self.reached[marker] = max(self.reached.get(marker, 0), k + 1)
        if k == 0 and self.hold is not None:
            assert self.hold.wait(30), "the requests were never all sent"
        reply = self.scripts[marker]
        return reply[k] if k < len(reply) else self.after

    def _logits(self, cache):
        full = cache[1]  # an odd layer: KVCache, or BatchKVCache with left padding
        if hasattr(full, "left_padding"):
            vals, pads = full.values[:, 0, : full._idx, 0], full.left_padding.tolist()
        else:
            vals, pads = full.values[:, 0, : full.offset, 0], [0]
        rows = [self._row_next([int(t) for t in v[p:].tolist()]) for v, p in zip(vals, pads)]
        return mx.stack([self._forced(1, 1, t)[0] for t in rows])  # [B, 1, V]

    def __call__(self, tokens, cache=None):
        self._update(tokens, cache)
        self.widest = max(self.widest, tokens.shape[0])
        return self._logits(cache)

    def prefill(self, tokens, cache, chunk_size: int = 512, logits: bool = True):
        for i in range(0, tokens.shape[1], chunk_size):
            self._update(tokens[:, i : i + chunk_size], cache)
        return self._logits(cache)[:, -1, :] if logits else None


REPLIES = {
    "alpha": "<|channel|>analysis<|message|>The user greets me.<|end|><|start|>assistant"
             "<|channel|>final<|message|>Hello! How can I help?<|return|>",
    "bravo": "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant"
             "<|channel|>commentary to=functions.get_weather <|constrain|>json"
             '<|message|>{"city": "Paris"}<|call|>',
    "charlie": "<|channel|>final<|message|>" + "one two three " * 10 + "<|return|>",
    "delta": "<|channel|>final<|message|>" + "la " * 120 + "<|return|>",
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


Serving = LoopbackServer  # create_app on a loopback socket that listens before uvicorn starts


def chat_stream(url: str, marker: str, close_after: int | None = None) -> dict:
    """One streamed chat request through the openai client; what the client saw."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": f"Say {marker}."}],
        tools=[WEATHER], stream=True)
    seen = {"content": "", "reasoning": "", "calls": {}, "finish": [], "chunks": 0}
    for chunk in stream:
        seen["chunks"] += 1
        for choice in chunk.choices:
            d = choice.delta
            seen["content"] += d.content or ""
            seen["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for call in d.tool_calls or []:
                name, args = seen["calls"].get(call.index, ("", ""))
                seen["calls"][call.index] = (name + (call.function.name or ""),
                                             args + (call.function.arguments or ""))
            if choice.finish_reason:
                seen["finish"].append(choice.finish_reason)
        if close_after is not None and seen["chunks"] >= close_after:
            stream.close()
            break
    return seen


def expected(marker: str) -> dict:
    """What the client must see for each script, written from the scripts themselves."""
    return {
        "alpha": {"content": "Hello! How can I help?", "reasoning": "The user greets me.",
                  "calls": {}, "finish": ["stop"]},
        "bravo": {"content": "", "reasoning": "Need the weather tool.",
                  "calls": {0: ("get_weather", '{"city": "Paris"}')}, "finish": ["tool_calls"]},
        "charlie": {"content": "one two three " * 10, "reasoning": "", "calls": {},
                    "finish": ["stop"]},
        "delta": {"content": "la " * 120, "reasoning": "", "calls": {}, "finish": ["stop"]},
    }[marker]


@pytest.fixture(scope="module")
def encoding(tiny_model):
    return load_encoding(tiny_model)


def concurrent(url: str, markers, close: dict | None = None) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    close = close or {}
    with ThreadPoolExecutor(len(markers)) as pool:
        futures = {m: pool.submit(chat_stream, url, m, close.get(m)) for m in markers}
        return {m: f.result() for m, f in futures.items()}


class CountingEngine(Engine):
    """Sets `all_sent` once the server has rendered `expect` prompts (it submits each right
    after rendering it, with no await in between)."""

    def __init__(self, *a, expect: int, **kw):
        super().__init__(*a, **kw)
        self.expect, self.rendered, self.all_sent = expect, 0, threading.Event()

    def render(self, conversation):
        tokens = super().render(conversation)
        self.rendered += 1
        if self.rendered >= self.expect:
            self.all_sent.set()
        return tokens


def serve(encoding, n: int, expect: int):
    model = RowScripted(encoding, REPLIES, max_context=4096)
    engine = CountingEngine(model, encoding, prefill_chunk=512, expect=expect)
    model.hold = engine.all_sent  # each row's first step waits until every request was sent
    return model, Serving(engine, n, name="scripted")


@pytest.mark.slow
def test_server_batched_streams_equal_serial(encoding):
    """Four streams (analysis + final, a tool call, two long finals) at once: batched, each
    client sees exactly its script, and the same as when served one at a time."""
    results = {}
    for n in (1, 4):
        model, srv = serve(encoding, n, expect=len(REPLIES))
        with srv:
            results[n] = concurrent(srv.base, list(REPLIES))
        assert model.widest == (4 if n == 4 else 1)
    for m in REPLIES:
        got = {k: results[4][m][k] for k in ("content", "reasoning", "calls", "finish")}
        assert got == expected(m), m
        assert {k: results[1][m][k] for k in got} == got


def test_server_client_leaving_leaves_the_other_streams_intact(encoding):
    model, srv = serve(encoding, 4, expect=4)
    with srv:
        results = concurrent(srv.base, list(REPLIES), close={"delta": 5})
    assert results["delta"]["chunks"] == 5 and results["delta"]["finish"] == []
    for m in ("alpha", "bravo", "charlie"):
        got = {k: results[m][k] for k in ("content", "reasoning", "calls", "finish")}
        assert got == expected(m), m
    # The batch kept stepping for "charlie" (about 30 tokens) after "delta" left; "delta" was
    # cancelled long before its 120 tokens.
    assert model.reached["delta"] < len(model.scripts["delta"]) // 2


def test_serve_refuses_a_max_concurrency_below_one(capsys):
    import argparse

    from oss_mlx.cli.serve import add_arguments

    parser = argparse.ArgumentParser(prog="serve")
    add_arguments(parser)
    assert parser.parse_args([]).max_concurrency == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-concurrency", "0", "--port", "0"])
    assert "argument --max-concurrency: 0 is not at least 1" in capsys.readouterr().err

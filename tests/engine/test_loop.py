"""The one request loop (oss_mlx/engine/loop.py): prefill chunks sized from the measured rate,
cancellation between them, a newcomer's prefill interleaved with decoding rows, progress and
the final stats; and the compiled step for batches (rows at different lengths, a buffer that
grows) and for `serve`'s lone stream at its default settings.

Time is simulated: the models below advance a clock by what their work would cost (per
prefilled token, per decode step) and the engine's PrefillPace reads that clock, so the pacing
is checked exactly, with no sleep and whatever the machine's load.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest
from support.scripted import ScriptedModel, harmony_tokens
from test_batch import REPLIES, Job, RowScripted, alone, prompts

from oss_mlx.engine import Engine, SamplingParams
from oss_mlx.engine.batch import Batcher
from oss_mlx.engine.pace import ALONE_S, BUSY_S, PrefillPace, grid
from oss_mlx.harmony import build_conversation, load_encoding, render_prompt, user_message
from oss_mlx.model import load

GREEDY = SamplingParams(temperature=0, max_tokens=12)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Slow(ScriptedModel):
    """A ScriptedModel whose work takes simulated time: `per_token` seconds a prefilled token,
    `step` seconds a decode step; `chunks` records each prefill call's length."""

    def __init__(self, *replies, clock, per_token, step=0.05, **kw):
        super().__init__(*replies, **kw)
        self.clock, self.per_token, self.step = clock, per_token, step
        self.chunks: list[int] = []
        self.on_chunk = None  # called after each chunk of a prompt (not its last token)

    def prefill(self, tokens, cache, chunk_size=512, logits=True):
        out = super().prefill(tokens, cache, chunk_size, logits)
        self.clock.t += tokens.shape[1] * self.per_token
        if not logits:
            self.chunks.append(tokens.shape[1])
            if self.on_chunk is not None:
                self.on_chunk(len(self.chunks))
        return out

    def __call__(self, tokens, cache=None):
        self.clock.t += self.step
        return super().__call__(tokens, cache)


def slow_engine(enc, per_token, reply="<|channel|>final<|message|>ok<|return|>", **kw):
    clock = Clock()
    model = Slow(reply, encoding=enc, clock=clock, per_token=per_token, max_context=8192, **kw)
    engine = Engine(model, enc)
    engine.pace.clock = clock
    return engine, model, clock


@pytest.fixture(scope="module")
def enc(tiny_model):
    return load_encoding(tiny_model)


def long_prompt(enc, words=900):
    return render_prompt(enc, build_conversation([user_message("word " * words)], date=""))


# ---- prefill chunks from the measured rate ----


def test_the_grid_of_chunk_sizes():
    assert grid(512) == [16, 32, 64, 128, 256, 512]
    assert grid(100) == [16, 32, 64, 100] and grid(4) == [4]
    pace = PrefillPace(512, clock=Clock())
    assert pace.size() == 16  # nothing measured yet: the smallest
    pace.measure(16, 16 / 20)  # 20 tokens/s: a 0.5 s chunk is 10 tokens, the grid's least 16
    assert pace.size() == 16
    pace.measure(16, 16 / 5000)  # fast: grows at most 4x a chunk, then to what fits 0.5 s
    assert pace.size() == 64 and pace.size(busy=True) == 64
    pace.measure(64, 64 / 5000)
    assert pace.size() == 256 and pace.size(busy=True) == 256
    pace.measure(256, 256 / 5000)
    assert pace.size() == 512 and pace.size(busy=True) == 256  # 0.1 s: 500 tokens
    pace.measure(3, 1.0, asked=512)  # a chunk cut short by the prompt's end: not counted
    assert pace.size() == 512


@pytest.mark.parametrize("tok_s", [20, 4000])
def test_chunks_follow_the_measured_rate(enc, tok_s):
    """A CPU's 20 tokens/s gets 16-token chunks (0.8 s each), not 512 (25 s); a fast device
    grows to the largest chunk. Every chunk after the first takes at most about a second."""
    engine, model, clock = slow_engine(enc, 1 / tok_s)
    prompt = long_prompt(enc, 2000)
    c = engine.complete(prompt, SamplingParams(max_tokens=4))
    assert c.final == "ok"
    assert sum(model.chunks) == len(prompt) - 1
    full = model.chunks[:-1]  # the last one ends at the prompt's end
    assert all(n / tok_s <= 2 * ALONE_S for n in full)
    assert max(full) == (16 if tok_s == 20 else 512)
    assert c.stats.prefilled_tokens == len(prompt) and c.stats.cached_tokens == 0


def test_a_cancel_during_a_long_prefill_acts_within_a_second(enc):
    """Ctrl-C (the cancel event) arrives while the 5th chunk runs on a 20 tokens/s machine:
    no further chunk runs, and the turn ends within a second of simulated time."""
    engine, model, clock = slow_engine(enc, 1 / 20)
    cancel, at = threading.Event(), {}

    def press(n):
        if n == 5:
            cancel.set()
            at["t"] = clock.t

    model.on_chunk = press
    c = engine.complete(long_prompt(enc), SamplingParams(max_tokens=4), cancel=cancel)
    assert c.stop_reason == "cancelled" and c.tokens == []
    assert len(model.chunks) == 5 and model.fed == []
    assert clock.t - at["t"] <= 1.0
    assert c.stats.prefilled_tokens == sum(model.chunks) and c.stats.cached_tokens == 0


def test_progress_and_the_stats_say_what_was_cached_and_read(enc):
    engine, model, clock = slow_engine(enc, 1 / 1000)
    prompt = long_prompt(enc)
    seen = []
    c = engine.complete(prompt, SamplingParams(max_tokens=4),
                        progress=lambda *a: seen.append(a))
    reads = [r for r, _, _ in seen]
    assert reads == sorted(reads) and reads[-1] == len(prompt) - 1
    assert len(seen) == len(model.chunks) > 3
    assert all(total == len(prompt) and tps > 0 for _, total, tps in seen)
    assert seen[-1][2] == pytest.approx(1000, rel=0.2)  # the simulated rate
    follow = prompt + c.tokens[:-1] + harmony_tokens(
        enc, "<|end|><|start|>user<|message|>" + "more " * 300 + "<|end|><|start|>assistant")
    model.push("<|channel|>final<|message|>ok<|return|>")
    seen.clear()
    s = engine.complete(follow, SamplingParams(max_tokens=4),
                        progress=lambda *a: seen.append(a)).stats
    assert s.cached_tokens == len(prompt) + len(c.tokens) - 1
    assert s.prefilled_tokens == len(follow) - s.cached_tokens
    assert seen[0][0] > s.cached_tokens and seen[-1][0] == len(follow) - 1


# ---- a newcomer beside decoding rows ----


class TimedRows(RowScripted):
    """RowScripted (per-row replies, batches) whose work takes simulated time."""

    def __init__(self, encoding, replies, clock, per_token, step):
        super().__init__(encoding, replies, max_context=8192)
        self.clock, self.per_token, self.step = clock, per_token, step

    def prefill(self, tokens, cache, chunk_size=512, logits=True):
        self.clock.t += tokens.shape[1] * self.per_token
        return super().prefill(tokens, cache, chunk_size, logits)

    def __call__(self, tokens, cache=None):
        self.clock.t += self.step
        return super().__call__(tokens, cache)


class TimedJob(Job):
    def __init__(self, prompt, params, clock):
        super().__init__(prompt, params)
        self.clock, self.times = clock, []

    def put(self, item):
        super().put(item)
        if getattr(item, "type", None) == "delta":
            self.times.append(self.clock.t)


def test_a_newcomer_prefills_between_steps_under_a_budget(enc):
    """A row decodes ("delta": 120 tokens); a 1,500-token prompt arrives. Its prefill runs one
    chunk per step, each about BUSY_S long, so the decoding row's tokens keep coming (no gap
    beyond a step plus a chunk), and the newcomer's first token comes within twice its
    prefill time alone."""
    clock, step, per_token = Clock(), 0.02, 1 / 1000
    model = TimedRows(enc, REPLIES, clock, per_token, step)
    engine = Engine(model, enc)
    engine.pace.clock = clock
    loop = Batcher(engine)
    chat = lambda marker, words: render_prompt(enc, build_conversation(  # noqa: E731
        [user_message(f"Say {marker}. " + "word " * words)], date=""))
    first = TimedJob(chat("delta", 5), SamplingParams(temperature=0, max_tokens=400), clock)
    loop.add(first)
    while len(first.times) < 10:
        loop.step()
    newcomer = TimedJob(chat("charlie", 1500), SamplingParams(temperature=0, max_tokens=40),
                        clock)
    t_add = clock.t
    loop.add(newcomer)
    while loop.busy:
        loop.step()
    assert first.completion.final == "la " * 120 and newcomer.completion.stop_reason == "stop"
    ttft = newcomer.times[0] - t_add
    prefill_alone = len(newcomer.conversation) * per_token
    during = [t for t in first.times if t_add <= t <= newcomer.times[0]]
    assert len(during) > 10  # the first row kept decoding while the newcomer was read
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) <= 2 * step + BUSY_S + 1e-9
    assert ttft <= 2 * prefill_alone


# ---- the compiled step for batches ----


@pytest.fixture(scope="module")
def tiny32(tiny_model):
    return load(tiny_model, dtype=mx.float32), load_encoding(tiny_model)


def test_compiled_rows_at_different_lengths_across_a_buffer_growth(tiny32):
    """A 250-token prompt beside short ones: its row crosses the full layers' first buffer
    (256 positions) while the others stay short; each row gets the greedy tokens it gets
    alone, and the step was traced for these batch shapes."""
    model, enc = tiny32
    dec = model.decoder()
    ps = prompts((250, 4, 17))
    want = [alone(model, enc, p, GREEDY).tokens for p in ps]
    traces = dec.traces
    seen = set()
    jobs = [Job(p, GREEDY) for p in ps]
    loop = Batcher(Engine(model, enc, prefill_chunk=64))
    for job in jobs:
        loop.add(job)
    while loop.busy:
        loop.step()
        if loop.store is not None and len(loop.store):
            seen.add((len(loop.store), loop.store.capacity))
    assert [j.completion.tokens for j in jobs] == want
    assert loop.store.compiled
    assert (3, 512) in seen and any(cap == 256 for _, cap in seen)
    assert dec.traces > traces


def test_serve_at_its_defaults_decodes_a_lone_stream_on_the_compiled_step(tiny32):
    """`serve`'s default --max-concurrency (4): a single request decodes on the compiled step
    (the decoder's compiled function runs once per token, for one row), not on the plain
    forward."""
    import argparse

    import httpx

    from oss_mlx.bench.serve import LoopbackServer
    from oss_mlx.cli.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    model, enc = tiny32
    dec = model.decoder()
    calls = []
    step = dec._step
    dec._step = lambda *a: calls.append(a[0].shape[0]) or step(*a)
    try:
        with LoopbackServer(Engine(model, enc), defaults.max_concurrency) as srv:
            r = httpx.post(srv.url, timeout=120, json={
                "model": "bench", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello there"}]})
    finally:
        dec._step = step
    assert r.status_code == 200, r.text
    generated = r.json()["usage"]["completion_tokens"]
    assert generated >= 2 and calls == [1] * len(calls) and len(calls) >= generated - 1

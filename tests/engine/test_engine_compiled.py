"""The engine decoding on the compiled step (oss_mlx.decode) against the same engine with
compiled=False (the plain forward, itself checked against a no-cache forward in test_engine.py):
the same greedy tokens and logprobs (1e-5, float32) across many wraps of the tiny model's
8-position sliding window, through prompt-cache reuse (an entry continued from its end, and a
prompt that branches at a generated <|end|>, restored from the snapshot taken there); the
conversion of mlx-lm's caches to the decoder's and back, against mlx-lm's own reads of the
original; which engines keep the plain path; and how often the step is traced."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from oss_mlx.model.decode import FixedKVCache, RingKVCache, capacity_for, to_decoder, to_mlx_lm
from oss_mlx.engine import Engine, SamplingParams
from oss_mlx.harmony import build_conversation, load_encoding, render_prompt, user_message
from oss_mlx.model import load
from oss_mlx.engine.prompt_cache import KVAdapter
from support.scripted import ScriptedModel, harmony_tokens

W = 8  # the tiny preset's sliding window
FIRST_SPECIAL = 199998  # o200k: ids from here on are special tokens
END, RETURN = 200007, 200002


@pytest.fixture(scope="module")
def enc(tiny_model):
    return load_encoding(tiny_model)


def fresh(tiny_model, kv_bits=None):
    """A model of its own (its own decoder, so its `traces` count only this test's)."""
    model = load(tiny_model, dtype=mx.float32)
    model.kv_bits = kv_bits
    return model


class Script:
    """A logits processor that records the model's logits at every step and steers greedy
    decoding through a harmony turn: the token of step i is plan[i] where that is an id, else
    the best ordinary (non-special) token; past the plan, <|return|>."""

    def __init__(self, plan, record: bool = True):
        self.plan, self.logits, self.record = plan, [], record

    def __call__(self, history, logits):
        if self.record:
            self.logits.append(logits)
        i = history.shape[0]  # this turn's tokens so far
        ids = mx.arange(logits.shape[-1])
        tok = self.plan[i] if i < len(self.plan) else RETURN
        if tok is None:
            return mx.where(ids < FIRST_SPECIAL, logits, -mx.inf)
        return mx.broadcast_to(mx.where(ids == tok, 0.0, -mx.inf), logits.shape)

    def logprobs(self) -> np.ndarray:
        out = np.concatenate([np.array(x, dtype=np.float64) for x in self.logits])
        top = out.max(-1, keepdims=True)
        return out - top - np.log(np.exp(out - top).sum(-1, keepdims=True))


def plan(enc, *parts):
    """A turn: harmony strings (forced tokens) and ints (that many free tokens)."""
    out = []
    for p in parts:
        out += [None] * p if isinstance(p, int) else harmony_tokens(enc, p)
    return out


def prompt_of(enc, text):
    return render_prompt(enc, build_conversation([user_message(text)], date="2025-01-01"))


def run(engine, prompt, steps, max_tokens=None, record=True):
    script = Script(steps, record)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens or len(steps) + 1,
                            logits_processors=[script])
    return engine.complete(prompt, params), script


def pair(model, enc, chunk):
    """The engine under test and its oracle, over one model."""
    return (Engine(model, enc, prefill_chunk=chunk),
            Engine(model, enc, prefill_chunk=chunk, compiled=False))


def assert_same(a, b):
    (ca, sa), (cb, sb) = a, b
    assert ca.tokens == cb.tokens and ca.stop_reason == cb.stop_reason
    assert ca.stats.cached_tokens == cb.stats.cached_tokens
    np.testing.assert_allclose(sa.logprobs(), sb.logprobs(), rtol=0, atol=1e-5)


FINAL = "<|channel|>final<|message|>"
NEXT = "<|end|><|start|>assistant"  # close a message, open the next one


# ---- the engine, compiled against compiled=False ----


def test_greedy_tokens_and_logprobs_across_the_window(tiny_model, enc):
    model = fresh(tiny_model)
    comp, plain = pair(model, enc, 5)
    prompt = prompt_of(enc, "one two three four five six")
    steps = plan(enc, "<|channel|>analysis<|message|>", 25, NEXT + FINAL, 20)
    ref = run(plain, prompt, steps)
    assert model.decoder().traces == 0  # the oracle is the plain forward
    got = run(comp, prompt, steps)
    assert model.decoder().traces >= 1  # and this one the compiled step
    assert_same(got, ref)
    c = got[0]
    assert c.stop_reason == "stop" and len(c.tokens) == len(steps) + 1 > 6 * W
    assert len(set(c.tokens)) > 20 and np.abs(got[1].logprobs()).max() > 1  # not degenerate


def test_prompt_cache_reuse_and_a_restore_from_an_end_snapshot(tiny_model, enc):
    """Turn 1: a preamble, an analysis and a final answer. Turn 2 keeps the preamble but drops
    the analysis: the prompt branches right after the preamble's generated <|end|>, where the
    rotating caches have long wrapped since, so the snapshot taken at that <|end|> is restored.
    Turn 3 continues turn 2 from its end (the entry taken over whole)."""
    model = fresh(tiny_model)
    comp, plain = pair(model, enc, 6)
    p1 = prompt_of(enc, "tell me something")
    s1 = plan(enc, "<|channel|>commentary<|message|>", 10,
              NEXT + "<|channel|>analysis<|message|>", 20, NEXT + FINAL, 9)
    t1 = run(comp, p1, s1), run(plain, p1, s1)
    assert_same(*t1)
    gen = t1[0][0].tokens
    assert t1[0][0].stop_reason == "stop" and gen.count(END) == 2
    k = gen.index(END) + 1  # through the preamble's <|end|>
    final = gen[len(s1) - 9 : len(s1)]  # the final answer's text
    user = "<|end|><|start|>user<|message|>and more<|end|><|start|>assistant"
    p2 = p1 + gen[:k] + harmony_tokens(enc, "<|start|>assistant" + FINAL) + final
    p2 += harmony_tokens(enc, user)
    s2 = plan(enc, FINAL, 17)
    t2 = run(comp, p2, s2), run(plain, p2, s2)
    assert_same(*t2)
    assert t2[0][0].stats.cached_tokens == len(p1) + k  # the <|end|> snapshot, not less
    p3 = p2 + t2[0][0].tokens[:-1] + harmony_tokens(enc, user)
    s3 = plan(enc, FINAL, 12)
    t3 = run(comp, p3, s3), run(plain, p3, s3)
    assert_same(*t3)
    assert t3[0][0].stats.cached_tokens == len(p2) + len(t2[0][0].tokens) - 1


def test_an_abandoned_stream_leaves_mlx_lm_caches_that_decode_on(tiny_model, enc):
    """A consumer that stops reading mid-turn: the engine keeps what was fed, on mlx-lm's
    caches, and the next request resumes from it as the plain engine does."""
    model = fresh(tiny_model)
    prompt = prompt_of(enc, "stop early")
    steps = plan(enc, FINAL, 40)
    runs = []
    for engine in pair(model, enc, 6):
        params = SamplingParams(temperature=0.0, max_tokens=41, logits_processors=[Script(steps)])
        for i, ev in enumerate(engine.stream(prompt, params)):
            if i == 20:
                break  # closes the generator
        (entry,) = engine.prompt_cache.entries
        assert {type(c) for c in entry.cache} == {KVCache, RotatingKVCache}
        assert len(entry.tokens) > len(prompt) + 2 * W
        again = [int(t) for t in entry.tokens] + harmony_tokens(enc, NEXT + FINAL)
        runs.append(run(engine, again, plan(enc, 15)))
    assert_same(*runs)
    assert runs[0][0].stats.cached_tokens == len(entry.tokens)


def test_a_compiled_turn_then_a_batched_follow_up(tiny_model, enc):
    """The entry a compiled turn leaves (its rotating caches in the ring's layout) merges into
    the batcher's caches (mlx-lm's BatchRotatingKVCache) and decodes as after a plain turn."""
    from oss_mlx.engine.batch import Batcher
    from test_batch import Job

    model = fresh(tiny_model)
    p1 = prompt_of(enc, "first turn")
    s1 = plan(enc, FINAL, 21)
    out = []
    for engine in pair(model, enc, 6):
        c1, _ = run(engine, p1, s1)
        follow = p1 + c1.tokens[:-1] + harmony_tokens(enc, "<|end|><|start|>user<|message|>"
                                                       "next<|end|><|start|>assistant")
        job = Job(follow, SamplingParams(temperature=0, max_tokens=12))
        batcher = Batcher(engine)
        batcher.add(job)
        while batcher.busy:
            batcher.step()
        out.append(job.completion)
    assert out[0].tokens == out[1].tokens and len(out[0].tokens) > 1
    assert out[0].stats.cached_tokens == out[1].stats.cached_tokens == len(p1) + len(s1)


@pytest.mark.slow  # 300 decode steps
def test_traced_a_bounded_number_of_times(tiny_model, enc):
    """300 tokens cross the full layers' first buffer (256 positions): two shapes, two traces.
    A second request, a longer prompt prefilled in 100-token chunks (alone, mlx-lm's KVCache
    would grow by 256 from wherever a chunk ended, to an odd capacity), decodes into a buffer on
    the same grid: no new trace."""
    model = fresh(tiny_model)
    dec = model.decoder()
    engine, oracle = pair(model, enc, 100)
    c, _ = run(engine, prompt_of(enc, "count"), plan(enc, FINAL, 300), 300, record=False)
    assert c.stop_reason == "length" and len(c.tokens) == 300
    assert 1 <= dec.traces <= 2
    traces = dec.traces
    engine.reset_cache()
    long = prompt_of(enc, " ".join(f"w{i}" for i in range(150)))
    assert 260 < len(long) < 400
    steps = plan(enc, FINAL, 30)
    assert_same(run(engine, long, steps), run(oracle, long, steps))
    assert dec.traces == traces


# ---- where the plain path stays ----


def test_quantized_kv_engines_decode_on_the_plain_path(tiny_model, enc):
    prompt = prompt_of(enc, "quantized")
    steps = plan(enc, FINAL, 12)
    q8 = fresh(tiny_model, kv_bits=8)
    dec = q8.decoder()
    got = run(Engine(q8, enc), prompt, steps)
    assert dec.traces == 0
    assert_same(got, run(Engine(q8, enc, compiled=False), prompt, steps))
    q8.kv_bits = None  # the same model and engine setup with float KV: compiled
    run(Engine(q8, enc), prompt, steps)
    assert dec.traces >= 1


class Watching:
    """A wrapper that forwards everything to the model and counts its one-token calls (as
    tests/scripted.py's PausingModel does to pause at a decode step)."""

    def __init__(self, model):
        self._model, self.steps = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, tokens, cache=None):
        self.steps += tokens.shape[1] == 1
        return self._model(tokens, cache)


def test_no_compile_wrappers_and_models_without_a_decoder_keep_the_plain_path(tiny_model, enc):
    model = fresh(tiny_model)
    dec = model.decoder()
    run(Engine(model, enc, compiled=False), prompt_of(enc, "plain"), plan(enc, FINAL, 5))
    assert dec.traces == 0
    watched = Watching(model)
    c, _ = run(Engine(watched, enc), prompt_of(enc, "watched"), plan(enc, FINAL, 5))
    assert watched.steps == len(c.tokens) - 1 > 5 and dec.traces == 0  # it saw every step
    scripted = ScriptedModel("<|channel|>final<|message|>Hi!<|return|>", encoding=enc)
    assert not hasattr(scripted, "decoder")
    c = Engine(scripted, enc).complete(prompt_of(enc, "hi"), SamplingParams(max_tokens=20))
    assert c.final == "Hi!" and c.stop_reason == "stop"


def test_no_compile_flag_reaches_the_engine(tiny_model):
    import argparse

    from oss_mlx.cli import options
    from oss_mlx.cli.generate import add_arguments
    from oss_mlx.engine.loading import load_engine

    p = argparse.ArgumentParser()
    add_arguments(p)
    for argv, compiled in (([], True), (["--no-compile"], False)):
        args = p.parse_args(["--model", str(tiny_model), "--prompt", "x"] + argv)
        assert load_engine(str(tiny_model), options.load_options(args)).compiled is compiled


# ---- the conversion, against mlx-lm's own reads of the original ----


def _kv(rng, n):
    return mx.array(rng.standard_normal((1, 2, n, 4)).astype(np.float32))


def _rotating(history):
    """A RotatingKVCache(8) after writes of these sizes (1: mlx-lm's in-place path, more: its
    concatenating path); "undo": KVAdapter.undo_last_token, as the prompt cache's release."""
    rng = np.random.default_rng(len(history))
    r = RotatingKVCache(max_size=W)
    for n in history:
        if n == "undo":
            KVAdapter().undo_last_token(r)
        else:
            r.update_and_fetch(_kv(rng, n), _kv(rng, n))
    return r


def _last(r, a, n):
    """The last n positions of a RotatingKVCache in time order, as mlx-lm reads them."""
    t = np.array(r._temporal_order(a))
    return t[:, :, t.shape[2] - n:]


HISTORIES = {
    "not full, one prefill": [5],
    "not full, then single tokens": [3, 1, 1],
    "exactly full, one prefill": [8],
    "exactly full, single tokens": [5, 1, 1, 1],
    "wrapped, single tokens": [5] + [1] * 10,
    "wrapped, a prefill holding more than the window": [3, 1, 14],
    "wrapped, a prefill after single tokens": [6, 1, 1, 1, 5],
    "wrapped, then the last token undone": [4] + [1] * 9 + ["undo"],
    "a multiple of the window": [16],
}


@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_rotating_round_trip(history):
    r = _rotating(history)
    (ring,) = to_decoder([r])
    assert isinstance(ring, RingKVCache) and ring.keys.shape[2] == W and ring.offset == r.offset
    # the ring: position p in slot p % W (the decoder's layout)
    n = min(r.offset, W)
    want = _last(r, r.keys, n)
    slots = [p % W for p in range(r.offset - n, r.offset)]
    np.testing.assert_array_equal(np.array(ring.keys)[:, :, slots], want)
    (back,) = to_mlx_lm([ring])
    assert type(back) is RotatingKVCache and back.offset == r.offset and back.keep == 0
    assert back.state[2] == r.offset and back.size() == r.size()
    np.testing.assert_array_equal(_last(back, back.keys, n), want)
    np.testing.assert_array_equal(_last(back, back.values, n), _last(r, r.values, n))
    # mlx-lm's own writes go on identically on both (what later queries see)
    rng = np.random.default_rng(99)
    for size in (1, 3, 1, 1, 9, 1):
        k, v = _kv(rng, size), _kv(rng, size)
        got, ref = back.update_and_fetch(k, v), r.update_and_fetch(k, v)
        if size > 1:  # the concatenating path returns the keys the new queries attend over
            np.testing.assert_array_equal(np.array(got[0]), np.array(ref[0]))
        m = min(back.offset, W)
        np.testing.assert_array_equal(_last(back, back.keys, m), _last(r, r.keys, m))
    assert back.offset == r.offset


@pytest.mark.parametrize("history", [[5] + [1] * 11, [5] + [1] * 12, [16, 1], [3, 1]])
def test_undoing_the_last_token_after_a_round_trip(history):
    """The prompt cache's release undoes the stop token fed last, one token written alone
    (KVAdapter.undo_last_token): on the converted cache as on the original, also when offset is
    a multiple of the window."""
    r = _rotating(history)
    (back,) = to_mlx_lm(to_decoder([r]))
    rng = np.random.default_rng(5)
    for c in (r, back):
        KVAdapter().undo_last_token(c)
    assert back.offset == r.offset and 0 <= back._idx <= W
    for size in (1, 4, 1):
        k, v = _kv(rng, size), _kv(rng, size)
        got, ref = back.update_and_fetch(k, v), r.update_and_fetch(k, v)
        m = min(r.offset, W)
        np.testing.assert_array_equal(_last(back, back.keys, m), _last(r, r.keys, m))
        if size > 1:
            np.testing.assert_array_equal(np.array(got[1]), np.array(ref[1]))


def test_round_trip_back_is_shared_and_stays_a_ring():
    """After one conversion the layout is a ring: converting again moves no data."""
    (ring,) = to_decoder([_rotating([5] + [1] * 6)])
    (back,) = to_mlx_lm([ring])
    assert back.keys is ring.keys
    (again,) = to_decoder([back])
    assert again.keys is ring.keys and again.offset == ring.offset


@pytest.mark.parametrize("chunks", [[5], [200, 56], [255, 5, 40]])
def test_kv_round_trip(chunks):
    rng = np.random.default_rng(0)
    c = KVCache()
    for n in chunks:
        c.update_and_fetch(_kv(rng, n), _kv(rng, n))
    (f,) = to_decoder([c])
    assert isinstance(f, FixedKVCache) and f.offset == c.offset
    assert f.capacity() == capacity_for(f.capacity()) >= f.offset  # on the grid
    if c.keys.shape[2] == capacity_for(c.keys.shape[2]):
        assert f.keys is c.keys  # shared, no copy
    (back,) = to_mlx_lm([f])
    assert type(back) is KVCache and back.offset == c.offset
    for a, b in zip(back.state[:2], c.state[:2]):
        n = c.offset
        np.testing.assert_array_equal(np.array(a[..., :n, :]), np.array(b[..., :n, :]))
    k, v = _kv(rng, 3), _kv(rng, 3)
    np.testing.assert_array_equal(np.array(back.update_and_fetch(k, v)[0]),
                                  np.array(c.update_and_fetch(k, v)[0]))


def test_presize_keeps_a_chunked_prefill_on_the_grid(tiny_model):
    """mlx-lm alone ends a 100-token-chunk prefill of 299 at capacity 456; presized, the buffer
    holds 512 throughout, the same logits come out, and to_decoder shares it."""
    model = fresh(tiny_model)
    tokens = mx.array(np.random.default_rng(3).integers(0, 199998, (1, 299)))
    plain, sized = model.make_cache(), model.make_cache()
    model.decoder().presize(sized, 300)
    want = model.prefill(tokens, plain, chunk_size=100)
    got = model.prefill(tokens, sized, chunk_size=100)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert plain[1].keys.shape[2] == 456 and sized[1].keys.shape[2] == 512
    assert sized[0].keys.shape == plain[0].keys.shape  # the rotating layers are left alone
    assert to_decoder(sized)[1].keys is sized[1].keys


def test_capacity_grid():
    """Few shapes (few traces) up to the full context, and little masked waste: a capacity is at
    most 256 positions or a sixteenth more than what it must hold."""
    grid = [capacity_for(1)]
    while grid[-1] < 131072:
        grid.append(capacity_for(grid[-1] + 1))
    assert grid[:16] == list(range(256, 4097, 256))
    assert len(grid) < 80
    assert all(capacity_for(g) == g for g in grid)
    for n in range(1, 140000, 97):
        assert n <= capacity_for(n) <= max(n + 255, n * 17 // 16 + 1), n
    assert capacity_for(1100, limit=1200) == 1200 and capacity_for(1300, limit=1200) == 1536

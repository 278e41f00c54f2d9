"""The compiled decode step (oss_mlx/decode.py) against the plain forward, which is itself
checked against the numpy reference and the transformers goldens (test_model.py): the same
logits (1e-5, float32) and greedy tokens across the sliding window, after prompt-cache copies
and trims, and for a batch; and the ring/fixed caches on the plain path against a count of the
keys each query sees."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from oss_mlx.model.decode import FixedKVCache, RingKVCache
from oss_mlx.model import load

from test_model import counting_model, keys_seen

WINDOW = 8  # the tiny preset's sliding window


@pytest.fixture(scope="module")
def model32(tiny_model):
    return load(tiny_model, dtype=mx.float32)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(7).integers(0, 201088, 64)


def greedy(model, prompt, n, compiled: bool, chunk_size=3):
    """n greedy tokens after `prompt` [B, T]; returns (tokens [B, n], logits [n, B, V])."""
    dec = model.decoder()
    cache = dec.make_cache() if compiled else model.make_cache()
    logits = model.prefill(mx.array(prompt), cache, chunk_size=chunk_size)
    toks, outs = [], []
    for _ in range(n):
        y = mx.argmax(logits, axis=-1)
        toks.append(np.array(y))
        logits = dec(y[:, None], cache) if compiled else model(y[:, None], cache=cache)[:, -1]
        outs.append(np.array(logits))
    return np.stack(toks, axis=1), np.stack(outs)


def test_compiled_step_equals_plain_path_across_the_window(model32, ids):
    # 5 prompt tokens, then 40 steps: the ring (8 slots) wraps five times, the full layers'
    # buffer stays within its first 256 positions.
    t_plain, l_plain = greedy(model32, ids[None, :5], 40, compiled=False)
    t_comp, l_comp = greedy(model32, ids[None, :5], 40, compiled=True)
    assert np.array_equal(t_plain, t_comp)
    np.testing.assert_allclose(l_comp, l_plain, rtol=0, atol=1e-5)
    assert np.abs(l_plain).max() > 1  # real logits, not a degenerate model


def test_compiled_step_feeding_given_tokens_after_a_long_prefill(model32, ids):
    # Teacher-forced: the compiled step on a prompt longer than the window, prefilled in
    # chunks that straddle the ring's wrap, equals the full forward's rows.
    full = np.array(model32(mx.array(ids[None]))[0])
    dec = model32.decoder()
    cache = dec.make_cache()
    model32.prefill(mx.array(ids[None, :21]), cache, chunk_size=5, logits=False)
    rows = [np.array(dec(mx.array(ids[None, i : i + 1]), cache))[0] for i in range(21, 64)]
    np.testing.assert_allclose(np.stack(rows), full[21:], rtol=0, atol=1e-4)


def test_prompt_cache_copies_and_trims(model32, ids):
    """A copied cache decodes on as the original did; a trimmed full cache plus a ring not yet
    wrapped (offset < window) decodes as a fresh prefill of the shorter history."""
    dec = model32.decoder()
    cache = dec.make_cache()
    model32.prefill(mx.array(ids[None, :6]), cache, chunk_size=4, logits=False)
    saved = [c.copy() for c in cache]
    first = [np.array(dec(mx.array(ids[None, i : i + 1]), cache)) for i in range(6, 30)]
    again = [np.array(dec(mx.array(ids[None, i : i + 1]), saved)) for i in range(6, 30)]
    np.testing.assert_allclose(np.stack(again), np.stack(first), rtol=0, atol=0)

    cache = dec.make_cache()
    model32.prefill(mx.array(ids[None, :7]), cache, chunk_size=4, logits=False)
    assert all(c.is_trimmable() for c in cache)
    assert all(c.trim(3) == 3 for c in cache)  # back to the first 4 tokens
    out = [np.array(dec(mx.array(ids[None, i : i + 1]), cache)) for i in range(4, 20)]
    ref = model32.make_cache()
    model32.prefill(mx.array(ids[None, :4]), ref, logits=False)
    want = [np.array(model32(mx.array(ids[None, i : i + 1]), cache=ref)[:, -1]) for i in range(4, 20)]
    np.testing.assert_allclose(np.stack(out), np.stack(want), rtol=0, atol=1e-5)
    assert not cache[0].is_trimmable()  # the ring has wrapped: positions were overwritten


def test_batched_compiled_step(model32, ids):
    prompt = np.stack([ids[:9], ids[20:29]])
    t_plain, l_plain = greedy(model32, prompt, 12, compiled=False)
    t_comp, l_comp = greedy(model32, prompt, 12, compiled=True)
    assert np.array_equal(t_plain, t_comp)
    np.testing.assert_allclose(l_comp, l_plain, rtol=0, atol=1e-5)


def test_traced_again_only_when_a_buffer_grows(model32, ids):
    dec = model32.decoder()
    cache = dec.make_cache()
    model32.prefill(mx.array(ids[None, :4]), cache, logits=False)
    traces = dec.traces
    y = mx.array(ids[None, 4:5])
    for _ in range(300):  # the full layers' buffer: 256 positions, then 256 more
        y = mx.argmax(dec(y, cache), axis=-1)[:, None]
        mx.eval(y)
    assert cache[1].capacity() == 512 and cache[1].offset == 304
    assert cache[0].keys.shape[2] == WINDOW
    assert dec.traces - traces <= 2  # this buffer shape (maybe new) and the grown one


@pytest.mark.parametrize("chunks", [[20], [5, 5, 5, 5], [1] * 20, [12, 1, 1, 9, 1, 3], [3, 1, 20]])
def test_ring_and_fixed_caches_show_exactly_the_window(chunks):
    """The counting model of test_model: attention outputs n / (n + 1) for n visible keys."""
    model = counting_model()
    cache = [RingKVCache(8), FixedKVCache()]
    seen = keys_seen(model, cache, chunks)
    pos = np.arange(sum(chunks))
    assert seen[0] == list(np.minimum(pos + 1, 8))
    assert seen[1] == list(pos + 1)
    assert cache[0].keys.shape[2] == 8  # never more than the window

"""Quantized KV cache with sinks (oss_mlx.kv_quant) against a numpy reference written from the
docs/model.md §1.4 (step 6: the sink is one more logit, softmax over T_k + 1, no value), and the model and
engine running on it (prefill chunks, decode, across the sliding window, the prompt cache)."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

from oss_mlx.model import kv_quant
from oss_mlx.engine import memory
from oss_mlx.engine import Engine, SamplingParams
from oss_mlx.harmony import build_conversation, render_prompt, user_message
from oss_mlx.model.kv_quant import QuantizedKVCache


# ---- numpy oracle ------------------------------------------------------------------------


def np_dequantize(packed, scales, biases, bits, group_size=64):
    """MLX's affine format from its definition: little-endian codes of `bits` bits packed in
    uint32 words, w = scale * code + bias per group of `group_size` along the last axis."""
    packed = np.asarray(packed).astype(np.uint64)
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint64) * bits)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], -1).astype(np.float64)
    g = codes.reshape(*codes.shape[:-1], -1, group_size)
    w = g * np.asarray(scales, np.float64)[..., None] + np.asarray(biases, np.float64)[..., None]
    return w.reshape(codes.shape)


def np_attention_with_sinks(q, k, v, sinks, scale):
    """q [n_q, L, D]; k, v [n_kv, S, D]; the L queries are the last L of the S positions (causal).
    docs/model.md §1.4 step 6: z = concat(s, sink), P = softmax(z), drop the sink column, o = P @ v."""
    n_q, L, _ = q.shape
    n_kv, S, _ = k.shape
    out = np.empty_like(q, dtype=np.float64)
    allowed = np.arange(S - L, S)[:, None] >= np.arange(S)[None]
    for h in range(n_q):
        kv = h // (n_q // n_kv)
        s = np.where(allowed, q[h] @ k[kv].T * scale, -np.inf)
        z = np.concatenate([s, np.full((L, 1), sinks[h])], axis=1)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
        out[h] = p[:, :-1] @ v[kv]
    return out


def test_dequantize_oracle_matches_the_format():
    """The numpy dequantizer reads the packed format the way mx.dequantize does (so the
    attention oracle below is built on the right keys), for both bit widths."""
    x = mx.random.normal((2, 5, 128), key=mx.random.key(0))
    for bits in (8, 4):
        wq, s, b = mx.quantize(x, group_size=64, bits=bits)
        ours = np_dequantize(wq, s, b, bits)
        np.testing.assert_allclose(ours, np.array(mx.dequantize(wq, s, b, 64, bits)), atol=1e-5)
        # and it is a quantization of x: error within one step of each group's scale (MLX moves
        # the bias so that 0 is exact, which can cost up to a step at the edge of a group)
        err = np.abs(ours - np.array(x)).reshape(2, 5, 2, 64).max(-1)
        assert (err <= np.abs(np.array(s)) * 1.01 + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_with_sinks_matches_numpy_prefill_and_decode(bits):
    """Chunks of 5 and 7 queries (prefill path) then 4 single-token steps (decode path), GQA
    4 q / 2 kv heads, big sinks (so a wrong denominator shows): each output equals docs/model.md §1.4's
    attention over the cache's dequantized keys and values."""
    n_q, n_kv, D = 4, 2, 64
    rng = np.random.default_rng(bits)
    sinks = mx.array(rng.normal(0, 2, n_q).astype(np.float32))
    scale = D**-0.5
    cache = QuantizedKVCache(bits)
    for L in (5, 7, 1, 1, 1, 1):
        q, k, v = (mx.array(rng.normal(0, 1, (1, h, L, D)).astype(np.float32))
                   for h in (n_q, n_kv, n_kv))
        keys, values = cache.update_and_fetch(k, v)
        mask = "causal" if L > 1 else None
        got = kv_quant.attention(q, keys, values, scale, mask, sinks, 64, bits)
        kd = np_dequantize(*keys, bits)[0]
        vd = np_dequantize(*values, bits)[0]
        ref = np_attention_with_sinks(np.array(q)[0], kd, vd, np.array(sinks), scale)
        np.testing.assert_allclose(np.array(got)[0], ref, atol=2e-5, rtol=1e-4)
    assert cache.offset == 16


def test_sink_only_enlarges_the_denominator():
    """A huge sink takes all the mass (output ~0); a very negative one gives plain softmax."""
    n_q, n_kv, D = 2, 1, 64
    q = mx.random.normal((1, n_q, 1, D), key=mx.random.key(1))
    k = mx.random.normal((1, n_kv, 6, D), key=mx.random.key(2))
    cache = QuantizedKVCache(8)
    keys, values = cache.update_and_fetch(k, k)
    big = kv_quant.attention(q, keys, values, 0.125, None, mx.array([30.0, 30.0]))
    assert float(mx.abs(big).max()) < 1e-6
    none = kv_quant.attention(q, keys, values, 0.125, None, mx.array([-1e9, -1e9]))
    kd = np_dequantize(*keys, 8)[0, 0]
    s = np.array(q)[0, :, 0] @ kd.T * 0.125
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(np.array(none)[0, :, 0], p @ kd, atol=1e-5)


def test_cache_interface_trim_and_copy():
    c = QuantizedKVCache(8)
    k = mx.random.normal((1, 2, 10, 64), key=mx.random.key(3))
    c.update_and_fetch(k, k)
    snap = c.copy()
    assert c.is_trimmable() and c.trim(4) == 4 and c.offset == 6
    c.update_and_fetch(k[:, :, :3] * 0 + 5.0, k[:, :, :3])
    keys, _ = snap.keys_and_values()
    assert snap.offset == 10 and keys[0].shape[2] == 10
    # the copy kept the original rows 6..8 while the original now holds the new ones
    np.testing.assert_allclose(np.array(mx.dequantize(*[a[:, :, 6:9] for a in keys], 64, 8)),
                               np.array(k[:, :, 6:9]), atol=0.05)
    with pytest.raises(ValueError):
        QuantizedKVCache(3)


def test_kv_bytes_per_element():
    assert memory.kv_element_bytes(None) == 2
    assert memory.kv_element_bytes(8) == 1 + 4 / 64
    assert memory.kv_element_bytes(4) == 0.5 + 4 / 64
    c = QuantizedKVCache(8)
    c.update_and_fetch(*(mx.zeros((1, 2, 256, 64), mx.bfloat16),) * 2)
    assert c.nbytes == 2 * 2 * 256 * 64 * memory.kv_element_bytes(8)


# ---- the model on quantized caches ---------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model):
    from oss_mlx.model import load

    return load(tiny_model, dtype=mx.float32)


def _tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 200000, (1, n)), dtype=mx.int32)


def _step_by_step(model, tokens, kv_bits):
    cache = model.make_cache(kv_bits=kv_bits)
    out = [model(tokens[:, i : i + 1], cache)[0, -1] for i in range(tokens.shape[1])]
    return mx.stack(out), cache


def test_make_cache_quantizes_only_full_layers(model):
    from mlx_lm.models.cache import RotatingKVCache

    cache = model.make_cache(kv_bits=8)
    kinds = [type(c) for c in cache]
    assert kinds == [RotatingKVCache, QuantizedKVCache] * 2
    assert [c.bits for c in cache[1::2]] == [8, 8]
    assert not any(isinstance(c, QuantizedKVCache) for c in model.make_cache())


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_prefill_equals_decode_on_quantized_cache(model, bits):
    """Every key is quantized on its own (group 64 = head_dim), so chunked prefill (dequantize
    + fused attention) and token-by-token decode (quantized matmuls) see the same cache: the
    logits agree to float32 rounding, across the 8-token window and chunk boundaries."""
    T = 29
    tokens = _tokens(T + 1, seed=bits)
    steps, _ = _step_by_step(model, tokens, bits)
    for chunk in (4, 7, 64):
        cache = model.make_cache(kv_bits=bits)
        last = model.prefill(tokens[:, :T], cache, chunk_size=chunk)
        np.testing.assert_allclose(np.array(last[0]), np.array(steps[T - 1]), atol=2e-4, rtol=1e-4)
        nxt = model(tokens[:, T:], cache)[0, -1]  # then a decode step on the prefilled cache
        np.testing.assert_allclose(np.array(nxt), np.array(steps[T]), atol=2e-4, rtol=1e-4)


def test_quantized_logits_close_to_float_cache(model):
    """8-bit KV stays close to the float cache over a sequence 5x the window: top-1 agrees at
    nearly every position and the logit error is small against the logits' spread (4-bit is
    looser; both errors are measured in benchmarks/kv_quant.py on longer contexts)."""
    tokens = _tokens(40, seed=5)
    ref, _ = _step_by_step(model, tokens, None)
    spread = float(mx.std(ref))
    for bits, tol, agree in ((8, 0.02, 0.97), (4, 0.2, 0.8)):
        got, _ = _step_by_step(model, tokens, bits)
        err = mx.abs(got - ref)
        assert float(err.max()) < tol * spread * 10
        assert float(err.mean()) < tol * spread
        top1 = float((mx.argmax(got, -1) == mx.argmax(ref, -1)).mean())
        assert top1 >= agree


# ---- the engine's prompt cache and snapshots on quantized caches ---------------------------


def test_prompt_cache_and_snapshots_with_quantized_caches(model, tiny_model):
    """The engine's prompt cache with kv_bits=8: follow-up turns reuse the cache (trimmed quantized caches,
    restored rotating snapshots) and give a cold 8-bit start's logits."""
    from oss_mlx import harmony

    enc = harmony.load_encoding(tiny_model)
    model.kv_bits = 8
    try:
        warm = Engine(model, enc, prefill_chunk=5)
        words = " ".join(f"w{i}" for i in range(20))
        p1 = render_prompt(enc, build_conversation([user_message(words)], date="2025-01-01"))
        c1 = warm.complete(p1, SamplingParams(temperature=0.0, max_tokens=6))
        held = p1 + c1.tokens[:-1]  # what the prompt cache holds after the turn
        cache, n = warm.acquire(held + [200006])
        assert n == len(held) and isinstance(cache[1], QuantizedKVCache)
        warm.release(held, cache)
        tail = harmony.render_prompt(enc, build_conversation(
            [user_message(words), user_message("and more words")], date="2025-01-01"))
        prompts = [p1 + c1.tokens, p1, tail, p1[:-3], p1 + c1.tokens[:-1] + tail[-9:]]
        for p in prompts:
            got = np.array(warm.logits(p))
            cold = Engine(model, enc, prefill_chunk=5)
            ref = np.array(cold.logits(p))
            np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
        assert len(warm.cached_tokens) == len(prompts[-1])
        # the reuse really happened: a prompt that extends the cached one prefills only its tail
        c = warm.complete(prompts[-1] + [200006], SamplingParams(temperature=0.0, max_tokens=2))
        assert c.stats.cached_tokens == len(prompts[-1])
    finally:
        model.kv_bits = None


def test_saved_and_reloaded_quantized_cache_keeps_working(model, tmp_path):
    """mlx-lm's save/load_prompt_cache round trip (it rebuilds mlx-lm's own class): the model
    still takes the sink-aware path and gives the same next logits."""
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    tokens = _tokens(21, seed=9)
    cache = model.make_cache(kv_bits=8)
    model.prefill(tokens[:, :20], cache, chunk_size=8)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert kv_quant.is_quantized(loaded[1]) and loaded[1].offset == 20
    a = model(tokens[:, 20:], cache)[0, -1]
    b = model(tokens[:, 20:], loaded)[0, -1]
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)

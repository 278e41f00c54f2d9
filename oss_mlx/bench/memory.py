"""Measuring what a model really takes (the memory plan's oracle): load, prefill a context in
chunks into a cache of the chosen format, decode a few steps; MLX's peak memory against the
plan's figures (tests/engine/test_memory.py, benchmarks/memory_kv.py)."""

from __future__ import annotations

from oss_mlx.defaults import PREFILL_CHUNK


def measure(model_dir, context: int, kv_bits=None, chunk: int = PREFILL_CHUNK,
            dtype: str = "bfloat16", decode_steps: int = 2, seed: int = 0) -> dict:
    """Load the model, prefill `context` random tokens in `chunk`s into a `kv_bits` cache,
    decode a few steps; MLX's peak memory over all of it, against the plan's figures."""
    import gc

    import mlx.core as mx
    import numpy as np

    from oss_mlx.model import load

    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load(model_dir, dtype=dtype)
    weights = mx.get_active_memory() - base
    cache = model.make_cache(kv_bits=kv_bits)
    n = context - decode_steps
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, model.config.vocab_size, (1, n)), dtype=mx.int32)
    y = mx.argmax(model.prefill(tokens, cache, chunk_size=chunk), axis=-1)
    for _ in range(decode_steps):
        y = mx.argmax(model(y[:, None], cache)[:, -1], axis=-1)
        mx.eval(y)
    kv = sum(c.nbytes for c in cache)
    peak = mx.get_peak_memory() - base
    del model, cache
    gc.collect()
    mx.clear_cache()
    return {"peak": peak, "weights": weights, "kv": kv, "working": peak - weights - kv}

"""Quantized KV and dense-weight quantization: logit error, memory and decode speed.

    python benchmarks/memory_kv.py error --model DIR [--dense DIR8 DIR4] [--positions 2048]
    python benchmarks/memory_kv.py speed --model DIR --contexts 4096,32768
    python benchmarks/memory_kv.py kv-memory --contexts 32768,131072

error: teacher-forced logits over `positions` random tokens (chunks of --chunk, every position
scored; the KV error counts positions past the first window), for each KV format against the
full-precision cache; and, with --dense, each quantized-dense model against the bf16-weight
one with the same cache. Reports the max
and mean absolute logit error, both over the logits' std, and the top-1 agreement.

speed: decode tokens/s with the cache already holding `context` positions. The full layers'
caches are filled with random keys/values of the right shape (decode reads them whatever they
hold), so a 32k context costs no 32k-token prefill on a CPU; the sliding layers hold their
window. Median of `--steps` steps after 2 warm-up steps.

attention: one full-attention layer's decode attention alone at each context and KV format
(cheap: no model), to see what the format changes without the rest of the step.

kv-memory: the KV cache bytes at each context, from the plan and measured (cache.nbytes after
filling real caches of one full and one sliding layer of gpt-oss-20b / -120b shape, times the
layer counts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np

from oss_mlx.defaults import KV_BITS
from oss_mlx.engine import memory
from oss_mlx.model import load


class _Stats:
    """Running max / mean absolute logit error, logit std of the reference, top-1 agreement."""

    def __init__(self):
        self.max = self.sum = self.n = self.agree = self.rows = 0.0
        self.ref_sum = self.ref_sq = 0.0

    def add(self, ref, got):
        err = mx.abs(ref - got)
        self.max = max(self.max, float(err.max()))
        self.sum += float(err.sum())
        self.n += err.size
        self.ref_sum += float(ref.sum())
        self.ref_sq += float((ref * ref).sum())
        self.agree += float((mx.argmax(ref, -1) == mx.argmax(got, -1)).sum())
        self.rows += ref.shape[0]

    def result(self):
        std = (self.ref_sq / self.n - (self.ref_sum / self.n) ** 2) ** 0.5
        mean = self.sum / self.n
        return {"positions": int(self.rows), "max_abs": self.max, "mean_abs": mean,
                "max_over_std": self.max / std, "mean_over_std": mean / std,
                "top1_agreement": self.agree / self.rows}


def error(args):
    """All runs advance chunk by chunk in lockstep, so only one chunk of logits is alive."""
    dtype = args.dtype
    ref_model = load(args.model, dtype=dtype)
    W = ref_model.config.sliding_window
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, ref_model.config.vocab_size, (1, args.positions)),
                      dtype=mx.int32)
    runs = {f"kv {b}-bit": (ref_model, b) for b in KV_BITS}
    runs.update({f"dense {f}": (load(f, dtype=dtype), None) for f in args.dense or []})
    caches = {k: m.make_cache(kv_bits=b) for k, (m, b) in runs.items()}
    ref_cache = ref_model.make_cache()
    stats = {k: _Stats() for k in runs}
    for i in range(0, args.positions, args.chunk):
        t = tokens[:, i : i + args.chunk]
        ref = ref_model(t, ref_cache)[0].astype(mx.float32)
        for k, (m, _) in runs.items():
            got = m(t, caches[k])[0].astype(mx.float32)
            skip = max(0, W - i) if k.startswith("kv") else 0  # KV error only past the window
            stats[k].add(ref[skip:], got[skip:])
    print(json.dumps({"model": args.model, "dtype": dtype, "window": W, "chunk": args.chunk,
                      **{k: s.result() for k, s in stats.items()}}, indent=2))


def _fill(cache, cfg, context, dtype):
    rng = mx.random.key(0)
    for c in cache:
        n = context if not hasattr(c, "max_size") else cfg.sliding_window
        for i in range(0, n, 4096):
            m = min(4096, n - i)
            k = mx.random.normal((1, cfg.num_key_value_heads, m, cfg.head_dim), key=rng).astype(dtype)
            c.update_and_fetch(k, k)
            mx.eval([a for a in (c.keys if isinstance(c.keys, tuple) else (c.keys,))])
        c.offset = context  # RoPE position of the next token; the window stays as filled


def speed(args):
    model = load(args.model)
    cfg = model.config
    rows = []
    for context in [int(x) for x in args.contexts.split(",")]:
        for bits in (None,) + KV_BITS:
            cache = model.make_cache(kv_bits=bits)
            _fill(cache, cfg, context, model.dtype)
            y = mx.array([[1]])
            times = []
            for i in range(args.steps + 2):
                tic = time.perf_counter()
                y = mx.argmax(model(y, cache)[:, -1], axis=-1)[:, None]
                mx.eval(y)
                if i >= 2:
                    times.append(time.perf_counter() - tic)
            row = {"context": context, "kv": f"{bits}-bit" if bits else str(model.dtype).split(".")[-1],
                   "decode_tps": 1 / statistics.median(times), "kv_bytes": sum(c.nbytes for c in cache)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache
            mx.clear_cache()


def attention_speed(args):
    """One gpt-oss full-attention layer's decode attention (64 q / 8 kv heads, head_dim 64)
    against `context` cached positions: fused sdpa on the bf16 cache vs kv_quant.attention on
    the 8/4-bit one. Median of --steps calls."""
    from mlx_lm.models.cache import KVCache

    from oss_mlx.model import kv_quant

    sinks = mx.zeros((64,), mx.bfloat16)
    q = mx.random.normal((1, 64, 1, 64)).astype(mx.bfloat16)
    for context in [int(x) for x in args.contexts.split(",")]:
        for bits in (None,) + KV_BITS:
            c = kv_quant.QuantizedKVCache(bits) if bits else KVCache()
            from oss_mlx.config import PRESETS

            _fill([c], PRESETS["20b"], context, mx.bfloat16)
            k, v = c.keys_and_values() if bits else (c.keys[..., :context, :], c.values[..., :context, :])

            def call():
                if bits:
                    return kv_quant.attention(q, k, v, 0.125, None, sinks, 64, bits)
                return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, sinks=sinks)

            for _ in range(2):
                mx.eval(call())
            times = []
            for _ in range(args.steps):
                tic = time.perf_counter()
                mx.eval(call())
                times.append(time.perf_counter() - tic)
            print(json.dumps({"context": context, "kv": bits or 16,
                              "attention_ms": 1000 * statistics.median(times)}), flush=True)


def kv_memory(args):
    from oss_mlx.config import PRESETS
    from oss_mlx.model.kv_quant import QuantizedKVCache
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    for name in ("20b", "120b"):
        cfg = PRESETS[name]
        n_sliding, n_full = memory._layers(cfg)
        for context in [int(x) for x in args.contexts.split(",")]:
            for bits in (None,) + KV_BITS:
                full = QuantizedKVCache(bits) if bits else KVCache()
                _fill([full], cfg, context, mx.bfloat16)
                sliding = RotatingKVCache(max_size=cfg.sliding_window)
                _fill([sliding], cfg, context, mx.bfloat16)
                measured = n_full * full.nbytes + n_sliding * sliding.nbytes
                planned = memory.kv_bytes(cfg, context, bits, chunk=0)
                print(json.dumps({"model": name, "context": context, "kv": bits or 16,
                                  "measured_bytes": measured, "plan_bytes": planned}), flush=True)
                del full, sliding
                mx.clear_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("error")
    e.add_argument("--model", required=True)
    e.add_argument("--dense", nargs="*")
    e.add_argument("--positions", type=int, default=2048)
    e.add_argument("--chunk", type=int, default=128)
    e.add_argument("--dtype", default="float32", help="compute dtype of every run (float32: "
                   "the error is the quantization's alone)")
    s = sub.add_parser("speed")
    s.add_argument("--model", required=True)
    s.add_argument("--contexts", default="4096,32768")
    s.add_argument("--steps", type=int, default=6)
    a = sub.add_parser("attention")
    a.add_argument("--contexts", default="4096,32768")
    a.add_argument("--steps", type=int, default=20)
    m = sub.add_parser("kv-memory")
    m.add_argument("--contexts", default="32768,131072")
    args = p.parse_args()
    {"error": error, "speed": speed, "kv-memory": kv_memory, "attention": attention_speed}[args.what](args)


if __name__ == "__main__":
    main()

"""Quantized KV and dense-weight quantization: logit error, memory and decode speed.

    python benchmarks/memory_kv.py error --model DIR [--dense DIR8 DIR4] [--positions 2048]
    python benchmarks/memory_kv.py speed --model /work/models/20b-L4 --contexts 4096,32768
    python benchmarks/memory_kv.py kv-memory --contexts 32768,131072

error: teacher-forced logits over `positions` random tokens (chunks of 256, so every position
past the first window is scored), for each KV format against the model-dtype cache; and, with
--dense, each quantized-dense model against the bf16 one with the same cache. Reports the max
and mean absolute logit error, both over the logits' std, and the top-1 agreement.

speed: decode tokens/s with the cache already holding `context` positions. The full layers'
caches are filled with random keys/values of the right shape (decode reads them whatever they
hold), so a 32k context costs no 32k-token prefill on a CPU; the sliding layers hold their
window. Median of `--steps` steps after 2 warm-up steps.

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

from oss_mlx import memory
from oss_mlx.model import load


def _teacher_forced(model, tokens, kv_bits, chunk=256):
    cache = model.make_cache(kv_bits=kv_bits)
    out = []
    for i in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, i : i + chunk], cache)[0].astype(mx.float32)
        mx.eval(logits)
        out.append(np.array(logits))
    return np.concatenate(out)


def _compare(ref, got, skip):
    ref, got = ref[skip:], got[skip:]
    err = np.abs(ref - got)
    std = float(ref.std())
    return {"positions": len(ref), "max_abs": float(err.max()), "mean_abs": float(err.mean()),
            "max_over_std": float(err.max()) / std, "mean_over_std": float(err.mean()) / std,
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def error(args):
    model = load(args.model)
    W = model.config.sliding_window
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, model.config.vocab_size, (1, args.positions)), dtype=mx.int32)
    ref = _teacher_forced(model, tokens, None)
    report = {"model": args.model, "dtype": str(model.dtype), "window": W, "kv": {}, "dense": {}}
    for bits in memory.KV_BITS:
        report["kv"][f"{bits}-bit"] = _compare(ref, _teacher_forced(model, tokens, bits), W)
    for folder in args.dense or []:
        other = load(folder)
        report["dense"][folder] = _compare(ref, _teacher_forced(other, tokens, None), 0)
    print(json.dumps(report, indent=2))


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
        for bits in (None,) + memory.KV_BITS:
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


def kv_memory(args):
    from oss_mlx.convert.synth import PRESETS
    from oss_mlx.kv_quant import QuantizedKVCache
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    for name in ("20b", "120b"):
        cfg = PRESETS[name]
        n_sliding, n_full = memory._layers(cfg)
        for context in [int(x) for x in args.contexts.split(",")]:
            for bits in (None,) + memory.KV_BITS:
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
    s = sub.add_parser("speed")
    s.add_argument("--model", required=True)
    s.add_argument("--contexts", default="4096,32768")
    s.add_argument("--steps", type=int, default=6)
    m = sub.add_parser("kv-memory")
    m.add_argument("--contexts", default="32768,131072")
    args = p.parse_args()
    {"error": error, "speed": speed, "kv-memory": kv_memory}[args.what](args)


if __name__ == "__main__":
    main()

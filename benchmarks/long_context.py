"""Decode cost at long contexts without prefilling them: every runtime's caches are filled with
random keys and values as if N tokens had been prefilled (full layers N positions, sliding
layers their 128-slot window), then a few greedy steps are timed, the runtimes taking turns
step by step (a shared machine's load hits all alike).

    python benchmarks/long_context.py --model M --source HF --contexts 128,4096,32768

What a decode step costs at context N depends on the cache's length and layout, not on how the
keys got there, so this measures the full-attention layers at 4k-32k in seconds instead of the
hours a CPU prefill of 32k tokens takes. (Prefill itself: `oss-mlx bench --prompt-tokens`.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

from oss_mlx.bench import harness as bench


def _kv(B, H, n, D, dtype, seed):
    k = mx.random.normal((B, H, n, D), key=mx.random.key(seed)).astype(dtype)
    v = mx.random.normal((B, H, n, D), key=mx.random.key(seed + 1)).astype(dtype)
    return k, v


def filled_cache(rt, n: int, dtype) -> list:
    """rt's own caches, holding n random positions."""
    cfg = rt.config
    H, D, W = cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window
    cache = rt.make_cache()
    for i, c in enumerate(cache):
        sliding = cfg.is_sliding(i)
        k, v = _kv(1, H, min(n, W) if sliding else n, D, dtype, i)
        name = type(c).__name__
        if name == "RotatingKVCache":  # mlx-lm's: in-place ring, full once offset >= W
            c.keys, c.values, c.offset, c._idx = k, v, n, k.shape[2]
        elif name == "RingKVCache":
            c.keys, c.values, c.offset = k, v, n
        else:  # KVCache / FixedKVCache: room to grow by the next step's growth rule
            c.update_and_fetch(k, v)
    mx.eval([c.state for c in cache])
    return cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--source")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--mlx-lm-dtype", default="auto")
    ap.add_argument("--contexts", default="128,4096,32768")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    ours = bench.load_ours(args.model, args.dtype)
    runtimes = [ours, bench.plain_variant(ours)]
    if args.source:
        runtimes.append(bench.load_mlx_lm(args.source, args.mlx_lm_dtype))
    kv_dtype = ours.model.precision.dense
    out = []
    for n in [int(x) for x in args.contexts.split(",")]:
        state = []
        for rt in runtimes:
            dt = mx.float32 if rt.dtype == "float32" else kv_dtype
            state.append([filled_cache(rt, n, dt), mx.array([[11]], dtype=mx.uint32)])  # argmax dtype
        times = {rt.label: [] for rt in runtimes}
        for step in range(args.steps + 1):  # step 0: compile / allocate, untimed
            for rt, st in zip(runtimes, state):
                tic = time.perf_counter()
                y = mx.argmax(rt.step(st[1], st[0]), axis=-1)[:, None]
                mx.eval(y)
                if step:
                    times[rt.label].append(time.perf_counter() - tic)
                st[1] = y
        for rt in runtimes:
            ms = statistics.median(times[rt.label]) * 1e3
            out.append({"runtime": rt.label, "context": n, "step_ms": ms, "tps": 1e3 / ms})
            print(f"context {n:6d}  {rt.label:30s} {ms:9.1f} ms/token  {1e3 / ms:7.2f} tok/s")
        del state
        mx.clear_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the engine pays to decode on the compiled step: converting the caches at the seam
(oss_mlx.decode.to_decoder / to_mlx_lm) against one decode step, on a small synthetic model.

    python benchmarks/seam_cost.py --preset tiny --context 100,300,2000
    python benchmarks/seam_cost.py --preset narrow --context 300,4000   # 24 layers, window 128

For each context: a prefill in chunks of 100 and a single-token feed (the engine's last prompt
token), as the engine does it (Decoder.presize first), then, each evaluated and timed alone
(median ms over --repeats):

  to_decoder                   mlx-lm's caches -> the decoder's, once per request: the rotating
                               caches rewritten as rings (window positions per sliding layer),
                               the full layers' buffers shared
  to_decoder off grid          the same without presize: mlx-lm's KVCache ends at an odd
                               capacity and to_decoder copies the full layers onto the grid
                               (what a cache grown by the plain path alone costs, once)
  snapshot round trip          to_mlx_lm then to_decoder, as at each generated <|end|>: after
                               the first conversion the layouts agree, so no data moves
  to_mlx_lm (release)          once per request
  compiled step / plain step   one decode token: model.decoder() / model(tokens, cache)

With --engine also the engine's own decode tok/s (Stats.decode_tps) with compiled=True and
False on a tiny model (special tokens banned so every run reaches --tokens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from oss_mlx.model.decode import to_decoder, to_mlx_lm
from oss_mlx.model import load


def timed(fn, repeats: int) -> float:
    """Median ms of fn() with its output evaluated."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def arrays(cache) -> list:
    return [a for c in cache for a in (c.keys, c.values) if a is not None]


def prefilled(model, ctx: int, rng, presize: bool = True):
    tokens = mx.array(rng.integers(0, model.config.vocab_size, (1, ctx)), dtype=mx.int32)
    cache = model.make_cache()
    if presize:
        model.decoder().presize(cache, ctx + 1)
    model.prefill(tokens[:, :-1], cache, chunk_size=100, logits=False)
    model.prefill(tokens[:, -1:], cache)  # one token: mlx-lm's in-place path, as the engine's
    mx.eval(arrays(cache))
    return cache


def seam(model, ctx: int, repeats: int, rng) -> dict:
    dec = model.decoder()
    cache = prefilled(model, ctx, rng)
    first = timed(lambda: arrays(to_decoder(cache)), repeats)
    odd = prefilled(model, ctx, rng, presize=False)
    off_grid = timed(lambda: arrays(to_decoder(odd)), repeats)
    dcache = to_decoder(cache)
    y = mx.array([[1]], dtype=mx.int32)
    mx.eval(dec(y, dcache))  # trace outside the timing
    step = timed(lambda: dec(y, dcache), repeats)
    snap = timed(lambda: arrays(to_decoder(to_mlx_lm(dcache))), repeats)
    back = timed(lambda: arrays(to_mlx_lm(dcache)), repeats)
    plain_cache = odd
    plain = timed(lambda: model(y, cache=plain_cache)[:, -1], repeats)
    return {"context": ctx, "to_decoder_ms": first, "off_grid_ms": off_grid,
            "snapshot_round_trip_ms": snap,
            "to_mlx_lm_ms": back, "compiled_step_ms": step, "plain_step_ms": plain}


def engine_rates(folder, tokens: int, repeats: int) -> dict:
    from oss_mlx import harmony
    from oss_mlx.engine import Engine, SamplingParams

    enc = harmony.load_encoding(folder)
    model = load(folder, dtype=mx.float32)
    prompt = harmony.render_prompt(enc, harmony.build_conversation(
        [harmony.user_message("hello there")], date="2025-01-01"))

    def ban(history, logits):
        return mx.where(mx.arange(logits.shape[-1]) < 199998, logits, -mx.inf)

    out = {}
    for compiled in (True, False) * repeats:
        e = Engine(model, enc, compiled=compiled)
        c = e.complete(prompt, SamplingParams(temperature=0.0, max_tokens=tokens,
                                              logits_processors=[ban]))
        out.setdefault(f"decode_tps_{'compiled' if compiled else 'plain'}", []).append(
            c.stats.decode_tps)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "narrow"])
    p.add_argument("--context", default="100,300,2000")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--engine", action="store_true")
    p.add_argument("--tokens", type=int, default=200)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert(synth(Path(tmp) / "src", preset=args.preset), Path(tmp) / "mlx")
        model = load(folder, dtype=mx.float32)
        cfg = model.config
        print(f"preset {args.preset}: {cfg.num_hidden_layers} layers, window {cfg.sliding_window}, "
              f"{cfg.num_key_value_heads} KV heads x {cfg.head_dim}, float32, MLX {mx.__version__} "
              f"on {mx.default_device()}")
        cols = ["context", "to_decoder_ms", "off_grid_ms", "snapshot_round_trip_ms", "to_mlx_lm_ms",
                "compiled_step_ms", "plain_step_ms"]
        print(" | ".join(cols))
        for ctx in (int(c) for c in args.context.split(",")):
            row = seam(model, ctx, args.repeats, rng)
            print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                             for c in cols), flush=True)
        if args.engine:
            print(engine_rates(folder, args.tokens, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode cost of grammar-constrained decoding (oss_mlx.constrain), through the real engine.

    oss-mlx synth 20b-L4-ck --preset 20b --layers 4 && oss-mlx convert 20b-L4-ck -o 20b-L4
    python benchmarks/constrain_cost.py --model 20b-L4 --tokens 64 --repeats 3

Three runs per repeat, each forced into the final channel by a scripted header (so the model
writes the same kind of span in all three) and the same seed:

  plain      no constraint
  inactive   the constraint installed but covering nothing the model writes (a tool schema):
             what every request pays when tools are constrained but the model answers in text
  active     the final answer constrained to {"text": string}: a random model writes one long
             string, so every decode token computes and applies a mask

decode tok/s is the engine's own Stats.decode_tps (first token excluded); the per-token cost is
1/active - 1/plain. Medians over the repeats. On a busy machine those rates are noisy, so the
processor is also timed alone on a scripted stream (mean ms per call, its output evaluated):
outside any constrained span, and inside a JSON string (mask computed and applied).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.constrained import FINAL, Forced, tokens  # noqa: E402

from oss_mlx import harmony  # noqa: E402
from oss_mlx.harmony import constrain  # noqa: E402
from oss_mlx.engine import Engine, SamplingParams  # noqa: E402

STRING = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
          "additionalProperties": False}
TOOL = {"functions.get_weather": ({"type": "object", "properties": {"city": {"type": "string"}}},
                                  False)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = Engine.load(args.model)
    enc = engine.encoding
    constrain.tokenizer(enc)  # built once per process, not part of the decode cost
    conv = harmony.build_conversation([harmony.user_message("Say something.")], reasoning="low")
    specs = {"plain": None, "inactive": constrain.Spec.build(tools=TOOL),
             "active": constrain.Spec.build(final=STRING)}
    rates = {k: [] for k in specs}
    counts = {k: [] for k in specs}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, spec in specs.items():
            procs = [Forced(tokens(enc, FINAL))]
            if spec is not None:
                procs.append(constrain.processor(enc, spec))
            c = engine.complete(conv, SamplingParams(seed=r, max_tokens=args.tokens,
                                                     logits_processors=procs))
            if r:
                rates[name].append(c.stats.decode_tps)
                counts[name].append(c.stats.generated_tokens)
    alone(enc)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"model {args.model}; {args.tokens} tokens a run, {args.repeats} repeats (median)")
    for k in specs:
        print(f"  {k:9s} {med[k]:8.2f} decode tok/s  (runs: {', '.join(f'{x:.2f}' for x in rates[k])};"
              f" tokens {counts[k]})")
    best = {k: max(v) for k, v in rates.items()}  # the least disturbed run, on a busy machine
    for k in ("inactive", "active"):
        for label, r in (("median", med), ("best", best)):
            extra = (1 / r[k] - 1 / r["plain"]) * 1e3
            print(f"  {k} ({label}): {100 * (r[k] / r['plain'] - 1):+.1f}% tok/s, "
                  f"{extra:+.2f} ms per token")


def alone(enc, n: int = 200):
    """The processor by itself: ms per call outside a span and inside one."""
    import mlx.core as mx

    logits = mx.random.normal((1, 201088))
    mx.eval(logits)
    body = tokens(enc, '{"text":"') + tokens(enc, " lorem ipsum dolor sit amet" * 40)[:n]
    for label, prefix, spec in (
            ("outside a span", "<|channel|>analysis<|message|>", constrain.Spec.build(final=STRING)),
            ("inside a span", FINAL, constrain.Spec.build(final=STRING))):
        proc = constrain.processor(enc, spec)
        stream = tokens(enc, prefix) + body
        k0 = len(stream) - n
        proc(mx.array(stream[:k0], dtype=mx.int32), logits)
        t = time.perf_counter()
        for k in range(k0, len(stream)):
            mx.eval(proc(mx.array(stream[:k], dtype=mx.int32), logits))
        print(f"  processor alone, {label}: {(time.perf_counter() - t) / n * 1e3:.3f} ms per token")


if __name__ == "__main__":
    main()

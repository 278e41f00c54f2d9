"""Where a decode step spends its time, per layer component, for oss-mlx and mlx-lm side by side.

    python benchmarks/profile_decode.py --synth 20b --layers 2 --dtype auto,float32 --steps 4

Every module call is timed with an `mx.eval` barrier before and after it (so the figures are
exclusive of the module's children, and the sum is a little above the pipelined step time that
`oss-mlx bench` reports); names are summed over layers and grouped into components that mean
the same thing in both models (e.g. our fused `qkv` against mlx-lm's q/k/v_proj). Use it to
explain a ratio, not as the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from oss_mlx.bench import harness as bench
from oss_mlx.bench.checkpoints import SYNTH_PRESETS, cache_root, source_of, synth_checkpoint
from oss_mlx.bench.roofline import machine_info

# (component, pattern on the module path with layer numbers replaced by *), first match wins.
COMPONENTS = [
    ("embedding", r"(^|\.)(embedding|embed_tokens)$"),
    ("unembedding (lm_head)", r"(^|\.)(unembedding|lm_head)$"),
    ("norms", r"norm$|layernorm$"),
    ("experts gate+up", r"experts\.(gate_up|gate_proj|up_proj)$"),
    ("experts down", r"experts\.(down|down_proj)$"),
    ("experts rest (sort, swiglu, combine)", r"experts(\.activation)?$"),
    ("router", r"router$"),
    ("top-k, softmax, mlp residual", r"mlp$"),
    ("attention qkv", r"(qkv|q_proj|k_proj|v_proj)$"),
    ("attention out", r"(attention\.out|o_proj)$"),
    ("attention core (rope, cache, sdpa)", r"(attention|self_attn)$"),
    ("other (masks, residuals, casts)", r".*"),
]


def component(path: str) -> str:
    path = re.sub(r"\.\d+\.", ".*.", path)
    for name, pattern in COMPONENTS:
        if re.search(pattern, path):
            return name
    return "other (masks, residuals, casts)"


def _arrays(obj):
    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [a for o in obj for a in _arrays(o)]
    return []


class Profiler:
    """Exclusive seconds per module path of one runtime's decode steps, taken one step at a
    time so that runtimes can be interleaved (on a shared machine, load changes by the minute
    and must hit every runtime alike)."""

    def __init__(self, rt: bench.Runtime, n_prompt: int, chunk_size: int = 512):
        self.rt = rt
        self.names = {id(m): (p or "<root>") for p, m in rt.model.named_modules()}
        self.classes = {type(m) for m in rt.model.modules()}
        self.spent: dict[str, float] = defaultdict(float)
        self.total = 0.0
        self.steps = 0
        prompt = mx.array([[(7 * i) % rt.config.vocab_size for i in range(n_prompt)]], dtype=mx.int32)
        self.cache = rt.make_cache()
        self.y = mx.argmax(rt.prefill(prompt, self.cache, chunk_size), axis=-1)
        mx.eval(self.y)

    def step(self, prefill_tokens: int = 0) -> None:
        """One hooked decode step, or with `prefill_tokens` one hooked forward of that many
        prompt tokens through a fresh cache (the model's own __call__, logits left unevaluated
        beyond the last position as in a prefill)."""
        stack: list[float] = []  # time of the children of each call in progress
        spent, names = self.spent, self.names

        def wrap(cls):
            orig = cls.__call__

            def timed(mod, *args, **kwargs):
                mx.eval(_arrays(list(args) + list(kwargs.values())))
                stack.append(0.0)
                tic = time.perf_counter()
                out = orig(mod, *args, **kwargs)
                mx.eval(_arrays(out))
                dt = time.perf_counter() - tic
                spent[names.get(id(mod), cls.__name__)] += dt - stack.pop()
                if stack:
                    stack[-1] += dt
                return out

            cls.__call__ = timed
            return orig

        originals = {cls: wrap(cls) for cls in self.classes}
        try:
            if prefill_tokens:
                tokens = mx.array([[(11 * i) % 1000 for i in range(prefill_tokens)]], dtype=mx.int32)
                cache = self.rt.make_cache()
                tic = time.perf_counter()
                mx.eval(self.rt.step(tokens, cache))
                self.total += time.perf_counter() - tic
                self.steps += prefill_tokens  # figures come out per prompt token
            else:
                tic = time.perf_counter()
                self.y = mx.argmax(self.rt.step(self.y[:, None], self.cache), axis=-1)
                mx.eval(self.y)
                self.total += time.perf_counter() - tic
                self.steps += 1
        finally:
            for cls, orig in originals.items():
                cls.__call__ = orig

    def per_step(self) -> tuple[dict[str, float], float]:
        return {k: v / self.steps for k, v in self.spent.items()}, self.total / self.steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model")
    src.add_argument("--synth", choices=SYNTH_PRESETS)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--source", help="HF checkpoint for mlx-lm (default: from the manifest)")
    ap.add_argument("--dtype", default="auto,float32")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=0, metavar="T",
                    help="profile forwards of T prompt tokens instead of decode steps "
                         "(figures then per prompt token)")
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--json", help="write the per-component figures here")
    args = ap.parse_args(argv)

    if args.synth:
        source, model_dir = synth_checkpoint(args.synth, args.layers, 0, cache_root(None))
    else:
        model_dir = Path(args.model)
        source = Path(args.source) if args.source else source_of(model_dir)

    table: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    raw: dict[str, dict[str, float]] = {}
    loaders = [(d, lambda d=d: bench.load_ours(model_dir, d, decode="plain")) for d in args.dtype.split(",")]
    if not args.no_mlx_lm:
        loaders.append(("mlx-lm", lambda: bench.load_mlx_lm(source)))
    profilers = []
    for _, load in loaders:
        profilers.append(Profiler(load(), args.prompt_tokens))
    for i in range(args.steps):
        for p in profilers[i % len(profilers):] + profilers[:i % len(profilers)]:
            p.step(args.prefill)
    for p in profilers:
        spent, total = p.per_step()
        by = defaultdict(float)
        for path, sec in spent.items():
            by[component(path)] += sec
        label = p.rt.label
        table[label], totals[label], raw[label] = dict(by), total, spent
    labels = list(table)
    unit = "ms per prompt token" if args.prefill else "ms per decode step"
    print(f"{'component (' + unit + ')':40s}" + "".join(f"{lb:>26s}" for lb in labels))
    for name, _ in COMPONENTS:
        if any(name in table[lb] for lb in labels):
            print(f"{name:40s}" + "".join(f"{1e3 * table[lb].get(name, 0.0):26.1f}" for lb in labels))
    print(f"{'total (with barriers)':40s}" + "".join(f"{1e3 * totals[lb]:26.1f}" for lb in labels))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"components": table, "totals": totals, "modules": raw,
             "machine": machine_info(), "load_average": os.getloadavg(),
             "prompt_tokens": args.prompt_tokens, "prefill": args.prefill,
             "steps": args.steps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one decode step's wall time goes: building the graph in Python against running it.

    python benchmarks/step_profile.py --model M --source HF [--dtype float32] [--steps 32]

For each runtime (oss-mlx compiled step, oss-mlx plain forward, mlx-lm): after a prefill, each
step is timed synchronously in two parts: `build` = the call that returns the lazy logits and
the argmax (Python: graph construction, or the compiled trace's lookup and replay), `run` =
mx.eval of it (the kernels). `--baseline DIR` adds an older oss_mlx (e.g. `git archive REV
oss_mlx | tar -x -C DIR`), imported as a second package, so old and new run side by side. The runtimes take turns STEP BY STEP (each has its own cache), so
a shared machine's load, which changes by the second, hits all of them alike; medians over
all steps of all rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

from oss_mlx.bench import harness as bench


def _baseline(folder: str, model_dir: str, dtype: str) -> bench.Runtime:
    import importlib.util
    from pathlib import Path

    init = Path(folder) / "oss_mlx" / "__init__.py"
    spec = importlib.util.spec_from_file_location("oss_mlx_base", init,
                                                  submodule_search_locations=[str(init.parent)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["oss_mlx_base"] = pkg
    spec.loader.exec_module(pkg)
    old = importlib.import_module("oss_mlx_base.model")
    model = old.load(model_dir, dtype=getattr(mx, dtype))
    rt = bench._our_runtime(model, f"oss-mlx {dtype} baseline", dtype, {}, "plain")
    rt.label = f"oss-mlx {dtype} baseline"  # (the plain path: it has no compiled step)
    return rt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--source")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mlx-lm-dtype", default="float32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="folder holding an older oss_mlx package")
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    ours = bench.load_ours(args.model, args.dtype)
    runtimes = [ours] if args.no_plain else [ours, bench.plain_variant(ours)]
    if args.baseline:
        runtimes.append(_baseline(args.baseline, args.model, args.dtype))
    if args.source:
        runtimes.append(bench.load_mlx_lm(args.source, args.mlx_lm_dtype))
    prompt = mx.array([[(7 * i + 3) % 4000 for i in range(args.prompt_tokens)]], dtype=mx.int32)
    times = {rt.label: {"build": [], "run": []} for rt in runtimes}
    for r in range(args.rounds + 1):  # round 0 warms up (compiles, allocates)
        state = []
        for rt in runtimes:
            cache = rt.make_cache()
            y = mx.argmax(rt.prefill(prompt, cache, 512), axis=-1)
            mx.eval(y)
            state.append([cache, y])
        for _ in range(args.steps):
            for rt, st in zip(runtimes, state):
                tic = time.perf_counter()
                y = mx.argmax(rt.step(st[1][:, None], st[0]), axis=-1)
                mid = time.perf_counter()
                mx.eval(y)
                end = time.perf_counter()
                st[1] = y
                if r:
                    times[rt.label]["build"].append(mid - tic)
                    times[rt.label]["run"].append(end - mid)
    out = {}
    base = statistics.median(
        b + e for b, e in zip(times[runtimes[-1].label]["build"], times[runtimes[-1].label]["run"]))
    for label, t in times.items():
        b, e = statistics.median(t["build"]) * 1e3, statistics.median(t["run"]) * 1e3
        step = statistics.median(x + y for x, y in zip(t["build"], t["run"])) * 1e3
        out[label] = {"build_ms": b, "run_ms": e, "step_ms": step,
                      "speedup_vs_last": base * 1e3 / step}
        print(f"{label:28s} build {b:7.2f} ms  run {e:7.2f} ms  step {step:7.2f} ms  "
              f"{base * 1e3 / step:5.2f}x {runtimes[-1].label}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "per_step": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

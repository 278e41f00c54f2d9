"""The timing harness of `oss-mlx bench`: one procedure (`time_run`) applied identically to
every runtime: a fresh cache, the prompt prefilled in chunks, then greedy decoding with
`mx.async_eval` pipelining (the next step is queued before the previous token is read back, as
mlx-lm's generate_step and our engine do). With mlx-lm beside ours, its own gpt_oss model is
loaded from the SAME upstream checkpoint in the same process and the runs alternate, so both see
the same machine state.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from oss_mlx.config import ModelConfig
from oss_mlx.errors import OssMlxError

DTYPE_POLICY = (
    "oss-mlx 'auto' is oss_mlx.model.default_dtype(), bfloat16 dense weights; on MLX's CPU "
    "backend oss-mlx feeds its mxfp4 experts float32 activations (~10x faster there than bf16 "
    "ones, same 4-bit weights). mlx-lm runs as it comes (bfloat16) unless --mlx-lm-dtype / "
    "--mlx-lm-dense-bits say otherwise. --dtype float32 times ours with float32 dense weights."
)

WARMUP_PROMPT = 32  # tokens of the prompt a warm-up run prefills


# ---- runtimes ----------------------------------------------------------------------------


@dataclass
class Runtime:
    """What the harness needs from a model: the same four calls for ours and for mlx-lm."""

    name: str                       # "oss-mlx" | "mlx-lm"
    label: str                      # e.g. "oss-mlx float32 (auto)"
    dtype: str                      # compute dtype of the dense weights
    config: ModelConfig
    make_cache: Callable[[], list]
    prefill: Callable               # (tokens [1, T], cache, chunk_size) -> logits [1, V]
    step: Callable                  # (tokens [1, 1], cache) -> logits [1, V]
    params: dict = field(repr=False, default_factory=dict)
    model: Any = field(repr=False, default=None)  # the nn.Module, for profiling
    weights_bytes: int = 0
    kv_itemsize: int = 2            # filled in after a run from the cache actually built


def _flat_params(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def _dtype_name(d) -> str:
    return str(d).split(".")[-1]


def load_ours(path, dtype: str = "auto", expert_dtype: str | None = None,
              decode: str = "compiled") -> Runtime:
    """Our model; `decode` "compiled" times the compiled step (model.decoder()) on its own
    caches, "plain" the uncompiled forward on model.make_cache()'s."""
    import mlx.core as mx

    from oss_mlx.model import default_dtype, load

    if dtype == "auto":
        dt = default_dtype()
        label = f"oss-mlx {_dtype_name(dt)} (auto)"
    else:
        dt = getattr(mx, dtype)
        label = f"oss-mlx {dtype}"
    model = load(path, dtype=dt, expert_dtype=getattr(mx, expert_dtype) if expert_dtype else None)
    params = _flat_params(model)
    mx.eval(list(params.values()))
    return _our_runtime(model, label, _dtype_name(dt), params, decode)


def _our_runtime(model, label, dtype, params, decode: str) -> Runtime:
    if decode == "compiled":
        make_cache, step = model.decoder().make_cache, model.decoder()
    elif decode == "plain":
        label += " plain"
        make_cache = model.make_cache

        def step(tokens, cache):
            return model(tokens, cache=cache)[:, -1, :]
    else:
        raise OssMlxError(f"--decode must be compiled, plain or both, got {decode!r}")
    return Runtime(
        name="oss-mlx", label=label, dtype=dtype, config=model.config, make_cache=make_cache,
        prefill=lambda tokens, cache, chunk_size: model.prefill(tokens, cache, chunk_size=chunk_size),
        step=step, params=params, model=model,
        weights_bytes=sum(a.nbytes for a in params.values()),
    )


def plain_variant(rt: Runtime) -> Runtime:
    """The same loaded model timed on the plain (uncompiled) decode path."""
    return _our_runtime(rt.model, rt.label, rt.dtype, rt.params, "plain")


def load_mlx_lm(src, dtype: str = "auto", dense_bits: int = 16) -> Runtime:
    """mlx-lm's gpt_oss model on the upstream (HF layout) checkpoint, with its own caches;
    `dtype` "float32" casts its float parameters (not the packed experts) to float32;
    `dense_bits` 8 quantizes its dense matrices (embedding, q/k/v/o, lm_head; not the router)
    8-bit affine, group 64, as `oss-mlx convert --dense-bits 8` does ours (MXFP4-Q8)."""
    import mlx.core as mx

    try:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model
    except ImportError:
        raise OssMlxError("--compare mlx-lm needs mlx-lm installed (pip install mlx-lm)") from None
    src = Path(src)
    if not (src / "config.json").is_file():
        raise OssMlxError(f"no upstream checkpoint for mlx-lm at {src} (config.json missing)")
    try:
        model, config = load_model(src)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise OssMlxError(f"mlx-lm cannot load {src}: {e}") from None
    if dtype not in ("auto", None):
        model.set_dtype(getattr(mx, dtype))
    # The activations' dtype, read before --mlx-lm-dense-bits 8 packs the weights into uint32.
    dtypes = {a.dtype for n, a in _flat_params(model).items() if n.endswith("q_proj.weight")}
    if dense_bits == 8:
        import mlx.nn as nn

        nn.quantize(model, 64, 8, class_predicate=lambda path, m: (
            isinstance(m, (nn.Linear, nn.Embedding)) and "router" not in path))
    params = _flat_params(model)
    mx.eval(list(params.values()))

    def prefill(tokens, cache, chunk_size):
        # As mlx_lm.generate.generate_step: all but the last token in chunks, evaluating only
        # the cache (so the lm_head of those chunks is never computed), then the last token.
        n, i = tokens.shape[1], 0
        while n - i > 1:
            k = min(chunk_size, n - 1 - i)
            model(tokens[:, i:i + k], cache=cache)
            mx.eval([c.state for c in cache])
            i += k
        return model(tokens[:, i:], cache=cache)[:, -1, :]

    def step(tokens, cache):
        return model(tokens, cache=cache)[:, -1, :]

    dt = _dtype_name(next(iter(dtypes))) if dtypes else "?"
    return Runtime(
        name="mlx-lm", label=f"mlx-lm {dt}" + (" q8 dense" if dense_bits == 8 else ""), dtype=dt, config=ModelConfig.from_hf(config),
        make_cache=lambda: make_prompt_cache(model), prefill=prefill, step=step,
        params=params, model=model, weights_bytes=sum(a.nbytes for a in params.values()),
    )


# ---- the harness -------------------------------------------------------------------------


def time_run(rt: Runtime, prompt, gen_tokens: int, chunk_size: int) -> dict:
    """One timed generation: fresh cache, chunked prefill, greedy pipelined decode.

    The first token comes from the prefill (time to first token); decode tokens/s counts the
    `gen_tokens - 1` tokens after it. Peak memory is this runtime's weights plus what the run
    added on top of what was allocated before it (the other runtime's weights live in the same
    process and must not be counted).
    """
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()

    cache = rt.make_cache()
    tic = time.perf_counter()
    y = mx.argmax(rt.prefill(prompt, cache, chunk_size), axis=-1)
    tokens = [y.item()]
    ttft = time.perf_counter() - tic

    steps = max(gen_tokens - 1, 0)
    tic = time.perf_counter()
    for i in range(steps):
        nxt = mx.argmax(rt.step(y[:, None], cache), axis=-1)
        mx.async_eval(nxt)
        if i > 0:
            tokens.append(y.item())  # read the previous token back while this one computes
        y = nxt
    if steps:
        tokens.append(y.item())
    decode_s = time.perf_counter() - tic
    peak = mx.get_peak_memory()

    keys = [c for c in cache if hasattr(c, "keys") and c.keys is not None]
    if keys:
        rt.kv_itemsize = keys[0].keys.dtype.size
    n_prompt = prompt.shape[1]
    return {
        "ttft_s": ttft,
        "prefill_tps": n_prompt / ttft,
        "decode_tps": steps / decode_s if steps else 0.0,
        "decode_s": decode_s,
        "peak_memory_bytes": int(rt.weights_bytes + max(peak - before, 0)),
        "process_peak_memory_bytes": int(peak),
        "generated": len(tokens),
        "first_tokens": tokens[:8],
    }


def run_benchmark(runtimes: list[Runtime], prompt_lengths: list[int], gen_tokens: int,
                  repeat: int, warmup: int, chunk_size: int, seed: int = 0,
                  log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every runtime at every prompt length: `warmup` short untimed runs each, then `repeat` timed
    rounds in which the runtimes alternate (the order rotates every round, so neither always
    runs first). Returns one entry per (runtime, prompt length) with all runs and medians."""
    import mlx.core as mx
    import numpy as np

    results = []
    for n_prompt in prompt_lengths:
        vocab = min(rt.config.vocab_size for rt in runtimes)
        rng = np.random.default_rng(seed + n_prompt)
        prompt = mx.array(rng.integers(0, vocab, size=(1, n_prompt)), dtype=mx.int32)
        runs: dict[str, list[dict]] = {rt.label: [] for rt in runtimes}
        for rt in runtimes:
            for _ in range(warmup):
                # Short on purpose: it only has to compile and allocate (on the CPU backend a
                # 20b-shaped prompt costs as much per token as a decode step).
                log(f"prompt {n_prompt}: warm-up {rt.label}")
                time_run(rt, prompt[:, :WARMUP_PROMPT], min(gen_tokens, 4), chunk_size)
        for r in range(repeat):
            order = runtimes[r % len(runtimes):] + runtimes[:r % len(runtimes)]
            for rt in order:
                out = time_run(rt, prompt, gen_tokens, chunk_size)
                log(f"prompt {n_prompt}: {rt.label} run {r + 1}/{repeat}: prefill "
                    f"{out['prefill_tps']:.1f} tok/s, decode {out['decode_tps']:.2f} tok/s")
                runs[rt.label].append(out)
        for rt in runtimes:
            rs = runs[rt.label]
            median = {k: statistics.median(x[k] for x in rs)
                      for k in ("ttft_s", "prefill_tps", "decode_tps", "peak_memory_bytes")}
            median["peak_memory_bytes"] = int(median["peak_memory_bytes"])
            results.append({"runtime": rt.label, "name": rt.name, "dtype": rt.dtype,
                            "prompt_tokens": n_prompt, "gen_tokens": gen_tokens,
                            "median": median, "runs": rs})
    return results



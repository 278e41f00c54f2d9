"""`oss-mlx bench`: prefill and decode tokens/s, time to first token and peak memory.

One timing harness (`time_run`) is applied identically to every runtime: a fresh cache, the
prompt prefilled in chunks, then greedy decoding with `mx.async_eval` pipelining (the next step
is queued before the previous token is read back, as mlx-lm's generate_step and our engine do).
With `--compare mlx-lm`, mlx-lm's own gpt_oss model is loaded from the SAME upstream checkpoint
in the same process and the runs alternate ours / theirs, so both see the same machine state.

Decode is also put against the memory-bandwidth roofline: the bytes one decoded token reads are
summed from the tensors actually loaded (active experts only, one embedding row, the whole
unembedding, attention, router, norms, and the KV cache at that context), so quantization and
the compute dtype are counted as they are, not as a preset says.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import ModelConfig
from .errors import OssMlxError
from .store import read_model_config

DTYPE_POLICY = (
    "oss-mlx 'auto' is oss_mlx.model.default_dtype(), bfloat16 dense weights; on MLX's CPU "
    "backend oss-mlx feeds its mxfp4 experts float32 activations (~10x faster there than bf16 "
    "ones, same 4-bit weights). mlx-lm runs as it comes (bfloat16) unless --mlx-lm-dtype / "
    "--mlx-lm-dense-bits say otherwise. --dtype float32 times ours with float32 dense weights."
)

# Apple's memory bandwidth in GB/s (10^9 B/s), from shared/reference/performance-anchors.md.
# (chip, GPU cores or None for "any") -> GB/s; the binned Max parts have less bandwidth.
APPLE_BANDWIDTH_GBPS: dict[tuple[str, int | None], float] = {
    ("M1", None): 68.25,
    ("M2", None): 100.0,
    ("M3", None): 100.0,
    ("M4", None): 120.0,
    ("M3 Pro", None): 150.0,
    ("M1 Pro", None): 200.0,
    ("M2 Pro", None): 200.0,
    ("M4 Pro", None): 273.0,
    ("M1 Max", None): 400.0,
    ("M2 Max", None): 400.0,
    ("M3 Max", 30): 300.0,
    ("M3 Max", None): 400.0,
    ("M4 Max", 32): 410.0,
    ("M4 Max", None): 546.0,
    ("M1 Ultra", None): 800.0,
    ("M2 Ultra", None): 800.0,
    ("M3 Ultra", None): 819.0,
}

SYNTH_PRESETS = ("20b", "120b", "narrow")
WARMUP_PROMPT = 32  # tokens of the prompt a warm-up run prefills


# ---- machine ---------------------------------------------------------------------------


def apple_bandwidth(chip: str, gpu_cores: int | None = None) -> float | None:
    """Spec bandwidth of an Apple chip ("Apple M4 Max" or "M4 Max"), None if not in the table."""
    m = re.fullmatch(r"(?:Apple\s+)?M(\d+)(?:\s+(Pro|Max|Ultra))?", (chip or "").strip())
    if not m:
        return None
    name = f"M{m.group(1)}" + (f" {m.group(2)}" if m.group(2) else "")
    if gpu_cores is not None and (name, gpu_cores) in APPLE_BANDWIDTH_GBPS:
        return APPLE_BANDWIDTH_GBPS[(name, gpu_cores)]
    return APPLE_BANDWIDTH_GBPS.get((name, None))


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    """Chip, memory, OS, MLX version and backend; on Apple chips the spec bandwidth."""
    import mlx.core as mx

    chip, memory, gpu_cores = None, None, None
    if sys.platform == "darwin":
        chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or None
        mem = _run(["sysctl", "-n", "hw.memsize"])
        memory = int(mem) if mem.isdigit() else None
        m = re.search(r"Total Number of Cores:\s*(\d+)", _run(["system_profiler", "SPDisplaysDataType"]))
        gpu_cores = int(m.group(1)) if m else None
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
                    break
        except OSError:
            pass

    if mx.default_device() == mx.gpu and mx.metal.is_available():
        backend = "Metal"
    elif mx.default_device() == mx.gpu and mx.cuda.is_available():
        backend = "CUDA"
    else:
        backend = "CPU"
    try:
        import mlx_lm

        mlx_lm_version = mlx_lm.__version__
    except ImportError:
        mlx_lm_version = None
    from . import __version__

    info = {
        "chip": chip or platform.processor() or platform.machine(),
        "gpu_cores": gpu_cores,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm_version,
        "oss_mlx_version": __version__,
        "backend": backend,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "bandwidth_gbps": None,
        "bandwidth_source": None,
    }
    bw = apple_bandwidth(info["chip"], gpu_cores) if sys.platform == "darwin" else None
    if bw is not None:
        info["bandwidth_gbps"] = bw
        info["bandwidth_source"] = "Apple spec figure (performance-anchors.md); attainable is ~85-90%"
    return info


# ---- bytes read per decoded token ----------------------------------------------------------


def weight_bytes_per_token(params: dict[str, Any], cfg: ModelConfig) -> dict[str, float]:
    """Bytes of weights one decoded token reads, by component, from the loaded tensors.

    `params`: flat {module path: array} (anything with .nbytes). Works for our names and
    mlx-lm's: experts count k/E of their bytes (stacked [E, ...]), the embedding one row,
    everything else (attention, router, norms, sinks, unembedding) all of it.
    """
    comp = {"experts": 0.0, "attention": 0.0, "router": 0.0, "embedding_row": 0.0,
            "unembedding": 0.0, "norms_other": 0.0}
    for name, a in params.items():
        nb = float(a.nbytes)
        if ".experts." in name:
            comp["experts"] += nb * cfg.experts_per_token / cfg.num_experts
        elif name.startswith(("embedding.", "model.embed_tokens.")):
            comp["embedding_row"] += nb / cfg.vocab_size
        elif name.startswith(("unembedding.", "lm_head.")):
            comp["unembedding"] += nb
        elif "norm" in name:
            comp["norms_other"] += nb
        elif ".router." in name:
            comp["router"] += nb
        elif ".attention." in name or ".self_attn." in name:
            comp["attention"] += nb
        else:
            comp["norms_other"] += nb
    return comp


def kv_bytes_per_token(cfg: ModelConfig, context: int, itemsize: int) -> float:
    """KV cache bytes one decoded token reads at `context`: full layers read every cached
    position, sliding layers at most the window."""
    per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return float(sum(
        per_position * (min(context, cfg.sliding_window) if cfg.is_sliding(i) else context)
        for i in range(cfg.num_hidden_layers)
    ))


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

    from .model import default_dtype, load

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


def add_roofline(results: list[dict], runtimes: list[Runtime], bandwidth_gbps: float | None):
    """Bytes per decoded token at the mean decode context (prompt + gen/2), the bandwidth that
    decode achieved with them, and (on a chip whose bandwidth we know) the roofline fraction."""
    by_label = {rt.label: rt for rt in runtimes}
    for res in results:
        rt = by_label[res["runtime"]]
        context = res["prompt_tokens"] + res["gen_tokens"] // 2
        comp = weight_bytes_per_token(rt.params, rt.config)
        comp["kv_cache"] = kv_bytes_per_token(rt.config, context, rt.kv_itemsize)
        total = sum(comp.values())
        tps = res["median"]["decode_tps"]
        roof = {"context": context, "bytes_per_token": total, "components": comp,
                "kv_itemsize": rt.kv_itemsize, "achieved_gbps": tps * total / 1e9,
                "bandwidth_gbps": bandwidth_gbps, "roofline_tps": None, "fraction": None}
        if bandwidth_gbps:
            roof["roofline_tps"] = bandwidth_gbps * 1e9 / total
            roof["fraction"] = tps / roof["roofline_tps"]
        res["roofline"] = roof


def _first_tokens(res: dict):
    runs = res.get("runs") or [{}]
    return runs[0].get("first_tokens")


def compute_ratios(results: list[dict], base: str = "mlx-lm") -> list[dict]:
    """ours / theirs for every figure at every prompt length (for TTFT and memory, < 1 is better)."""
    ratios = []
    bases = {r["prompt_tokens"]: r for r in results if r["name"] == base}
    for res in results:
        b = bases.get(res["prompt_tokens"])
        if res["name"] == base or b is None:
            continue
        ratios.append({
            "runtime": res["runtime"], "vs": b["runtime"], "prompt_tokens": res["prompt_tokens"],
            **{k: res["median"][k] / b["median"][k] if b["median"][k] else None
               for k in ("prefill_tps", "ttft_s", "decode_tps", "peak_memory_bytes")},
            # Same checkpoint, same prompt, greedy: the same tokens unless rounding differs
            # (it does between float32 and bf16). A check that both ran the same model.
            "same_tokens": _first_tokens(res) == _first_tokens(b),
        })
    return ratios


# ---- checkpoints ---------------------------------------------------------------------------


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    from .store import home  # $OSS_MLX_HOME moves every cache of oss-mlx

    return home() / "bench"


def synth_checkpoint(preset: str, layers: int | None, seed: int, root: Path) -> tuple[Path, Path]:
    """A random-weight upstream checkpoint (HF layout, so mlx-lm loads it too) with the real
    dimensions of `preset`, and its conversion; built once and kept under `root`."""
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    if preset not in SYNTH_PRESETS:
        raise OssMlxError(f"unknown --synth preset {preset!r}; choose one of {', '.join(SYNTH_PRESETS)}")
    folder = root / f"synth-{preset}-L{layers or 'all'}-seed{seed}"
    src, mlx_dir = folder / "hf", folder / "mlx"
    # synth and convert write through stio.AtomicFolder: a folder with a config.json is complete.
    for final, build in ((src, lambda: synth(src, preset=preset, layout="hf", layers=layers, seed=seed)),
                         (mlx_dir, lambda: convert(src, mlx_dir))):
        if (final / "config.json").is_file():
            continue
        shutil.rmtree(final, ignore_errors=True)  # a leftover that is not a finished build
        build()
    return src, mlx_dir


def _source_of(model_dir: Path) -> Path | None:
    """The upstream checkpoint a converted folder came from, if its manifest names one that exists."""
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    src = manifest.get("source")
    if isinstance(src, dict):
        src = src.get("path")
    if isinstance(src, str) and (Path(src) / "config.json").is_file():
        return Path(src)
    return None


# ---- output ------------------------------------------------------------------------------


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render(report: dict, console) -> None:
    from rich.table import Table

    m = report["machine"]
    mem = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else "?"
    console.print(f"[bold]{m['chip']}[/] ({m['cpu_count']} cores, {mem}), MLX {m['mlx_version']} "
                  f"on {m['backend']}, mlx-lm {m['mlx_lm_version']}"
                  + (f", bandwidth {m['bandwidth_gbps']:g} GB/s" if m.get("bandwidth_gbps") else ""))
    model = report["model"]
    console.print(f"model: {model['name']} ({model['config']['num_hidden_layers']} layers, "
                  f"{model['config']['num_experts']} experts), quantization {model.get('quantization')}")
    s = report["settings"]
    has_bw = bool(m.get("bandwidth_gbps"))
    t = Table(title=f"gen {s['gen_tokens']} tokens, median of {s['repeat']} after "
                    f"{s['warmup']} warm-up, prefill chunk {s['chunk_size']}")
    for col in ("runtime", "prompt", "prefill tok/s", "TTFT s", "decode tok/s", "peak GB",
                "GB/token", "% roofline" if has_bw else "decode GB/s"):
        t.add_column(col, justify="left" if col == "runtime" else "right")
    for r in report["results"]:
        md, rf = r["median"], r["roofline"]
        last = f"{100 * rf['fraction']:.1f}%" if has_bw else f"{rf['achieved_gbps']:.2f}"
        t.add_row(r["runtime"], str(r["prompt_tokens"]), f"{md['prefill_tps']:.1f}",
                  f"{md['ttft_s']:.3f}", f"{md['decode_tps']:.2f}", _gb(md["peak_memory_bytes"]),
                  _gb(rf["bytes_per_token"]), last)
    console.print(t)
    if report["ratios"]:
        t = Table(title="ratios ours / mlx-lm (prefill, decode: > 1 is faster; TTFT, memory: < 1 is better)")
        for col in ("runtime", "vs", "prompt", "prefill", "TTFT", "decode", "peak mem", "same tokens"):
            t.add_column(col, justify="left" if col in ("runtime", "vs") else "right")
        for q in report["ratios"]:
            t.add_row(q["runtime"], q["vs"], str(q["prompt_tokens"]), _ratio(q["prefill_tps"]),
                      _ratio(q["ttft_s"]), _ratio(q["decode_tps"]), _ratio(q["peak_memory_bytes"]),
                      "yes" if q.get("same_tokens") else "no")
        console.print(t)
    if report.get("kernels"):
        t = Table(title="kernels per decode token (views excluded, each mx.fast call and each "
                        "fused compiled region once: oss_mlx/opcount.py)")
        for col in ("runtime", "per layer", "outside layers", "total", "a layer's kernels"):
            t.add_column(col, justify="left" if col in ("runtime", "a layer's kernels") else "right")
        for k in report["kernels"]:
            kinds = ", ".join(f"{n} {v:g}" for n, v in k["per_layer_kinds"].items())
            t.add_row(k["runtime"], f"{k['per_layer']:g}", f"{k['outside_layers']:g}",
                      str(k["total"]), kinds)
        console.print(t)
    console.print(f"[dim]dtype: {report['dtype_policy']}[/]")


def write_json(report: dict, path: Path) -> None:
    """All or nothing: a temporary file beside the target, renamed over it at the end."""
    from .convert.stio import atomic_write

    atomic_write(path, json.dumps(report, indent=2) + "\n")


# ---- command -----------------------------------------------------------------------------


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="converted model folder or name in the model store")
    src.add_argument("--synth", choices=SYNTH_PRESETS,
                     help="benchmark a random-weight model with the real 20b/120b dimensions "
                          "(built once in the cache folder; random weights cost what real ones do)")
    p.add_argument("--layers", type=int, help="with --synth: keep only the first N layers")
    p.add_argument("--source", help="upstream HF-layout checkpoint for --compare mlx-lm "
                                    "(default: the source named in the model's manifest)")
    p.add_argument("--prompt-tokens", default="128,4096,32768", help="comma-separated prompt lengths")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per run")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per figure (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per runtime and length")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk, the same for all runtimes")
    p.add_argument("--compare", choices=["mlx-lm"], help="also time mlx-lm on the same checkpoint")
    p.add_argument("--mlx-lm-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="mlx-lm's dtype: auto (as stored) or its float parameters cast to this")
    p.add_argument("--dtype", default="auto",
                   help="oss-mlx compute dtype: auto|bfloat16|float16|float32, or several "
                        "comma-separated (e.g. auto,float32) to time each")
    p.add_argument("--mlx-lm-dense-bits", type=int, default=16, choices=[16, 8],
                   help="8: quantize mlx-lm's dense matrices 8-bit group 64 (compare with a "
                        "--dense-bits 8 model of ours)")
    p.add_argument("--decode", default="compiled", choices=["compiled", "plain", "both"],
                   help="oss-mlx decode path: the compiled step (default), the plain forward, "
                        "or both side by side")
    p.add_argument("--ops", action="store_true",
                   help="also count the kernels one decode token launches, per layer and in "
                        "total, for each runtime (oss_mlx/opcount.py says how)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write all results here")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and prompts")
    p.add_argument("--cache-dir", help="where --synth keeps its checkpoints "
                                       "(default $OSS_MLX_HOME/bench, ~/.cache/oss-mlx/bench)")
    from . import memory

    memory.add_memory_arguments(p)
    p.add_argument("--serve", metavar="N,...",
                   help="serving benchmark instead: N concurrent streaming clients over loopback "
                        "HTTP for each N (e.g. 1,2,4,8), --gen-tokens each, the first "
                        "--prompt-tokens long (see oss_mlx.bench_serve)")
    p.add_argument("--serve-requests", type=int, default=3,
                   help="with --serve: requests per client, each continuing its conversation")
    p.add_argument("--serve-concurrency", type=int, default=None,
                   help="with --serve: the server's --max-concurrency (default: the largest N)")


def _positive_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v <= 0 for v in vals):
        raise OssMlxError(f"{what} must be positive integers separated by commas, got {text!r}")
    return vals


def main(args) -> int:
    from .distributed import launched

    if launched():  # one rank of an mlx.launch: tok/s and communication time per token
        from .dist_bench import main as distributed_main

        return distributed_main(args)
    from rich.console import Console

    # Piped into a file or a log, rich would assume 80 columns and fold the tables.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    err = Console(stderr=True)
    prompt_lengths = _positive_ints(args.prompt_tokens, "--prompt-tokens")
    (gen_tokens,) = _positive_ints(args.gen_tokens, "--gen-tokens")
    (repeat,) = _positive_ints(args.repeat, "--repeat")
    (chunk_size,) = _positive_ints(args.chunk_size, "--chunk-size")
    warmup = max(int(args.warmup), 0)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("auto", "bfloat16", "float16", "float32")]
    if bad or not dtypes:
        raise OssMlxError(f"--dtype must be auto, bfloat16, float16 or float32, got {args.dtype!r}")
    if args.layers is not None and (not args.synth or args.layers <= 0):
        raise OssMlxError("--layers needs --synth and a positive number")

    def log(msg: str) -> None:
        err.print(f"[dim]{msg}[/]")

    if args.synth:
        log(f"building (or reusing) the synthetic {args.synth} checkpoint ...")
        source, model_dir = synth_checkpoint(args.synth, args.layers, args.seed,
                                             _cache_root(args.cache_dir))
        model_ref, name = model_dir, f"synth-{args.synth}" + (f"-L{args.layers}" if args.layers else "")
    elif args.model:
        model_ref, name = args.model, args.model
        model_dir = Path(args.model) if Path(args.model).is_dir() else None
        source = Path(args.source) if args.source else (model_dir and _source_of(model_dir))
    else:
        raise OssMlxError("say what to benchmark: --model M or --synth 20b|120b")
    if args.compare == "mlx-lm" and not source and model_dir is not None:
        raise OssMlxError("--compare mlx-lm needs the upstream checkpoint: pass --source DIR")
    if args.serve:
        from . import bench_serve

        report = bench_serve.main(args, model_ref, _positive_ints(args.serve, "--serve"), log)
        if args.json_path:
            write_json({**report, "machine": machine_info(), "model": str(model_ref)},
                       Path(args.json_path))
        return 0

    machine = machine_info()
    runtimes = []
    from . import memory
    from .store import resolve_model

    # Plan for the longest run unless told otherwise (--max-context, --kv-bits, --force).
    args.max_context = getattr(args, "max_context", None) or max(prompt_lengths) + gen_tokens
    memory.check_fits(resolve_model(model_ref), args)
    for d in dtypes:
        log(f"loading oss-mlx ({d}) ...")
        # --kv-bits: the plain path (the compiled step keeps its own full-precision caches)
        plain = args.decode == "plain" or bool(getattr(args, "kv_bits", None))
        rt = load_ours(model_ref, d, decode="plain" if plain else "compiled")
        memory.apply(rt.model, args)
        runtimes.append(rt)
        if args.decode == "both" and not plain:
            runtimes.append(plain_variant(rt))
    if model_dir is None:  # a store name: the model knows its folder
        model_dir = getattr(runtimes[0].model, "model_dir", None)
        source = source or (model_dir and _source_of(Path(model_dir)))
    if args.compare == "mlx-lm" and not source:
        raise OssMlxError("--compare mlx-lm needs the upstream checkpoint: pass --source DIR")
    if args.compare == "mlx-lm":
        log("loading mlx-lm ...")
        runtimes.append(load_mlx_lm(source, args.mlx_lm_dtype, args.mlx_lm_dense_bits))
    cfg = runtimes[0].config
    if max(prompt_lengths) + gen_tokens > cfg.max_context:
        raise OssMlxError(f"prompt + generated tokens exceed the model's context of {cfg.max_context}")

    kernels = None
    if args.ops:
        from .opcount import count_in_subprocess

        log("counting the kernels of one decode step (in a subprocess) ...")
        kernels = count_in_subprocess(
            model_dir or model_ref, dtypes, source if args.compare == "mlx-lm" else None,
            decode=args.decode, mlx_lm_dtype=args.mlx_lm_dtype,
        )
    results = run_benchmark(runtimes, prompt_lengths, gen_tokens, repeat, warmup, chunk_size,
                            seed=args.seed, log=log)
    # Other processes' load changes the figures; alternating runs spreads it, this records it.
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    add_roofline(results, runtimes, machine["bandwidth_gbps"])
    meta = read_model_config(Path(model_dir)) if model_dir is not None else None
    quant = meta.get("quantization") if meta else None
    report = {
        "format": "oss-mlx-bench", "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "oss-mlx bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "machine": machine,
        "model": {"name": name, "path": str(model_dir) if model_dir else str(model_ref),
                  "source": str(source) if source else None, "synth": args.synth,
                  "layers": cfg.num_hidden_layers, "config": cfg.to_dict(), "quantization": quant},
        "settings": {"prompt_tokens": prompt_lengths, "gen_tokens": gen_tokens, "repeat": repeat,
                     "warmup": warmup, "chunk_size": chunk_size, "seed": args.seed,
                     "dtypes": dtypes, "compare": args.compare, "sampler": "greedy (argmax)",
                     "decode": args.decode, "mlx_lm_dtype": args.mlx_lm_dtype,
                     "mlx_lm_dense_bits": args.mlx_lm_dense_bits},
        "dtype_policy": DTYPE_POLICY,
        "runtimes": [{"name": rt.name, "label": rt.label, "dtype": rt.dtype,
                      "weights_bytes": rt.weights_bytes, "kv_itemsize": rt.kv_itemsize}
                     for rt in runtimes],
        "results": results,
        "ratios": compute_ratios(results),
        "kernels": kernels,
    }
    render(report, console)
    if args.json_path:
        write_json(report, Path(args.json_path))
        log(f"wrote {args.json_path}")
    return 0

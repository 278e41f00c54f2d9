"""What a decoded token costs against what the machine can do: the bytes one token reads
(summed from the tensors actually loaded: active experts only, one embedding row, the whole
unembedding, attention, router, norms, and the KV cache at that context), the bandwidth decode
achieved with them, and on an Apple chip the fraction of its memory-bandwidth roofline."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from typing import Any

from oss_mlx.config import ModelConfig
from oss_mlx.engine import machine

# Apple's memory bandwidth in GB/s (10^9 B/s), as Apple specifies each chip.
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

    gpu_cores = None
    if sys.platform == "darwin":
        m = re.search(r"Total Number of Cores:\s*(\d+)",
                      _run(["system_profiler", "SPDisplaysDataType"]))
        gpu_cores = int(m.group(1)) if m else None
    try:
        import mlx_lm

        mlx_lm_version = mlx_lm.__version__
    except ImportError:
        mlx_lm_version = None
    from oss_mlx import __version__

    info = {
        "chip": machine.chip(),
        "gpu_cores": gpu_cores,
        "cpu_count": os.cpu_count(),
        "memory_bytes": machine.machine_limit().total_ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm_version,
        "oss_mlx_version": __version__,
        "backend": machine.backend_name(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "bandwidth_gbps": None,
        "bandwidth_source": None,
    }
    bw = apple_bandwidth(info["chip"], gpu_cores) if sys.platform == "darwin" else None
    if bw is not None:
        info["bandwidth_gbps"] = bw
        info["bandwidth_source"] = "Apple's specification; attainable is ~85-90%"
    return info



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


def add_roofline(results: list[dict], runtimes: list, bandwidth_gbps: float | None):
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



"""What `oss-mlx bench` prints (rich tables) and writes (JSON, all or nothing)."""

from __future__ import annotations

import json
from pathlib import Path


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def quantization(q: dict | None) -> str:
    """"experts mxfp4, dense bf16" (or "dense affine 8-bit", "dense affine 4-bit, mlp.router
    affine 8-bit"), from config.json's quantization."""
    from oss_mlx.config import describe_dense

    if not q:
        return "quantization unknown"
    experts = (q.get("experts") or {}).get("mode", "?")
    try:
        dense = describe_dense(q.get("dense"))
    except ValueError:
        dense = "unknown"
    return f"experts {experts}, dense {dense}"


def render(report: dict, console) -> None:
    from rich.table import Table

    m = report["machine"]
    mem = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else "?"
    console.print(f"[bold]{m['chip']}[/] ({m['cpu_count']} cores, {mem}), MLX {m['mlx_version']} "
                  f"on {m['backend']}, mlx-lm {m['mlx_lm_version']}"
                  + (f", bandwidth {m['bandwidth_gbps']:g} GB/s" if m.get("bandwidth_gbps") else ""))
    model = report["model"]
    console.print(f"model: {model['name']} ({model['config']['num_hidden_layers']} layers, "
                  f"{model['config']['num_experts']} experts), {quantization(model.get('quantization'))}")
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
    from oss_mlx.checkpoint.files import atomic_write

    atomic_write(path, json.dumps(report, indent=2) + "\n")



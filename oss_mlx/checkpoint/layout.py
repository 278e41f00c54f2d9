"""Tensor names and shapes of the two upstream layouts, and how they map to ours (docs/checkpoint.md §3.1-3.3).

One table (`Tensor` rows), read by `synth` (names and initial values), `convert` (names, checks
and transform) and the model's loader (the dtype each tensor is held in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from oss_mlx.config import ModelConfig

@dataclass(frozen=True)
class Tensor:
    """One tensor: its names in each layout, and everything that differs from tensor to tensor.

    dtype, shape: as stored upstream (shape from the config). init: how `synth` draws it,
    ("normal", mean, std) | ("bytes",) (uniform random bytes: MXFP4 codes) | ("scales", e8m0).
    transform: how `convert` writes it, "copy" (bytes as stored; HF's q | k | v concatenated
    into the fused rows) or "deinterleave" (per expert, rows 2u = gate u, 2u+1 = up u become
    gate rows then up rows). stored: our dtype when it differs (MXFP4 blocks U8 [.., in/32, 16]
    are MLX's U32 [.., in/8], the same bytes). runtime: the dtype the model holds it in,
    "float32" (norm weights and the router: computed in fp32, docs/model.md §1.7), "stored"
    (the embedding: an exact row lookup, cast row by row), "experts" (the experts' biases: in
    the experts' activation dtype, so adding them needs no cast kernel) or "compute" (the
    compute dtype). model.Precision.weight reads it.
    """

    ours: str
    orig: str
    hf: tuple[str, ...]
    dtype: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    init: Callable[[ModelConfig], tuple]
    transform: str = "copy"
    stored: str | None = None
    runtime: str = "compute"


def _normal(mean, std):
    return lambda c: ("normal", mean, std(c) if callable(std) else std)


_H = lambda c: 1.0 / math.sqrt(c.hidden_size)  # noqa: E731


def _fp4_scale(fan_in: int) -> int:
    """E8M0 scale so that uniform random FP4 codes (std 2.93) give std ~ 1/sqrt(fan_in)."""
    fp4_std = math.sqrt(68.5 / 8)  # RMS of the 16 E2M1 values (docs/checkpoint.md §4.1)
    return 127 - math.ceil(math.log2(math.sqrt(fan_in) * fp4_std))


# Per-layer tensors (our name relative to `layers.N.`). HF splits the fused qkv projection into
# q/k/v (rows q | k | v, docs/checkpoint.md §3.3). Expert weights are MXFP4: U8 blocks [E, out, in/32, 16] +
# U8 E8M0 scales [E, out, in/32] (docs/checkpoint.md §4). Residual branches start at half strength so the
# stream stays O(1) over many layers.
LAYER = [
    Tensor("attention.norm.weight", "attn.norm.scale", ("input_layernorm.weight",), "BF16",
           lambda c: (c.hidden_size,), _normal(1.0, 0.1), runtime="float32"),
    Tensor("attention.qkv.weight", "attn.qkv.weight",
           ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
           "BF16", lambda c: (_qkv(c), c.hidden_size), _normal(0.0, _H)),
    Tensor("attention.qkv.bias", "attn.qkv.bias",
           ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "BF16",
           lambda c: (_qkv(c),), _normal(0.0, 0.02)),
    Tensor("attention.sinks", "attn.sinks", ("self_attn.sinks",), "BF16",
           lambda c: (c.num_attention_heads,), _normal(0.0, 0.5)),
    Tensor("attention.out.weight", "attn.out.weight", ("self_attn.o_proj.weight",), "BF16",
           lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
           _normal(0.0, lambda c: 0.5 / math.sqrt(c.num_attention_heads * c.head_dim))),
    Tensor("attention.out.bias", "attn.out.bias", ("self_attn.o_proj.bias",), "BF16",
           lambda c: (c.hidden_size,), _normal(0.0, 0.02)),
    Tensor("mlp.norm.weight", "mlp.norm.scale", ("post_attention_layernorm.weight",), "BF16",
           lambda c: (c.hidden_size,), _normal(1.0, 0.1), runtime="float32"),
    Tensor("mlp.router.weight", "mlp.gate.weight", ("mlp.router.weight",), "BF16",
           lambda c: (c.num_experts, c.hidden_size), _normal(0.0, _H), runtime="float32"),
    Tensor("mlp.router.bias", "mlp.gate.bias", ("mlp.router.bias",), "BF16",
           lambda c: (c.num_experts,), _normal(0.0, 0.1), runtime="float32"),
    Tensor("mlp.experts.gate_up.weight", "mlp.mlp1_weight.blocks",
           ("mlp.experts.gate_up_proj_blocks",), "U8",
           lambda c: (c.num_experts, 2 * c.intermediate_size, c.hidden_size // 32, 16),
           lambda c: ("bytes",), transform="deinterleave", stored="U32"),
    Tensor("mlp.experts.gate_up.scales", "mlp.mlp1_weight.scales",
           ("mlp.experts.gate_up_proj_scales",), "U8",
           lambda c: (c.num_experts, 2 * c.intermediate_size, c.hidden_size // 32),
           lambda c: ("scales", _fp4_scale(c.hidden_size)), transform="deinterleave"),
    Tensor("mlp.experts.gate_up.bias", "mlp.mlp1_bias", ("mlp.experts.gate_up_proj_bias",),
           "BF16", lambda c: (c.num_experts, 2 * c.intermediate_size), _normal(0.0, 0.05),
           transform="deinterleave", runtime="experts"),
    Tensor("mlp.experts.down.weight", "mlp.mlp2_weight.blocks", ("mlp.experts.down_proj_blocks",),
           "U8", lambda c: (c.num_experts, c.hidden_size, c.intermediate_size // 32, 16),
           lambda c: ("bytes",), stored="U32"),
    Tensor("mlp.experts.down.scales", "mlp.mlp2_weight.scales", ("mlp.experts.down_proj_scales",),
           "U8", lambda c: (c.num_experts, c.hidden_size, c.intermediate_size // 32),
           lambda c: ("scales", _fp4_scale(c.intermediate_size) - 1)),
    Tensor("mlp.experts.down.bias", "mlp.mlp2_bias", ("mlp.experts.down_proj_bias",), "BF16",
           lambda c: (c.num_experts, c.hidden_size), _normal(0.0, 0.05), runtime="experts"),
]

GLOBAL_FIRST = [
    Tensor("embedding.weight", "embedding.weight", ("model.embed_tokens.weight",), "BF16",
           lambda c: (c.vocab_size, c.hidden_size), _normal(0.0, 1.0), runtime="stored"),
]
GLOBAL_LAST = [
    Tensor("norm.weight", "norm.scale", ("model.norm.weight",), "BF16", lambda c: (c.hidden_size,),
           _normal(1.0, 0.1), runtime="float32"),
    Tensor("unembedding.weight", "unembedding.weight", ("lm_head.weight",), "BF16",
           lambda c: (c.vocab_size, c.hidden_size), _normal(0.0, lambda c: 2.0 / math.sqrt(c.hidden_size))),
]
TABLE = {t.ours: t for t in GLOBAL_FIRST + LAYER + GLOBAL_LAST}


def spec(name: str) -> Tensor:
    """The table row of one of our tensor names (`layers.3.mlp.router.weight`); an affine
    module's `.scales` / `.biases` follow its `.weight`."""
    lf = leaf(name)
    if lf not in TABLE and lf.endswith((".scales", ".biases")):
        lf = lf.rsplit(".", 1)[0] + ".weight"
    return TABLE[lf]


def runtime_dtype(name: str) -> str:
    """"float32" | "stored" | "compute": the dtype rule of the model for tensor `name`."""
    return spec(name).runtime


def _qkv(c: ModelConfig) -> int:
    return (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim


def qkv_split(c: ModelConfig) -> list[int]:
    """Row counts of q, k, v inside the fused qkv projection."""
    return [c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim]


def leaf(name: str) -> str:
    """Our tensor name without its `layers.N.` prefix (the first column of LAYER)."""
    return name.split(".", 2)[-1] if name.startswith("layers.") else name


def entries(cfg: ModelConfig):
    """(our name, original name, HF names, dtype, shape) for every tensor, in model order."""
    for t in GLOBAL_FIRST:
        yield t.ours, t.orig, list(t.hf), t.dtype, t.shape(cfg)
    for n in range(cfg.num_hidden_layers):
        for t in LAYER:
            yield (f"layers.{n}.{t.ours}", f"block.{n}.{t.orig}",
                   [f"model.layers.{n}.{h}" for h in t.hf], t.dtype, t.shape(cfg))
    for t in GLOBAL_LAST:
        yield t.ours, t.orig, list(t.hf), t.dtype, t.shape(cfg)


def upstream_parts(cfg: ModelConfig, layout: str, orig: str, hf: list[str],
                   shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(upstream name, shape) of the tensors that hold one of our tensors in `layout`, in row
    order (HF's q | k | v are consecutive row ranges of the fused qkv)."""
    if layout == "original":
        return [(orig, shape)]
    if len(hf) == 1:
        return [(hf[0], shape)]
    return [(name, (rows,) + shape[1:]) for name, rows in zip(hf, qkv_split(cfg))]


def upstream_tensors(cfg: ModelConfig, layout: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{upstream name: (dtype, shape)} of a checkpoint in `layout` ("hf" or "original")."""
    return {name: (dtype, s)
            for _, orig, hf, dtype, shape in entries(cfg)
            for name, s in upstream_parts(cfg, layout, orig, hf, shape)}


# ---- our converted folder's quantization (config.json "quantization") -----------------------
# Experts: MXFP4, stored as MLX's mxfp4 tensors (docs/checkpoint.md §4.5).
EXPERTS_MXFP4 = {"mode": "mxfp4", "group_size": 32, "bits": 4}
# `oss-mlx convert --dense-bits 8`: attention qkv/out, embedding and unembedding affine 8-bit.
DENSE_Q8 = {"mode": "affine", "group_size": 64, "bits": 8,
            "modules": ["embedding", "attention.qkv", "attention.out", "unembedding"]}
DENSE_BITS = (16, 8, 4)


def dense_quantization(bits: int) -> dict | None:
    """config.json's quantization.dense for `--dense-bits bits` (None: bf16). 4 bits keeps
    8-bit's modules and group size (64), so only the bits differ."""
    return None if bits == 16 else {**DENSE_Q8, "bits": bits}


# ---- mlx-lm's gpt_oss layout -------------------------------------------------------------
# What `mlx_lm.convert` writes for gpt-oss (mlx_lm.models.gpt_oss.sanitize; the
# mlx-community/gpt-oss-*-MXFP4-Q8 builds): the HF names, but the experts split into gate_proj /
# up_proj and already in MLX's mxfp4 form (U32 weight [E, out, in/8], U8 E8M0 scales
# [E, out, in/32]), and any dense Linear / Embedding possibly affine-quantized (`.weight` U32
# [out, in*bits/32], `.scales` / `.biases` BF16 [out, in/group]).
MLX_LM_EXPERTS = {
    "mlp.experts.gate_up.weight": ("U32", ["gate_proj.weight", "up_proj.weight"]),
    "mlp.experts.gate_up.scales": ("U8", ["gate_proj.scales", "up_proj.scales"]),
    "mlp.experts.gate_up.bias": ("BF16", ["gate_proj.bias", "up_proj.bias"]),
    "mlp.experts.down.weight": ("U32", ["down_proj.weight"]),
    "mlp.experts.down.scales": ("U8", ["down_proj.scales"]),
    "mlp.experts.down.bias": ("BF16", ["down_proj.bias"]),
}
# Our modules that mlx-lm may store quantized (the converter's DENSE_Q8 list plus the router,
# which mlx-lm's gpt_oss quant_predicate always quantizes to 8 bits).
QUANTIZABLE = ("embedding", "attention.qkv", "attention.out", "unembedding", "mlp.router")


def module_of(name: str) -> str | None:
    """'layers.3.attention.qkv.weight' -> 'attention.qkv' when that module may be quantized."""
    stem = leaf(name)[: -len(".weight")] if name.endswith(".weight") else None
    return stem if stem in QUANTIZABLE else None


def is_mlx_lm(names) -> bool:
    return any(n.endswith("mlp.experts.gate_proj.weight") for n in names)


def mlx_lm_parts(cfg: ModelConfig, ours: str, hf: list[str], dtype: str, shape: tuple[int, ...],
                 dense: dict | None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(mlx-lm name, dtype, shape) of the tensors that hold one of our tensors, in the order
    their bytes make ours: per expert, gate rows then up rows; for a quantized module, the
    weights of q | k | v, then their scales, then their biases. `dense`: {module: {"mode",
    "group_size", "bits"}} (mlx_lm_dense)."""
    lf = leaf(ours)
    if lf in MLX_LM_EXPERTS:
        prefix = hf[0].split("mlp.experts.")[0] + "mlp.experts."
        kind, names = MLX_LM_EXPERTS[lf]
        e, rows = shape[0], shape[1] // len(names)
        if lf.endswith(".bias"):
            tail = ()
        elif lf.endswith(".weight"):
            tail = (shape[2] * 4,)  # our upstream shape is U8 [E, out, in/32, 16]
        else:
            tail = (shape[2],)
        return [(prefix + n, kind, (e, rows) + tail) for n in names]
    parts = [(n, dtype, s) for n, s in upstream_parts(cfg, "hf", "", hf, shape)]
    q = (dense or {}).get(module_of(ours))
    if q is None:
        return parts
    g, b = q["group_size"], q["bits"]
    out = [(n, "U32", (s[0], s[1] * b // 32)) for n, _, s in parts]
    for suffix in ("scales", "biases"):
        out += [(n[: -len("weight")] + suffix, "BF16", (s[0], s[1] // g)) for n, _, s in parts]
    return out


ACCEPTED_MLX_LM = ("oss-mlx reads mlx-lm folders whose dense modules are bf16 or affine-"
                   "quantized, each kind of module (embedding, attention q/k/v, attention out, "
                   "router, unembedding) alike in every layer, at any bits and group size: "
                   "what `mlx_lm.convert -q` and `--q-bits N` write")


def mlx_lm_dense(cfg: ModelConfig, tensors: dict) -> dict | None:
    """The affine quantization of an mlx-lm folder's dense modules, read off its tensors:
    {module: {"mode", "group_size", "bits"}} (each module as mlx-lm stored it: `mlx_lm.convert
    -q` makes them 4-bit and the router 8-bit), or None when they are all bf16. ValueError,
    saying what is accepted, for what cannot be kept losslessly in our layout."""
    seen: dict[str, set] = {}
    for ours, _, hf, _, shape in entries(cfg):
        module = module_of(ours)
        if module is None:
            continue
        cols = shape[1]
        for name in hf:
            scales = name[: -len("weight")] + "scales"
            if scales not in tensors:
                seen.setdefault(module, set()).add(None)
                continue
            if name[: -len("weight")] + "biases" not in tensors:
                raise ValueError(f"{name[: -len('.weight')]} is quantized in a mode other than "
                                 f"affine (no .biases beside its .scales); {ACCEPTED_MLX_LM}")
            w, s = tensors[name], tensors[scales]
            if len(w.shape) != 2 or len(s.shape) != 2 or not w.shape[1] or not s.shape[1]:
                continue  # the shape check reports it
            seen.setdefault(module, set()).add((cols // s.shape[1], w.shape[1] * 32 // cols))
    for module, params in seen.items():
        if len(params) > 1:
            found = ", ".join("bf16" if p is None else f"{p[1]}-bit group {p[0]}"
                              for p in sorted(params, key=lambda p: p or (0, 0)))
            raise ValueError(f"{module} is quantized differently across layers or q/k/v "
                             f"({found}); {ACCEPTED_MLX_LM}")
    modules = {m: {"mode": "affine", "group_size": p[0], "bits": p[1]}
               for m, (p,) in seen.items() if p is not None}
    return modules or None


def dense_config(modules: dict | None) -> dict | None:
    """config.json's quantization.dense for {module: {"mode", "group_size", "bits"}}: the
    uniform form when every module is alike (what `--dense-bits` writes), else the per-module
    form (oss_mlx/config.py reads both)."""
    if not modules:
        return None
    kinds = {(q["mode"], q["group_size"], q["bits"]) for q in modules.values()}
    if len(kinds) == 1:
        (mode, group, bits), = kinds
        return {"mode": mode, "group_size": group, "bits": bits, "modules": sorted(modules)}
    return {"modules": {m: dict(modules[m]) for m in sorted(modules)}}

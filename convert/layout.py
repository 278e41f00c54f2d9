"""Tensor names and shapes of the two upstream layouts, and how they map to ours (spec 3.1-3.3).

One table, used by `synth` (to write checkpoints) and `convert` (to check and read them).
"""

from __future__ import annotations

from oss_mlx.config import ModelConfig

# Per-layer tensors: (our name, original name, HF names, dtype, shape from config).
# HF splits the fused qkv projection into q/k/v (rows q | k | v, spec 3.3).
# Expert weights are MXFP4: U8 blocks [E, out, in/32, 16] + U8 E8M0 scales [E, out, in/32].
LAYER = [
    ("attention.norm.weight", "attn.norm.scale", ["input_layernorm.weight"], "BF16",
     lambda c: (c.hidden_size,)),
    ("attention.qkv.weight", "attn.qkv.weight",
     ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"], "BF16",
     lambda c: (_qkv(c), c.hidden_size)),
    ("attention.qkv.bias", "attn.qkv.bias",
     ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"], "BF16",
     lambda c: (_qkv(c),)),
    ("attention.sinks", "attn.sinks", ["self_attn.sinks"], "BF16",
     lambda c: (c.num_attention_heads,)),
    ("attention.out.weight", "attn.out.weight", ["self_attn.o_proj.weight"], "BF16",
     lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    ("attention.out.bias", "attn.out.bias", ["self_attn.o_proj.bias"], "BF16",
     lambda c: (c.hidden_size,)),
    ("mlp.norm.weight", "mlp.norm.scale", ["post_attention_layernorm.weight"], "BF16",
     lambda c: (c.hidden_size,)),
    ("mlp.router.weight", "mlp.gate.weight", ["mlp.router.weight"], "BF16",
     lambda c: (c.num_experts, c.hidden_size)),
    ("mlp.router.bias", "mlp.gate.bias", ["mlp.router.bias"], "BF16",
     lambda c: (c.num_experts,)),
    ("mlp.experts.gate_up.weight", "mlp.mlp1_weight.blocks", ["mlp.experts.gate_up_proj_blocks"],
     "U8", lambda c: (c.num_experts, 2 * c.intermediate_size, c.hidden_size // 32, 16)),
    ("mlp.experts.gate_up.scales", "mlp.mlp1_weight.scales", ["mlp.experts.gate_up_proj_scales"],
     "U8", lambda c: (c.num_experts, 2 * c.intermediate_size, c.hidden_size // 32)),
    ("mlp.experts.gate_up.bias", "mlp.mlp1_bias", ["mlp.experts.gate_up_proj_bias"], "BF16",
     lambda c: (c.num_experts, 2 * c.intermediate_size)),
    ("mlp.experts.down.weight", "mlp.mlp2_weight.blocks", ["mlp.experts.down_proj_blocks"], "U8",
     lambda c: (c.num_experts, c.hidden_size, c.intermediate_size // 32, 16)),
    ("mlp.experts.down.scales", "mlp.mlp2_weight.scales", ["mlp.experts.down_proj_scales"], "U8",
     lambda c: (c.num_experts, c.hidden_size, c.intermediate_size // 32)),
    ("mlp.experts.down.bias", "mlp.mlp2_bias", ["mlp.experts.down_proj_bias"], "BF16",
     lambda c: (c.num_experts, c.hidden_size)),
]

GLOBAL_FIRST = [("embedding.weight", "embedding.weight", ["model.embed_tokens.weight"], "BF16",
                 lambda c: (c.vocab_size, c.hidden_size))]
GLOBAL_LAST = [
    ("norm.weight", "norm.scale", ["model.norm.weight"], "BF16", lambda c: (c.hidden_size,)),
    ("unembedding.weight", "unembedding.weight", ["lm_head.weight"], "BF16",
     lambda c: (c.vocab_size, c.hidden_size)),
]


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
    for ours, orig, hf, dtype, shape in GLOBAL_FIRST:
        yield ours, orig, hf, dtype, shape(cfg)
    for n in range(cfg.num_hidden_layers):
        for ours, orig, hf, dtype, shape in LAYER:
            yield (f"layers.{n}.{ours}", f"block.{n}.{orig}",
                   [f"model.layers.{n}.{h}" for h in hf], dtype, shape(cfg))
    for ours, orig, hf, dtype, shape in GLOBAL_LAST:
        yield ours, orig, hf, dtype, shape(cfg)


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
    weights of q | k | v, then their scales, then their biases."""
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
    if dense is None or module_of(ours) not in dense["modules"]:
        return parts
    g, b = dense["group_size"], dense["bits"]
    out = [(n, "U32", (s[0], s[1] * b // 32)) for n, _, s in parts]
    for suffix in ("scales", "biases"):
        out += [(n[: -len("weight")] + suffix, "BF16", (s[0], s[1] // g)) for n, _, s in parts]
    return out


def mlx_lm_dense(cfg: ModelConfig, tensors: dict) -> dict | None:
    """The affine quantization of an mlx-lm folder's dense modules, read off its tensors:
    {"mode", "group_size", "bits", "modules"} or None when they are all bf16."""
    modules, params = set(), set()
    for ours, _, hf, _, shape in entries(cfg):
        module = module_of(ours)
        scales = hf[0][: -len("weight")] + "scales"
        if module is None or scales not in tensors:
            continue
        modules.add(module)
        w, s = tensors[hf[0]], tensors[scales]
        cols = shape[1]
        if len(w.shape) != 2 or len(s.shape) != 2 or not w.shape[1] or not s.shape[1]:
            continue  # the shape check reports it
        params.add((cols // s.shape[1], w.shape[1] * 32 // cols))
    if not modules:
        return None
    if len(params) != 1:
        raise ValueError(f"mixed dense quantization {sorted(params)}")
    (group, bits), = params
    return {"mode": "affine", "group_size": group, "bits": bits, "modules": sorted(modules)}

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

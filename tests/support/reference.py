"""A plain-numpy gpt-oss forward pass written from docs/model.md §1.8, the tests' oracle.

Independent of oss_mlx on purpose: it reads the SOURCE checkpoint (HF or original layout) with
its own safetensors parser, decodes MXFP4 as docs/checkpoint.md §4.3 says (low nibble = even element, scale
2^(s-127)), keeps gate/up interleaved, and loops over heads and experts like the pseudocode.
Computes in float64 (the bf16 weights are exact in it).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np

FP4 = np.array(
    [+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader: 8-byte header length, JSON header, raw little-endian data."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = data[a:b]
        shape = info["shape"]
        dt = info["dtype"]
        if dt == "BF16":  # bf16 = the top 16 bits of a float32
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "U8":
            arr = np.frombuffer(buf, np.uint8)
        elif dt == "F32":
            arr = np.frombuffer(buf, "<f4")
        elif dt == "F16":
            arr = np.frombuffer(buf, "<f2")
        else:
            raise ValueError(f"{name}: unsupported dtype {dt}")
        out[name] = arr.reshape(shape)
    return out


def fingerprint(src) -> str:
    """sha256 over the tensors (names, shapes, bytes) of a checkpoint folder."""
    h = hashlib.sha256()
    tensors = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def mxfp4_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., out, G, 16] uint8, scales [..., out, G] -> W [..., out, G*32] (float64).

    docs/checkpoint.md §4.3: input index i = 32*g + j; byte j//2 of block g; low nibble = even j, high nibble
    = odd j; value = FP4[code] * 2^(scale - 127) (docs/checkpoint.md §4.2).
    """
    lo = FP4[blocks & 0x0F]
    hi = FP4[blocks >> 4]
    vals = np.empty(blocks.shape[:-1] + (32,))
    vals[..., 0::2] = lo
    vals[..., 1::2] = hi
    vals = vals * np.exp2(scales.astype(np.float64) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


def load_checkpoint(src) -> tuple[dict, dict]:
    """(config in original key names, weights in original names) from an HF or original folder."""
    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    if "model_type" not in cfg:  # original layout: already the reference's names
        return cfg, tensors
    rs = cfg["rope_scaling"]
    conf = dict(
        num_hidden_layers=cfg["num_hidden_layers"], num_experts=cfg["num_local_experts"],
        experts_per_token=cfg["num_experts_per_tok"], vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        swiglu_limit=cfg.get("swiglu_limit", 7.0), head_dim=cfg["head_dim"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], sliding_window=cfg["sliding_window"],
        initial_context_length=rs["original_max_position_embeddings"],
        rope_theta=cfg["rope_theta"], rope_scaling_factor=rs["factor"],
        rope_ntk_alpha=rs["beta_slow"], rope_ntk_beta=rs["beta_fast"],
    )
    w = {
        "embedding.weight": tensors["model.embed_tokens.weight"],
        "norm.scale": tensors["model.norm.weight"],
        "unembedding.weight": tensors["lm_head.weight"],
    }
    for n in range(conf["num_hidden_layers"]):
        p, b = f"model.layers.{n}.", f"block.{n}."
        a = p + "self_attn."
        w[b + "attn.norm.scale"] = tensors[p + "input_layernorm.weight"]
        w[b + "attn.qkv.weight"] = np.concatenate([tensors[a + f"{x}_proj.weight"] for x in "qkv"])
        w[b + "attn.qkv.bias"] = np.concatenate([tensors[a + f"{x}_proj.bias"] for x in "qkv"])
        w[b + "attn.out.weight"] = tensors[a + "o_proj.weight"]
        w[b + "attn.out.bias"] = tensors[a + "o_proj.bias"]
        w[b + "attn.sinks"] = tensors[a + "sinks"]
        w[b + "mlp.norm.scale"] = tensors[p + "post_attention_layernorm.weight"]
        w[b + "mlp.gate.weight"] = tensors[p + "mlp.router.weight"]
        w[b + "mlp.gate.bias"] = tensors[p + "mlp.router.bias"]
        e = p + "mlp.experts."
        for new, old in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            w[b + f"mlp.{new}_weight.blocks"] = tensors[e + old + "_blocks"]
            w[b + f"mlp.{new}_weight.scales"] = tensors[e + old + "_scales"]
            w[b + f"mlp.{new}_bias"] = tensors[e + old + "_bias"]
    return conf, w


def yarn_inv_freq(c) -> tuple[np.ndarray, float]:
    d, base, s = c["head_dim"], c["rope_theta"], c["rope_scaling_factor"]
    freq = base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    concentration = 0.1 * math.log(s) + 1.0
    d_half = d / 2
    L0 = c["initial_context_length"]
    low = d_half * math.log(L0 / (c["rope_ntk_beta"] * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(L0 / (c["rope_ntk_alpha"] * 2 * math.pi)) / math.log(base)
    ramp = np.clip((np.arange(d_half) - low) / (high - low), 0, 1)
    mask = 1 - ramp
    inv_freq = (1 / (s * freq)) * (1 - mask) + (1 / freq) * mask
    return inv_freq, concentration


def rmsnorm(x, scale, eps=1e-5):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def rope_half(x, cos, sin):  # x [T, heads, D]; cos/sin [T, D/2]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[:, None], sin[:, None]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def forward(conf: dict, w: dict, ids) -> np.ndarray:
    """Logits [T, V] (float64) for one sequence, no cache: docs/model.md §1.8 line by line."""
    ids = np.asarray(ids)
    T = len(ids)
    L, D = conf["num_hidden_layers"], conf["head_dim"]
    nq, nkv = conf["num_attention_heads"], conf["num_key_value_heads"]
    k_top, limit, alpha = conf["experts_per_token"], conf["swiglu_limit"], 1.702
    f = lambda name: w[name].astype(np.float64)  # noqa: E731

    x = f("embedding.weight")[ids]
    inv_freq, conc = yarn_inv_freq(conf)
    angle = np.arange(T)[:, None] * inv_freq[None]
    cos, sin = np.cos(angle) * conc, np.sin(angle) * conc
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    for l in range(L):
        b = f"block.{l}."
        t = rmsnorm(x, f(b + "attn.norm.scale"))
        qkv = t @ f(b + "attn.qkv.weight").T + f(b + "attn.qkv.bias")
        q = qkv[:, : nq * D].reshape(T, nq, D)
        k = qkv[:, nq * D : (nq + nkv) * D].reshape(T, nkv, D)
        v = qkv[:, (nq + nkv) * D :].reshape(T, nkv, D)
        q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
        W = conf["sliding_window"] if l % 2 == 0 else None
        allowed = (j <= i) & ((W is None) | (j > i - (W or 0)))
        sinks = f(b + "attn.sinks")
        o = np.empty((T, nq, D))
        for h in range(nq):
            kv = h // (nq // nkv)
            s = (q[:, h] @ k[:, kv].T) / math.sqrt(D)
            s = np.where(allowed, s, -np.inf)
            z = np.concatenate([s, np.full((T, 1), sinks[h])], axis=1)
            o[:, h] = softmax(z, axis=1)[:, :-1] @ v[:, kv]
        x = x + o.reshape(T, nq * D) @ f(b + "attn.out.weight").T + f(b + "attn.out.bias")

        t = rmsnorm(x, f(b + "mlp.norm.scale"))
        g = t @ f(b + "mlp.gate.weight").T + f(b + "mlp.gate.bias")
        idx = np.argsort(-g, axis=1, kind="stable")[:, :k_top]
        wts = softmax(np.take_along_axis(g, idx, axis=1), axis=1)
        W1 = mxfp4_dequant(w[b + "mlp.mlp1_weight.blocks"], w[b + "mlp.mlp1_weight.scales"])
        W2 = mxfp4_dequant(w[b + "mlp.mlp2_weight.blocks"], w[b + "mlp.mlp2_weight.scales"])
        b1, b2 = f(b + "mlp.mlp1_bias"), f(b + "mlp.mlp2_bias")
        y = np.zeros_like(x)
        for n in range(T):
            for r in range(k_top):
                e = idx[n, r]
                h1 = W1[e] @ t[n] + b1[e]
                gt, up = np.minimum(h1[0::2], limit), np.clip(h1[1::2], -limit, limit)
                a = (up + 1) * gt / (1 + np.exp(-alpha * gt))
                y[n] += wts[n, r] * (W2[e] @ a + b2[e])
        x = x + y
    return rmsnorm(x, f("norm.scale")) @ f("unembedding.weight").T

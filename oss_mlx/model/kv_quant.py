"""Quantized KV cache for the full-attention layers, and attention over it WITH the sinks.

gpt-oss's attention has a learned sink per head: one more logit in each query's softmax, with no
value (docs/model.md §1.4). mlx-lm's `quantized_scaled_dot_product_attention` has no sinks, so it cannot
serve gpt-oss. Here:

    cache = QuantizedKVCache(bits=8)        # mlx-lm's QuantizedKVCache (affine, group 64)
    k, v = cache.update_and_fetch(k, v)     # (packed, scales, biases) tuples
    o = attention(q, k, v, scale, mask, sinks, cache.group_size, cache.bits)

Only the full-attention layers are quantized: their cache grows with the context (~all of the
KV memory at long contexts), while a sliding layer holds 128 keys whatever the context, so it
stays in full precision (`Model.make_cache(kv_bits=...)`).

Two paths, both exact for the quantized keys and values (dequantize(q) is what the quantized
matmul multiplies by):
- decode (one query): scores by `mx.quantized_matmul` over the packed keys, softmax with the sink
  as an extra logit, then `mx.quantized_matmul` over the packed values. Reads 8 (or 4) bits per
  cached element instead of 16, which is what decode at long contexts is bound by.
- prefill (several queries): dequantize this layer's keys/values once and call the fused
  `mx.fast.scaled_dot_product_attention(..., sinks=...)`, so a 512-token chunk against a long
  cache never materialises [heads, 512, context] scores on Metal (the transient bf16 copy is
  counted by the memory plan).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache as _MlxLmQuantizedKVCache

from oss_mlx.defaults import KV_BITS as BITS
from oss_mlx.defaults import KV_GROUP_SIZE as GROUP_SIZE


class QuantizedKVCache(_MlxLmQuantizedKVCache):
    """mlx-lm's QuantizedKVCache (state, offset, update_and_fetch, trim, is_trimmable,
    make_mask, nbytes) with gpt-oss's group size. keys/values are (packed uint32, scales,
    biases) tuples of [B, n_kv, allocated, ...] arrays; only [..., :offset, :] is valid."""

    def __init__(self, bits: int = 8, group_size: int = GROUP_SIZE):
        if bits not in BITS:
            raise ValueError(f"KV cache bits must be one of {BITS}, not {bits}")
        super().__init__(group_size=group_size, bits=bits)

    def copy(self) -> "QuantizedKVCache":
        """An independent copy (new array objects: slice assignment rebinds arrays in place,
        so a copy sharing them would change with the original)."""
        new = QuantizedKVCache(self.bits, self.group_size)
        new.offset = self.offset
        if self.keys is not None:
            new.keys = tuple(mx.array(a) for a in self.keys)
            new.values = tuple(mx.array(a) for a in self.values)
        return new


def is_quantized(cache) -> bool:
    """Any mlx-lm QuantizedKVCache, ours or one that mlx-lm's load_prompt_cache rebuilt (it
    names classes by their mlx-lm name), goes through `attention`."""
    return isinstance(cache, _MlxLmQuantizedKVCache)


def _decode(q, keys, values, scale, mask, sinks, group_size, bits):
    B, n_q, L, D = q.shape
    n_kv = keys[0].shape[1]
    r = n_q // n_kv
    out_dtype = q.dtype
    # MLX's CPU quantized matmul is ~8x faster with float32 activations than bf16 ones (same
    # codes, same scales); on Metal the model dtype is kept (p then reads half the bytes).
    act = mx.float32 if mx.default_device().type == mx.DeviceType.cpu else q.dtype
    # GQA without repeating K/V: queries [B, n_kv, r, L, D] against keys [B, n_kv, 1, S, ...].
    q = (q.astype(act) * scale).reshape(B, n_kv, r, L, D)
    keys = tuple(mx.expand_dims(a, -3) for a in keys)
    values = tuple(mx.expand_dims(a, -3) for a in values)
    scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=bits)
    scores = scores.astype(mx.float32)
    if mask is not None:
        if isinstance(mask, str):  # "causal": query i is the (S-L+i)-th key
            S = scores.shape[-1]
            mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        if mask.ndim == 4:  # [B, 1 or n_q, L, S] -> the [B, n_kv, r, L, S] layout
            mask = mask.reshape(mask.shape[0], -1, 1 if mask.shape[1] == 1 else r, *mask.shape[2:])
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    # The sink is one more logit in the softmax, with no value: it only enlarges the denominator.
    sink = sinks.astype(mx.float32).reshape(1, n_kv, r, 1, 1)
    m = mx.maximum(scores.max(axis=-1, keepdims=True), sink)
    p = mx.exp(scores - m)
    p = p / (p.sum(axis=-1, keepdims=True) + mx.exp(sink - m))
    out = mx.quantized_matmul(p.astype(act), *values, transpose=False,
                              group_size=group_size, bits=bits)
    return out.reshape(B, n_q, L, -1).astype(out_dtype)


def attention(q, keys, values, scale, mask, sinks, group_size: int = GROUP_SIZE, bits: int = 8):
    """softmax([q.k * scale, sink]) . v over a quantized cache; q [B, n_q, L, D] (RoPE applied),
    keys/values the (packed, scales, biases) tuples of QuantizedKVCache.update_and_fetch, mask as
    for mx.fast.scaled_dot_product_attention. Returns [B, n_q, L, D] in q's dtype."""
    if q.shape[2] == 1:
        return _decode(q, keys, values, scale, mask, sinks, group_size, bits)
    k = mx.dequantize(*keys, group_size=group_size, bits=bits).astype(q.dtype)
    v = mx.dequantize(*values, group_size=group_size, bits=bits).astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)

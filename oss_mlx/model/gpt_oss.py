"""The gpt-oss forward pass in MLX (docs/model.md §1), and loading a converted folder.

Reads top to bottom like the architecture: RMSNorm, Attention (fused qkv, YaRN RoPE, GQA with
learned sinks, sliding window on even layers), Experts/MLP (router, top-4, one fused gate_up
`gather_qmm` on the mxfp4 weights, clamped SwiGLU, down), Block, Model.

    model = load(path, dtype=None)      # converted folder or store name; dtype=default_dtype()
    model.config                        # ModelConfig
    model.model_dir                     # Path of the folder loaded
    model.dtype                         # dtype of the dense weights and matmul inputs
    logits = model(tokens, cache=None)  # [B, T] -> [B, T, V]
    cache = model.make_cache()          # RotatingKVCache(window) on sliding layers, KVCache else
    cache = model.make_cache(kv_bits=8) # ... kv_quant.QuantizedKVCache (8 or 4 bit) on full layers
    logits = model.prefill(tokens, cache, chunk_size=512)   # [B, V], last position only
    model.prefill(tokens, cache, logits=False)              # only fill the cache

Precision: one rule, `Precision` (float32 residual stream, norms and router; the embedding as
stored; dense weights in `dtype`; the experts' activations float32 on the CPU backend).

Kernels: a decode layer launches 19 (float32) to 21 (bf16 dense and experts) kernels, views
excluded (`oss-mlx bench --ops`, oss_mlx/opcount.py); each is named where it is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, _gather_sort, _scatter_unsort

from oss_mlx.model import kv_quant
from oss_mlx.config import ModelConfig
from oss_mlx.defaults import PREFILL_CHUNK
from oss_mlx.model.rope import yarn


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def default_dtype() -> mx.Dtype:
    """bfloat16, the checkpoint's dtype, on every backend. On the CPU backend float32 used to
    pay only through the mxfp4 expert matmuls, and those take float32 activations there anyway
    (see Precision); with that, bf16 dense weights prefill and decode faster than float32 ones
    on the CPU too, in half the memory (benchmarks/results/cpu-20b-L2.txt)."""
    return mx.bfloat16


@dataclass(frozen=True)
class Precision:
    """THE precision rule of the model, in one place: what each weight is stored in and what
    each computation runs in.

    - The residual stream, every norm (compute and weight) and the router are float32 whatever
      `dense` is (cheap, and keeps a bf16 run close to float32): near-ties between experts
      resolve as in a float32 run instead of flipping on bf16 rounding.
    - The embedding table stays in its stored dtype (an exact row lookup); rows are cast.
    - Dense weights (attention, unembedding, sinks, their biases) and the matmuls they feed:
      `dense`; the attention norm and the final norm cast their output to it.
    - The experts' activations and biases: `experts`. Their weights are the same 4-bit codes
      either way; MLX's CPU backend runs mxfp4 matmuls with bf16 activations ~10x slower than
      with float32 ones, so by default the experts get float32 there and `dense` elsewhere.
      (The biases follow so that adding them needs no cast kernel; a few KB a token.)

    `weight(name)` says what a stored tensor is loaded in (load's `_cast`); Model.__init__
    sets the norms' output dtypes and the experts' input dtype from the same fields.
    """

    dense: mx.Dtype = mx.bfloat16
    experts: mx.Dtype = mx.bfloat16

    @classmethod
    def of(cls, dense, experts=None) -> "Precision":
        if experts is None:
            experts = mx.float32 if _on_cpu() else dense
        return cls(dense, experts)

    def weight(self, name: str) -> mx.Dtype | None:
        """The dtype a stored floating tensor is loaded in; None keeps the stored one. Which
        rule applies to which tensor is the `runtime` column of the converter's layout table."""
        from oss_mlx.checkpoint.layout import runtime_dtype

        return {"float32": mx.float32, "stored": None, "experts": self.experts}.get(
            runtime_dtype(name), self.dense)


def _norm_out(x: mx.array, weight: mx.array, eps: float, dtype) -> mx.array:
    # The reference normalises AND multiplies by the weight in float32, then casts (docs/model.md §1.3):
    # the residual x and the weight are float32, so rms_norm runs in float32; the cast is a
    # second kernel only when the next matmul wants another dtype.
    y = mx.fast.rms_norm(x, weight, eps)
    return y if y.dtype == dtype else y.astype(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float, dtype=mx.float32):
        super().__init__()
        self.weight = mx.ones((dims,))  # float32 (Precision.weight)
        self.eps = eps
        self.dtype = dtype  # of the output, i.e. of the matmuls that follow

    def __call__(self, x):
        return _norm_out(x, self.weight, self.eps, self.dtype)


@partial(mx.compile, shapeless=True)
def _residual(x, y):
    return x + y.astype(x.dtype)  # one kernel, the cast fused


def add_residual(x, y):
    return x + y if x.dtype == y.dtype else _residual(x, y)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.n_q = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, (self.n_q + 2 * self.n_kv) * self.head_dim)
        self.out = nn.Linear(self.n_q * self.head_dim, config.hidden_size)
        self.sinks = mx.zeros((self.n_q,))
        # YaRN's concentration multiplies cos and sin, i.e. both rotated q and k; RoPE is linear,
        # so it folds exactly into the softmax scale (one multiply fewer per layer).
        self.scale = config.head_dim**-0.5 * config.yarn_concentration**2

    def qkv_rope(self, x, offset, periods):
        """q [B, n_q, T, D], k and v [B, n_kv, T, D], RoPE at positions offset.. (an int or a
        scalar array): views of one qkv matmul and one rope call, no copies."""
        B, T, _ = x.shape
        D, n_q, n_kv = self.head_dim, self.n_q, self.n_kv
        qkv = self.qkv(self.norm(x)).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        qk = mx.fast.rope(
            qkv[:, : n_q + n_kv], D, traditional=False, base=None, scale=1.0,
            offset=offset, freqs=periods,
        )
        return qk[:, :n_q], qk[:, n_q:], qkv[:, n_q + n_kv :]

    def attend(self, x, q, k, v, mask, cache=None):
        B, _, T, _ = q.shape
        if kv_quant.is_quantized(cache):  # --kv-bits: the attention with the sinks
            o = kv_quant.attention(q, k, v, self.scale, mask, self.sinks, cache.group_size,
                                   cache.bits)
        else:
            o = mx.fast.scaled_dot_product_attention(
                q, k, v, scale=self.scale, mask=mask, sinks=self.sinks
            )
        return add_residual(x, self.out(o.transpose(0, 2, 1, 3).reshape(B, T, -1)))

    def __call__(self, x, mask, cache, periods):
        offset = cache.offset if cache is not None else 0
        q, k, v = self.qkv_rope(x, offset, periods)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.attend(x, q, k, v, mask, cache)


@partial(mx.compile, shapeless=True)
def _swiglu_biased(gate, up, gate_bias, up_bias, alpha, limit):
    # gate_up's bias, then: clamp the gate from above only, the linear part on both sides,
    # and add 1 (docs/model.md §1.6). One kernel.
    dtype = gate.dtype
    gate = mx.minimum(gate + gate_bias.astype(dtype), limit)
    up = mx.clip(up + up_bias.astype(dtype), -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


def _swiglu(h, bias, alpha, limit):
    """h [..., 2I] (gate | up) and its bias [..., 2I]: the halves are views."""
    I = h.shape[-1] // 2
    return _swiglu_biased(h[..., :I], h[..., I:], bias[..., :I], bias[..., I:], alpha, limit)


@partial(mx.compile, shapeless=True)
def _down_bias(y, bias):
    return y.astype(mx.float32) + bias.astype(mx.float32)  # one kernel


@lru_cache(maxsize=64)
def _lhs_indices(n: int) -> mx.array:
    return mx.array(np.arange(n, dtype=np.uint32))  # materialised: no kernel


class Experts(nn.Module):
    """All experts of a layer: gate_up rows 0..I-1 gate, I..2I-1 up (de-interleaved by the
    converter), so ONE gather_qmm computes both; then down. Weights mxfp4; the two biases are
    one [E, 2I + H] table (`bias`: gate_up's then down's, joined at load), read by ONE gather.

    Kernels per token (decode): the bias gather, gate_up, swiglu with gate_up's bias, down,
    down's bias, and one addmm for the routing weights, the sum over the k experts and the
    residual add: x + w @ (y + b) (the down bias is inside each expert's output, so it is
    weighted too, docs/model.md §1.6)."""

    def __init__(self, config: ModelConfig, group_size=32, bits=4, mode="mxfp4"):
        super().__init__()
        H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
        q = dict(bias=False, group_size=group_size, bits=bits, mode=mode)
        self.gate_up = QuantizedSwitchLinear(H, 2 * I, E, **q)
        self.down = QuantizedSwitchLinear(I, H, E, **q)
        self.bias = mx.zeros((E, 2 * I + H))
        self.intermediate = I
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def _matmul(self, lin, x, idx, sort):
        # gather_qmm's default lhs indices (one per row of x's batch) are an arange it builds,
        # one more kernel, at every call: pass a constant instead.
        lhs = None
        if not sort:
            batch = x.shape[:-2]
            lhs = _lhs_indices(math.prod(batch)).reshape(batch)
        return mx.gather_qmm(
            x, lin["weight"], lin["scales"], None, lhs_indices=lhs, rhs_indices=idx,
            transpose=True, group_size=lin.group_size, bits=lin.bits, mode=lin.mode,
            sorted_indices=sort,
        )

    def __call__(self, t, x, indices, weights):
        """t [B, T, H] the normed input (experts' dtype), x [B, T, H] the residual (float32),
        indices/weights [B, T, k]: returns x + the weighted sum of the k experts."""
        I = self.intermediate
        bias = self.bias[indices]  # [B, T, k, 2I + H]
        h = mx.expand_dims(t, (-2, -3))
        # Many tokens: sort them by expert so each expert's weights are read once (as mlx-lm).
        if indices.size >= 64:
            h, idx, inv_order = _gather_sort(h, indices)
            h = self._matmul(self.gate_up, h, idx, True)
            h = _swiglu(h, self.bias[idx][:, None, : 2 * I], self.alpha, self.limit)
            y = _scatter_unsort(self._matmul(self.down, h, idx, True), inv_order, indices.shape)
        else:
            idx = indices
            h = self._matmul(self.gate_up, h, idx, False)
            h = _swiglu(h, bias[..., None, : 2 * I], self.alpha, self.limit)
            y = self._matmul(self.down, h, idx, False)
        y = _down_bias(y.squeeze(-2), bias[..., 2 * I :])  # [B, T, k, H] float32
        out = mx.addmm(x[..., None, :], weights[..., None, :].astype(mx.float32), y)
        return out.squeeze(-2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, **experts_quantization):
        super().__init__()
        self.k = config.experts_per_token
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # float32: the router's input
        self.router = nn.Linear(config.hidden_size, config.num_experts)
        self.experts = Experts(config, **experts_quantization)
        self.expert_dtype = mx.float32

    def __call__(self, x):
        t = self.norm(x)
        g = self.router(t)  # float32 (Precision)
        # top-k without a full sort; the order among the k does not matter for the sum.
        indices = mx.argpartition(g, kth=-self.k, axis=-1)[..., -self.k :]
        weights = mx.softmax(mx.take_along_axis(g, indices, axis=-1), axis=-1, precise=True)
        return self.experts(t.astype(self.expert_dtype), x, indices, weights)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, **experts_quantization):
        super().__init__()
        self.attention = Attention(config)
        self.mlp = MLP(config, **experts_quantization)

    def __call__(self, x, mask, cache, periods):
        return self.mlp(self.attention(x, mask, cache, periods))


class Model(nn.Module):
    def __init__(self, config: ModelConfig, dtype=mx.bfloat16, expert_dtype=None,
                 **experts_quantization):
        super().__init__()
        self.config = config
        self.precision = Precision.of(dtype, expert_dtype)
        self.dtype = dtype
        self.model_dir = None
        self.kv_bits = None  # KV cache format of make_cache(): None (model dtype), 8 or 4
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, **experts_quantization) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.unembedding = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The residual stream stays float32 (as in OpenAI's Metal reference): the attention
        # norm casts to the dense dtype for qkv; the MLP norm stays float32 for the router and
        # the experts take Precision.experts.
        for layer in self.layers:
            layer.attention.norm.dtype = dtype
            layer.mlp.expert_dtype = self.precision.experts
        # mx.fast.rope takes periods (1 / inv_freq) when base is None.
        self._periods = mx.array(1.0 / yarn(config).inv_freq)
        sliding = [config.is_sliding(i) for i in range(config.num_hidden_layers)]
        self._sliding = sliding
        # One representative cache of each kind builds the masks for all layers of that kind.
        self._first_sliding = sliding.index(True) if True in sliding else None
        self._first_full = sliding.index(False) if False in sliding else None
        self._decoder = None

    def decoder(self):
        """The compiled single-token step, built once and reused (oss_mlx.decode.Decoder):
        `cache = model.decoder().make_cache()`, `model.prefill(prompt, cache)`, then
        `logits = model.decoder()(tokens [B, 1], cache)` per token. The plain path
        (`model(tokens, cache)`) stays for batched decode and works on the same caches."""
        if self._decoder is None:
            from oss_mlx.model.decode import Decoder

            self._decoder = Decoder(self)
        return self._decoder

    def make_cache(self, kv_bits: int | None = None):
        """`kv_bits` 8 or 4 (default `self.kv_bits`): quantized caches on the full-attention
        layers (kv_quant); the sliding layers' 128 keys always stay in full precision."""
        W = self.config.sliding_window
        bits = kv_bits or self.kv_bits

        def full():
            return kv_quant.QuantizedKVCache(bits) if bits else KVCache()

        return [RotatingKVCache(max_size=W) if s else full() for s in self._sliding]

    def masks(self, x, cache):
        """(full-layer mask, sliding-layer mask) for the new tokens x [B, T, H], built BEFORE the
        caches are updated: "causal", None (one token, all cached keys visible) or a boolean
        array; a sliding-layer query sees the `sliding_window` keys ending at itself."""

        def mask(first, window):
            if first is None:
                return None
            return create_attention_mask(x, cache[first], window_size=window)

        return mask(self._first_full, None), mask(self._first_sliding, self.config.sliding_window)

    def hidden(self, tokens, cache=None, last_only: bool = False):
        """Residual stream after the last block (before the final norm): [B, T, H]; with
        `last_only`, [B, 1, H], and the last block's MLP runs on the last position only."""
        # The embedding stays in its stored dtype (an exact row lookup); only rows are cast.
        x = self.embedding(tokens).astype(mx.float32)
        if cache is None:
            cache = [None] * len(self.layers)
        full_mask, window_mask = self.masks(x, cache)
        last = len(self.layers) - 1
        for i, (layer, c, s) in enumerate(zip(self.layers, cache, self._sliding)):
            mask = window_mask if s else full_mask
            if last_only and i == last:
                # Every position still goes through attention (it fills the cache); past
                # that only the last one matters.
                x = layer.mlp(layer.attention(x, mask, c, self._periods)[:, -1:])
            else:
                x = layer(x, mask, c, self._periods)
        return x

    def __call__(self, tokens, cache=None):
        return self.unembedding(self.norm(self.hidden(tokens, cache)))

    def prefill(self, tokens, cache, chunk_size: int = PREFILL_CHUNK, logits: bool = True):
        """Feed a prompt [B, T] into `cache` in chunks (bounded masks and graphs) and return the
        logits of the last position only, [B, V]; with logits=False just fill the cache (skips
        the [H, V] unembedding) and return None."""
        if tokens.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        if cache is None:
            cache = self.make_cache()
        while tokens.shape[1] > chunk_size or (not logits and tokens.shape[1] > 0):
            self.hidden(tokens[:, :chunk_size], cache)
            mx.eval([c.state for c in cache])
            tokens = tokens[:, chunk_size:]
        if not logits:
            return None
        x = self.hidden(tokens, cache, last_only=True)
        return self.unembedding(self.norm(x))[:, 0]

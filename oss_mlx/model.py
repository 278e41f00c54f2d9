"""The gpt-oss forward pass in MLX (spec section 1), and loading a converted folder.

Reads top to bottom like the architecture: RMSNorm, Attention (fused qkv, YaRN RoPE, GQA with
learned sinks, sliding window on even layers), Experts/MLP (router, top-4, one fused gate_up
`gather_qmm` on the mxfp4 weights, clamped SwiGLU, down), Block, Model.

    model = load(path, dtype=None)      # converted folder or store name; dtype=default_dtype()
    model.config                        # ModelConfig
    model.model_dir                     # Path of the folder loaded
    model.dtype                         # dtype of the dense weights and matmul inputs
    logits = model(tokens, cache=None)  # [B, T] -> [B, T, V]
    cache = model.make_cache()          # RotatingKVCache(window) on sliding layers, KVCache else
    logits = model.prefill(tokens, cache, chunk_size=512)   # [B, V], last position only
    model.prefill(tokens, cache, logits=False)              # only fill the cache

Precision: norms (compute and weight), the router and the residual stream are float32 whatever
`dtype` is (cheap, and keeps a bf16 run close to float32); the embedding table stays in its
stored dtype and only the looked-up rows are cast. Everything else runs in `dtype`.
"""

from __future__ import annotations

import json
from functools import lru_cache, partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, _gather_sort, _scatter_unsort

from .config import ModelConfig
from .errors import OssMlxError
from .rope import yarn


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def default_dtype() -> mx.Dtype:
    """bfloat16, the checkpoint's dtype, on every backend. On the CPU backend float32 used to
    pay only through the mxfp4 expert matmuls, and those take float32 activations there anyway
    (see Model); with that, bf16 dense weights prefill and decode faster than float32 ones on
    the CPU too, in half the memory (benchmarks/results/cpu-20b-L2.txt)."""
    return mx.bfloat16


@lru_cache
def _rms_norm(dtype):
    # The reference normalises AND multiplies by the weight in float32, then casts (spec 1.3);
    # mx.fast.rms_norm on a bf16 input would cast before the multiply.
    @partial(mx.compile, shapeless=True)
    def norm(x, weight, eps):
        return mx.fast.rms_norm(x.astype(mx.float32), weight, eps).astype(dtype)

    return norm


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float, dtype=mx.float32):
        super().__init__()
        self.weight = mx.ones((dims,))  # kept in float32 whatever the model dtype
        self.eps = eps
        self.dtype = dtype  # of the output, i.e. of the matmuls that follow

    def __call__(self, x):
        return _rms_norm(self.dtype)(x, self.weight, self.eps)


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

    def __call__(self, x, mask, cache, periods):
        B, T, _ = x.shape
        D, n_q, n_kv = self.head_dim, self.n_q, self.n_kv
        qkv = self.qkv(self.norm(x)).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        # One rope call for q and k together (same positions, same frequencies).
        qk = mx.fast.rope(
            qkv[:, : n_q + n_kv], D, traditional=False, base=None, scale=1.0,
            offset=offset, freqs=periods,
        )
        q, k, v = qk[:, :n_q], qk[:, n_q:], qkv[:, n_q + n_kv :]
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.scale, mask=mask, sinks=self.sinks
        )
        return x + self.out(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


@partial(mx.compile, shapeless=True)
def _swiglu(gate, up, alpha, limit):
    # Clamp the gate from above only, the linear part on both sides, and add 1 (spec 1.6).
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


class Experts(nn.Module):
    """All experts of a layer: gate_up rows 0..I-1 gate, I..2I-1 up (de-interleaved by the
    converter), so ONE gather_qmm computes both; then down. Weights mxfp4, biases dense."""

    def __init__(self, config: ModelConfig, group_size=32, bits=4, mode="mxfp4"):
        super().__init__()
        H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
        q = dict(bias=True, group_size=group_size, bits=bits, mode=mode)
        self.gate_up = QuantizedSwitchLinear(H, 2 * I, E, **q)
        self.down = QuantizedSwitchLinear(I, H, E, **q)
        self.intermediate = I
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def __call__(self, x, indices, weights):
        x = mx.expand_dims(x, (-2, -3))
        # Many tokens: sort them by expert so each expert's weights are read once (as mlx-lm).
        sort = indices.size >= 64
        idx, inv_order = indices, None
        if sort:
            x, idx, inv_order = _gather_sort(x, indices)
        h = self.gate_up(x, idx, sorted_indices=sort)
        I = self.intermediate
        h = _swiglu(h[..., :I], h[..., I:], self.alpha, self.limit)
        y = self.down(h, idx, sorted_indices=sort)
        if sort:
            y = _scatter_unsort(y, inv_order, indices.shape)
        # The down bias is inside each expert's output, so it is weighted too (spec 1.6).
        return (y.squeeze(-2) * weights[..., None]).sum(axis=-2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, **experts_quantization):
        super().__init__()
        self.k = config.experts_per_token
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = nn.Linear(config.hidden_size, config.num_experts)
        self.experts = Experts(config, **experts_quantization)

    def __call__(self, x):
        t = self.norm(x)
        # Router in float32 (its weights are tiny): near-ties between experts resolve as in a
        # float32 run instead of flipping on bf16 rounding.
        g = self.router(t.astype(mx.float32))
        # top-k without a full sort; the order among the k does not matter for the sum.
        indices = mx.argpartition(g, kth=-self.k, axis=-1)[..., -self.k :]
        weights = mx.softmax(mx.take_along_axis(g, indices, axis=-1), axis=-1, precise=True)
        return x + self.experts(t, indices, weights)


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
        self.dtype = dtype
        self.model_dir = None
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, **experts_quantization) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.unembedding = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The residual stream stays float32 (as in OpenAI's Metal reference): each norm casts
        # its output to the model dtype for the matmuls that follow.
        for _, m in self.named_modules():
            if isinstance(m, RMSNorm):
                m.dtype = dtype
        # The experts' input dtype is free (their weights are the same 4-bit codes either way);
        # MLX's CPU backend runs mxfp4 matmuls with bf16 activations ~10x slower than with
        # float32 ones, so there the experts always get float32.
        if expert_dtype is None:
            expert_dtype = mx.float32 if _on_cpu() else dtype
        for layer in self.layers:
            layer.mlp.norm.dtype = expert_dtype
        # mx.fast.rope takes periods (1 / inv_freq) when base is None.
        self._periods = mx.array(1.0 / yarn(config).inv_freq)
        sliding = [config.is_sliding(i) for i in range(config.num_hidden_layers)]
        self._sliding = sliding
        # One representative cache of each kind builds the masks for all layers of that kind.
        self._first_sliding = sliding.index(True) if True in sliding else None
        self._first_full = sliding.index(False) if False in sliding else None

    def make_cache(self):
        W = self.config.sliding_window
        return [RotatingKVCache(max_size=W) if s else KVCache() for s in self._sliding]

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

    def prefill(self, tokens, cache, chunk_size: int = 512, logits: bool = True):
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


# ---- loading ------------------------------------------------------------------------------


def _resolve(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p  # load() checks that it is a converted folder
    from .store import resolve_model  # a store name, or a clear error saying how to get the model

    return Path(resolve_model(path))


def _dense_predicate(modules):
    """Module paths that the converter stored as affine-quantized (config 'dense')."""
    def predicate(path, module):
        parts = path.split(".")
        name = ".".join(parts[2:]) if parts[0] == "layers" else path
        return name in modules and isinstance(module, (nn.Linear, nn.Embedding))
    return predicate


def _cast(name, value, dtype):
    if not mx.issubdtype(value.dtype, mx.floating):
        return value  # packed weights and e8m0 scales
    if name.endswith("norm.weight") or ".router." in name:
        return value.astype(mx.float32)
    if name.startswith("embedding."):
        return value  # looked up, then cast row by row
    return value.astype(dtype)


def load(path, dtype=None, lazy: bool = False, expert_dtype=None, shard=None) -> Model:
    """Load a converted folder (see the converter) or a store name.

    `shard`: an `oss_mlx.shard.Sharding`: build and read only this rank's share of the model.

    `expert_dtype` is the dtype of the experts' activations: by default float32 on the CPU
    backend (much faster there) and `dtype` elsewhere.

    The safetensors are memory-mapped lazily by mx.load and become the parameters directly
    (no extra copy when `dtype` is the stored dtype). `lazy=False` evaluates them now, so the
    load time is paid here and not by the first token.
    """
    model_dir, sharding = _resolve(path), shard
    try:
        meta = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise OssMlxError(f"{model_dir}: no config.json (not a converted model folder)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise OssMlxError(f"{model_dir}/config.json: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "oss-mlx" or "model" not in meta:
        raise OssMlxError(f"{model_dir}: not an oss-mlx model folder (run `oss-mlx convert` first)")
    config = ModelConfig.from_dict(meta["model"])
    quant = meta.get("quantization") or {}
    experts_q = quant.get("experts") or {"mode": "mxfp4", "group_size": 32, "bits": 4}
    stored = getattr(mx, meta.get("dtype", "bfloat16"), None)
    if not isinstance(stored, mx.Dtype):
        raise OssMlxError(f"{model_dir}/config.json: unknown dtype {meta.get('dtype')!r}")
    if isinstance(dtype, str):  # "float32", "bfloat16", ... from a command line
        name, dtype = dtype, getattr(mx, dtype, None)
        if not isinstance(dtype, mx.Dtype) or not mx.issubdtype(dtype, mx.floating):
            raise OssMlxError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)")
    dtype = dtype or stored

    model = (sharding.model if sharding is not None else Model)(
        config, dtype=dtype, expert_dtype=expert_dtype, group_size=experts_q["group_size"],
        bits=experts_q["bits"], mode=experts_q["mode"],
    )
    dense = quant.get("dense")
    if dense:
        nn.quantize(
            model, dense["group_size"], dense["bits"], mode=dense.get("mode", "affine"),
            class_predicate=_dense_predicate(set(dense["modules"])),
        )

    shards = sorted(model_dir.glob("model*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise OssMlxError(f"{index}: unreadable ({e})") from None
        missing = sorted(n for n in names if not (model_dir / n).exists())
        if missing:
            raise OssMlxError(f"{model_dir}: missing weight file {missing[0]}")
        shards = [model_dir / n for n in sorted(names)]
    if not shards:
        raise OssMlxError(f"{model_dir}: no model*.safetensors files")
    weights = {}
    for shard in shards:
        try:
            weights.update((sharding.read if sharding is not None else mx.load)(str(shard)))
        except (RuntimeError, ValueError, OSError) as e:
            raise OssMlxError(f"{shard}: unreadable safetensors file ({e})") from None
    weights = [(k, _cast(k, v, dtype)) for k, v in weights.items()]
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise OssMlxError(f"{model_dir}: weights do not match the config ({e})") from None
    del weights
    if sharding is not None:
        sharding.finish(model)
    if not lazy:
        try:
            mx.eval(model.parameters())
        except (RuntimeError, ValueError) as e:
            raise OssMlxError(f"{model_dir}: cannot read the weights ({e})") from None
    model.eval()
    model.model_dir = model_dir
    return model

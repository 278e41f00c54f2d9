"""One compiled decode step: the whole single-token forward as ONE `mx.compile`d function.

    decoder = model.decoder()             # built once per model, reused for every token
    cache = decoder.make_cache()          # FixedKVCache on full layers, RingKVCache on sliding
    model.prefill(prompt, cache)          # the plain path fills these caches as any other
    logits = decoder(tokens, cache)       # tokens [B, 1] -> logits [B, V]; caches advanced

Inside the compiled function: the embedding, every layer (norms, qkv, RoPE at a dynamic
position, the KV write at a dynamic offset with `mx.slice_update`, attention with sinks over the
whole buffer under a mask derived from the offset, router, top-k, experts), the final norm and
the unembedding. Python builds no graph per token: it looks the trace up and replays it.

The caches keep the mlx-lm cache interface (`keys`, `values`, `offset`, `state`, `meta_state`,
`update_and_fetch`, `make_mask`, `is_trimmable`/`trim`, `copy`), so prefill, prompt-cache
copies and trims, and the plain (uncompiled, batched) path all work on them:

- FixedKVCache (full-attention layers) is mlx-lm's KVCache whose buffer grows by a sixteenth of
  its size (at least 256 positions, `growth`) instead of 256: the compiled step is traced again
  only when a buffer grows (every 256 tokens up to 4k, about 30 times from 4k to 32k), and reads
  at most ~6% of unused positions (masked).
- RingKVCache (sliding layers): exactly `window` positions, position p in slot p % window, so a
  decode step writes at a dynamic slot and never moves data. Slot order does not matter to
  attention (RoPE was applied before caching and softmax is order-free); the mask hides slots
  not yet written.

For a prompt-cache adapter (engine): FixedKVCache is a KVCache (state (keys, values, offset),
always trimmable); RingKVCache's state is (keys, values) in slot order with meta_state
(window, offset), trimmable only while offset < window (after that, rewinding needs a saved
`copy()`, as with RotatingKVCache); `copy()` on both shares the (immutable) arrays. mlx-lm's
load_prompt_cache finds classes by name in mlx_lm.models.cache, so persisted caches need these
two names mapped to this module. The step needs every cache at one offset (a batch whose rows
have equal lengths); ragged batches keep the plain path, `model(tokens, cache)`.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, _BaseCache

MIN_GROWTH = 256
GROWTH_DIVISOR = 16  # a buffer grows by 1/16 of its size (at least MIN_GROWTH positions)


def growth(capacity: int, n: int = 1) -> int:
    """How many positions a full layer's buffer grows by. The compiled step attends over the
    whole buffer (masked), so unused positions cost attention time; each growth costs a trace
    (~0.2 s on a CPU). A sixteenth wastes at most ~6% (on average ~3%) and traces every 256
    tokens up to 4k, every 2k at 32k. (A quarter wasted up to 25%: at 4k-32k contexts the
    compiled step was slower than the plain path on a CPU.)"""
    return max(MIN_GROWTH, capacity // GROWTH_DIVISOR, n)


class FixedKVCache(KVCache):
    """A full layer's keys/values: [B, n_kv, capacity, D] buffers, positions 0..offset-1."""

    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys, values):
        self.step = growth(self.capacity())
        return super().update_and_fetch(keys, values)

    def reserve(self, like_k, like_v, n: int = 1) -> None:
        """Room for n more positions (the compiled step writes without growing)."""
        if self.offset + n <= self.capacity():
            return
        B, H, _, D = like_k.shape
        grow = growth(self.capacity(), n)
        new_k = mx.zeros((B, H, grow, D), like_k.dtype)
        new_v = mx.zeros((B, H, grow, like_v.shape[3]), like_v.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)

    def copy(self) -> "FixedKVCache":
        c = FixedKVCache()
        c.keys, c.values, c.offset = self.keys, self.values, self.offset  # arrays are immutable
        return c


class RingKVCache(_BaseCache):
    """A sliding layer's keys/values: [B, n_kv, window, D], position p in slot p % window."""

    def __init__(self, window: int):
        self.window = window
        self.keys = None
        self.values = None
        self.offset = 0

    def _ordered(self, a, n: int):
        """The last n cached positions (n < window) in order."""
        W, s = self.window, self.offset % self.window
        if self.offset > W:
            a = mx.concatenate([a[..., s:, :], a[..., :s, :]], axis=2)  # positions offset-W..
            return a[..., W - n :, :]
        return a[..., self.offset - n : self.offset, :]

    def _store(self, k_all, v_all, first: int):
        """Keep the last `window` of positions first.. (k_all [B, H, n, D]) in their slots."""
        W, n = self.window, k_all.shape[2]
        if n >= W:
            k, v = k_all[..., n - W :, :], v_all[..., n - W :, :]
            shift = (first + n - W) % W
            self.keys, self.values = mx.roll(k, shift, axis=2), mx.roll(v, shift, axis=2)
            return
        if self.keys is None:
            B, H, _, D = k_all.shape
            self.keys = mx.zeros((B, H, W, D), k_all.dtype)
            self.values = mx.zeros((B, H, W, v_all.shape[3]), v_all.dtype)
        # n < W positions ending before W: slots first..first+n-1 (no wrap, first + n <= W)
        self.keys[..., first : first + n, :] = k_all
        self.values[..., first : first + n, :] = v_all

    def update_and_fetch(self, keys, values):
        """The plain path: returns the keys/values the new queries attend over (the make_mask
        mask picks each query's window): for one token the whole filled ring, for more the
        previous window - 1 positions and the new ones, in order."""
        T, W = keys.shape[2], self.window
        if T == 1 and self.keys is not None:
            slot = self.offset % W
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset += 1
            n = min(self.offset, W)
            return self.keys[..., :n, :], self.values[..., :n, :]
        n_prev = min(self.offset, W - 1)
        if n_prev:
            keys = mx.concatenate([self._ordered(self.keys, n_prev), keys], axis=2)
            values = mx.concatenate([self._ordered(self.values, n_prev), values], axis=2)
        first = self.offset - n_prev
        if self.offset + T <= W:
            self._store(keys[..., n_prev:, :], values[..., n_prev:, :], self.offset)
        else:
            self._store(keys, values, first)
        self.offset += T
        return keys, values

    def reserve(self, like_k, like_v, n: int = 1) -> None:
        if self.keys is None:
            B, H, _, D = like_k.shape
            self.keys = mx.zeros((B, H, self.window, D), like_k.dtype)
            self.values = mx.zeros((B, H, self.window, like_v.shape[3]), like_v.dtype)

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        if N == 1:
            return None
        n_prev = min(self.offset, self.window - 1)
        if n_prev + N <= self.window and not return_array:
            return "causal"
        return create_causal_mask(N, n_prev, window_size=self.window)

    def size(self):
        return min(self.offset, self.window)

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.window, self.offset)))

    @meta_state.setter
    def meta_state(self, v):
        self.window, self.offset = map(int, v)

    def is_trimmable(self):
        return self.offset < self.window  # nothing was overwritten yet

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def copy(self) -> "RingKVCache":
        c = RingKVCache(self.window)
        c.keys, c.values, c.offset = self.keys, self.values, self.offset
        return c


class Decoder:
    """The compiled single-token step of one model (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        # Not shapeless: traced once per set of buffer shapes, i.e. again only when a
        # FixedKVCache grows.
        self._step = mx.compile(self._forward)
        self.traces = 0  # how many times the step was traced (Python runs _forward only then)

    def make_cache(self) -> list:
        m = self.model
        return [RingKVCache(m.config.sliding_window) if s else FixedKVCache() for s in m._sliding]

    def __call__(self, tokens, cache) -> mx.array:
        """tokens [B, 1] -> logits [B, V] of that position; every cache advances by one."""
        cache = cache[: len(self.model.layers)]
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:
            raise ValueError(f"caches at different offsets {sorted(offsets)}")
        (offset,) = offsets
        like = self._like(tokens.shape[0])
        for c in cache:
            c.reserve(*like)
        kv = [(c.keys, c.values) for c in cache]
        for c in cache:  # the step's outputs replace the buffers: let MLX update them in place
            c.keys = c.values = None
        logits, new_kv = self._step(tokens, mx.array(offset, dtype=mx.int32), kv)
        del kv
        for c, (k, v) in zip(cache, new_kv):
            c.keys, c.values = k, v
            c.offset += 1
        return logits

    def _like(self, B: int):
        a = self.model.layers[0].attention
        dt = self.model.precision.dense
        z = mx.zeros((B, a.n_kv, 0, a.head_dim), dt)
        return z, z

    def _forward(self, tokens, offset, kv):
        self.traces += 1
        m = self.model
        x = m.embedding(tokens).astype(mx.float32)
        pos = offset.reshape(1)
        masks, new_kv = {}, []
        for layer, (k_buf, v_buf), sliding in zip(m.layers, kv, m._sliding):
            C = k_buf.shape[2]
            if C not in masks:  # slots 0..offset written (a ring of C: all, once offset >= C)
                masks[C] = (mx.arange(C) <= offset).reshape(1, 1, 1, C)
            slot = pos % C if sliding else pos
            att = layer.attention
            q, k, v = att.qkv_rope(x, offset, m._periods)
            k_buf = mx.slice_update(k_buf, k, slot, axes=(2,))
            v_buf = mx.slice_update(v_buf, v, slot, axes=(2,))
            x = layer.mlp(att.attend(x, q, k_buf, v_buf, masks[C]))
            new_kv.append((k_buf, v_buf))
        return m.unembedding(m.norm(x)).squeeze(1), new_kv  # (x[:, -1] would be a gather)

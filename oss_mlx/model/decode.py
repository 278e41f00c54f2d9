"""One compiled decode step: the whole single-token forward as ONE `mx.compile`d function, and
the caches it decodes into (docs/engine.md, "The compiled decode step").

    decoder = model.decoder()             # built once per model, reused for every token
    cache = decoder.make_cache()          # FixedKVCache on full layers, RingKVCache on sliding
    model.prefill(prompt, cache)          # the plain path fills these caches as any other
    logits = decoder(tokens, cache)       # tokens [B, 1] -> logits [B, V]; caches advanced

The engine keeps mlx-lm's caches everywhere else and converts at the seam, sharing the arrays:

    decoder.presize(cache, len(prompt) + 1)   # before prefill: full layers' buffers on the grid
    cache[:] = to_decoder(cache)              # before the first step
    cache[:] = to_mlx_lm(cache)               # for each snapshot, and before the cache goes back
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache, _BaseCache

MIN_GROWTH = 256
# Each capacity past 4096 is a sixteenth more than the last. The compiled step attends over the
# whole buffer (masked), so unused positions cost attention time, and each new capacity costs a
# trace (~0.2 s on a CPU): a sixteenth wastes at most ~6% (a quarter wasted up to 25%, and on a
# CPU the compiled step was then slower than the plain path at 4k-32k contexts).
GROWTH_DIVISOR = 16


def capacity_for(n: int, limit: int | None = None) -> int:
    """The smallest FixedKVCache capacity on the growth grid that holds n positions: 256, 512,
    ..., 4096, 4352, 4624, ... (each the last plus a sixteenth of it, at least 256), so every
    buffer any request ever decodes into has one of ~70 shapes up to 128k: the compiled
    step is traced at most once per shape, whatever the prompts' lengths. Never past `limit`
    (the context, one more shape) for n within it: what the memory plan counts."""
    c = MIN_GROWTH
    while c < n:
        c += max(MIN_GROWTH, c // GROWTH_DIVISOR)
    return c if limit is None or n > limit else min(c, limit)


class FixedKVCache(KVCache):
    """A full layer's keys/values: [B, n_kv, capacity, D] buffers, positions 0..offset-1,
    capacity on the `capacity_for` grid (never past `limit`, the context, when set)."""

    limit: int | None = None

    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys, values):
        self.reserve(keys, values, keys.shape[2])
        prev = self.offset
        self.offset += keys.shape[2]
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def reserve(self, like_k, like_v, n: int = 1) -> None:
        """Room for n more positions (the compiled step writes without growing)."""
        if self.offset + n <= self.capacity():
            return
        B, H, _, D = like_k.shape
        grow = capacity_for(self.offset + n, self.limit) - self.offset
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
        c.limit = self.limit
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


# ---- the seam: mlx-lm's caches (prompt cache, batcher, plain path) <-> the decoder's -------


def to_decoder(cache: list, limit: int | None = None) -> list:
    """The decoder's caches holding what mlx-lm's `cache` holds, layer by layer: KVCache ->
    FixedKVCache (the same arrays when on the capacity grid, see Decoder.presize),
    RotatingKVCache -> RingKVCache; caches of the decoder's own kinds pass through. `limit`: the
    context (the FixedKVCaches never grow past it). The inverse is `to_mlx_lm`."""
    return [c if isinstance(c, (FixedKVCache, RingKVCache))
            else _to_ring(c) if isinstance(c, RotatingKVCache) else _to_fixed(c, limit)
            for c in cache]


def to_mlx_lm(cache: list) -> list:
    """mlx-lm's caches holding what the decoder's `cache` holds (FixedKVCache -> KVCache,
    RingKVCache -> RotatingKVCache, sharing the arrays), in the layout mlx-lm's own
    single-token writes leave, so its update_and_fetch / trim / _temporal_order and the prompt
    cache's copies, snapshots and files work on them; other caches pass through."""
    return [_from_ring(c) if isinstance(c, RingKVCache)
            else _from_fixed(c) if isinstance(c, FixedKVCache) else c for c in cache]


def _to_fixed(c, limit: int | None = None) -> FixedKVCache:
    if type(c) is not KVCache:
        raise TypeError(f"the compiled step has no cache for a {type(c).__name__}")
    f = FixedKVCache()
    f.offset, f.limit = c.offset, limit
    if c.keys is None:
        return f
    cap = c.keys.shape[2]
    if cap in (capacity_for(cap), limit):  # on the grid: share (a full one grows at the next step)
        f.keys, f.values = c.keys, c.values
        return f
    # mlx-lm grows in steps of 256 from wherever a chunk ended: move the buffer onto the grid
    # (one copy, once per request) so the step sees a shape it was traced for.
    B, H, _, D = c.keys.shape
    pad = capacity_for(c.offset + 1, limit) - c.offset
    zeros = lambda a: mx.zeros((B, H, pad, a.shape[3]), a.dtype)  # noqa: E731
    f.keys = mx.concatenate([c.keys[..., : c.offset, :], zeros(c.keys)], axis=2)
    f.values = mx.concatenate([c.values[..., : c.offset, :], zeros(c.values)], axis=2)
    return f


def _from_fixed(f: FixedKVCache):
    c = KVCache()
    c.keys, c.values, c.offset = f.keys, f.values, f.offset  # capacity >= offset, as KVCache's
    return c


def _ring_aligned(r) -> bool:
    """Whether a RotatingKVCache's buffer already is a ring: `window` slots, position p in slot
    p % window. mlx-lm's slot j holds the position p = j + (offset - _idx) (mod window), the
    last `window` ones (or 0..offset-1 in slots 0..offset-1 before it is full)."""
    W = r.max_size
    return r.keys.shape[2] == W and r._idx % W == r.offset % W


def _to_ring(r) -> RingKVCache:
    if type(r) is not RotatingKVCache or r.keep:
        raise TypeError(f"the compiled step has no cache for a {type(r).__name__} "
                        f"keeping {getattr(r, 'keep', '?')} first positions")
    W = r.max_size
    g = RingKVCache(W)
    g.offset = r.offset
    if r.keys is None or r.offset == 0:
        return g
    if _ring_aligned(r):  # e.g. what _from_ring made: share
        g.keys, g.values = r.keys, r.values
        return g

    def ring(a):
        t = r._temporal_order(a)  # positions offset - n .. offset - 1 (n may exceed W)
        m = min(t.shape[2], W)
        t = t[..., t.shape[2] - m :, :]
        if m < W:  # not full: slots m.. stay unwritten (the step's mask hides them)
            t = mx.concatenate([mx.zeros(t.shape[:2] + (W - m, t.shape[3]), t.dtype), t], axis=2)
        # t[i] is position offset - W + i, which belongs in slot (offset + i) % W
        return mx.roll(t, r.offset % W, axis=2)

    g.keys, g.values = ring(r.keys), ring(r.values)
    return g


def _from_ring(g: RingKVCache):
    r = RotatingKVCache(max_size=g.window)
    r.offset = g.offset
    if g.keys is None or g.offset == 0:
        return r
    r.keys, r.values = g.keys, g.values
    # Slot order, write index past the newest position: offset before the ring is full (slots
    # 0..offset-1, the rest unwritten, as mlx-lm's in-place writes leave it), else offset %
    # window, written as `window` when that is 0 (mlx-lm rotates to slot 0 before its next
    # write; a write index of 0 would break undoing the last token, `_idx -= 1`).
    r._idx = (g.offset - 1) % g.window + 1
    return r


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
        cache = [RingKVCache(m.config.sliding_window) if s else FixedKVCache() for s in m._sliding]
        for c in cache:
            if isinstance(c, FixedKVCache):
                c.limit = self.context
        return cache

    @property
    def context(self) -> int:
        """The longest context (memory.apply's --max-context, else the model's)."""
        m = self.model
        return int(getattr(m, "max_context", None) or m.config.max_context)

    def presize(self, cache: list, n: int) -> None:
        """Grow the KVCache layers of mlx-lm's `cache` (B=1) in one step to the grid capacity for
        n positions, so that a prefill of up to n positions never grows them (mlx-lm grows by
        256 from wherever a chunk ended, copying the whole buffer each time) and `to_decoder`
        then shares them. Buffers already that large stay as they are."""
        want = capacity_for(n, self.context)
        for c in cache:
            if type(c) is not KVCache or (c.keys is not None and c.keys.shape[2] >= want):
                continue
            f = FixedKVCache()
            f.keys, f.values, f.offset, f.limit = c.keys, c.values, c.offset, self.context
            f.reserve(*self._like(1), n=want - c.offset)
            c.keys, c.values = f.keys, f.values

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
        logits, new_kv = self.rows(tokens, [offset] * tokens.shape[0], kv)
        del kv
        for c, (k, v) in zip(cache, new_kv):
            c.keys, c.values = k, v
            c.offset += 1
        return logits

    def rows(self, tokens, offsets: list[int], kv: list) -> tuple[mx.array, list]:
        """The step for B rows at their own positions: tokens [B, 1], row b's token written at
        position offsets[b]; kv: per layer (keys, values) buffers [B, n_kv, C, D], a full
        layer's C on the grid (positions 0..C-1) and past every offset, a sliding layer's the
        window (position p in slot p % window). Returns (logits [B, V], the new buffers); the
        caller drops its references to `kv` first, so MLX writes them in place. Traced once
        per (B, buffer shapes)."""
        return self._step(tokens, mx.array(offsets, dtype=mx.int32), kv)

    def _like(self, B: int):
        a = self.model.layers[0].attention
        dt = self.model.precision.dense
        z = mx.zeros((B, a.n_kv, 0, a.head_dim), dt)
        return z, z

    def _forward(self, tokens, offsets, kv):
        self.traces += 1
        m = self.model
        B = tokens.shape[0]
        x = m.embedding(tokens).astype(mx.float32)
        # One row: a scalar position for RoPE and one dynamic slice write (the single stream's
        # kernels); several: RoPE at a vector of positions and one scatter per buffer.
        rope_at = offsets.reshape(()) if B == 1 else offsets
        masks, new_kv = {}, []
        for layer, (k_buf, v_buf), sliding in zip(m.layers, kv, m._sliding):
            C = k_buf.shape[2]
            if C not in masks:  # slots 0..offset written (a ring of C: all, once offset >= C)
                # Additive, in the keys' dtype: on the CPU backend attention under a boolean
                # mask ran ~15% slower than under the same mask added (32k keys).
                open_ = mx.arange(C).reshape(1, 1, 1, C) <= offsets.reshape(B, 1, 1, 1)
                masks[C] = mx.where(open_, 0.0, -mx.inf).astype(k_buf.dtype)
            slot = offsets % C if sliding else offsets
            att = layer.attention
            q, k, v = att.qkv_rope(x, rope_at, m._periods)
            k_buf, v_buf = _write(k_buf, k, slot), _write(v_buf, v, slot)
            x = layer.mlp(att.attend(x, q, k_buf, v_buf, masks[C]))
            new_kv.append((k_buf, v_buf))
        return m.unembedding(m.norm(x)).squeeze(1), new_kv  # (x[:, -1] would be a gather)


def _write(buf, new, slots):
    """buf [B, H, C, D] with row b's new [b, H, 1, D] at position slots[b]."""
    if buf.shape[0] == 1:
        return mx.slice_update(buf, new, slots, axes=(2,))
    idx = mx.broadcast_to(slots.reshape(-1, 1, 1, 1), new.shape)
    return mx.put_along_axis(buf, idx, new, axis=2)

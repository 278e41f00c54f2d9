"""Everything that knows mlx-lm's KV cache internals: copying, cutting back, measuring and
(de)serialising one layer's cache. The prompt cache and its disk format go through it; a new
cache type needs only a new case here."""

from __future__ import annotations


class KVAdapter:
    """Copy, cut back, measure and (de)serialise one layer's mlx-lm KV cache."""

    @staticmethod
    def is_rotating(c) -> bool:
        from mlx_lm.models.cache import RotatingKVCache

        return isinstance(c, RotatingKVCache)

    @staticmethod
    def copy(c):
        """A copy whose arrays are new array objects over the same buffers (`v[...]`, no data
        copied): MLX slice assignment, used by the caches' writes, rebinds the array object it
        is applied to and copies a buffer that another array shares, so the original stays
        untouched and the data is copied only when, and if, the copy is written."""
        import mlx.core as mx

        def fresh(v):  # a quantized cache (kv_quant) holds (packed, scales, biases) tuples
            if isinstance(v, mx.array):
                return v[...]
            if isinstance(v, tuple) and v and all(isinstance(x, mx.array) for x in v):
                return tuple(x[...] for x in v)
            return v

        new = object.__new__(type(c))
        new.__dict__ = {k: fresh(v) for k, v in c.__dict__.items()}
        return new

    @staticmethod
    def offset(c) -> int:
        """The number of tokens this layer has seen."""
        return int(c.offset)

    @staticmethod
    def can_trim(c, n: int) -> bool:
        return n == 0 or c.is_trimmable()

    @staticmethod
    def trim(c, n: int):
        if n:
            c.trim(n)

    def undo_last_token(self, c):
        """Forget the last token fed one at a time (the stop token the pipeline already fed).

        A wrapped rotating cache is not trimmable in general, but right after a single-token
        write the slot it overwrote held the token that just left the window, which no later
        query sees; so moving the write index and offset back one is exact (the next
        single-token write reuses the slot; a multi-token update treats the slot as the oldest
        entry and drops it).
        """
        if c.is_trimmable():
            c.trim(1)
        elif self.is_rotating(c):
            c.offset -= 1
            c._idx -= 1
        else:  # pragma: no cover - a cache type we do not know how to roll back
            raise RuntimeError(f"cannot roll back a {type(c).__name__}")

    def holds_all(self, c) -> bool:
        """Whether a rotating layer still holds every token it saw, in order (true after a
        first multi-token write into an empty cache, which keeps all of it): then its state
        after any shorter prefix is a slice of it (`cut`)."""
        return (self.is_rotating(c) and c.keys is not None
                and c.keys.shape[2] == c.offset == c._idx)

    def compact(self, c):
        """A copy of a layer keeping only what later writes and queries use: a wrapped rotating
        cache just written with several tokens holds `max_size - 1 + S` of them in temporal
        order, and the next write keeps only the last `max_size - 1` anyway; holding the last
        `max_size` (in order, write index at the end) behaves the same for every later write."""
        new = self.copy(c)
        if (self.is_rotating(c) and c.keys is not None and c.keep == 0
                and not self.holds_all(c) and c.keys.shape[2] > c.max_size
                and c._idx == c.keys.shape[2]):
            new.keys, new.values = c.keys[..., -c.max_size:, :], c.values[..., -c.max_size:, :]
            new._idx = c.max_size
        return new

    def cut(self, c, n: int):
        """A copy of a `holds_all` rotating layer as it was after its first n tokens (what one
        write of those n tokens into an empty cache leaves)."""
        new = self.copy(c)
        new.keys, new.values = c.keys[..., :n, :], c.values[..., :n, :]
        new.offset = new._idx = n
        return new

    def extend(self, whole, c, n: int):
        """A `holds_all` copy of a rotating layer: `whole` (one, holding positions 0..k-1)
        followed by the n positions the last write added to `c`, the same layer after one more
        multi-token write of those n (mlx-lm keeps a write's tokens last, in order)."""
        import mlx.core as mx

        new = self.copy(whole)
        new.keys = mx.concatenate([whole.keys, c.keys[..., c._idx - n : c._idx, :]], axis=2)
        new.values = mx.concatenate([whole.values, c.values[..., c._idx - n : c._idx, :]],
                                    axis=2)
        new.offset = new._idx = whole.offset + n
        return new

    @staticmethod
    def arrays(c) -> list:
        import mlx.core as mx

        out = []
        for v in c.__dict__.values():
            out += [x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, mx.array)]
        return out

    @staticmethod
    def nbytes(c) -> int:
        import mlx.core as mx

        return sum(v.nbytes for v in c.__dict__.values() if isinstance(v, mx.array))

    def to_state(self, c) -> tuple[dict, dict]:
        """(arrays, meta) to write a layer to disk; `from_state` reads them back."""
        if c.keys is None:
            return {}, {"kind": self._kind(c), "offset": 0}
        if self.is_rotating(c):
            meta = {"kind": "rotating", "offset": c.offset, "keep": c.keep,
                    "max_size": c.max_size, "idx": c._idx}
            return {"keys": c.keys, "values": c.values}, meta
        n = c.offset  # a KVCache's arrays are allocated in steps; keep what is used
        return {"keys": c.keys[..., :n, :], "values": c.values[..., :n, :]}, {"kind": "kv",
                                                                             "offset": n}

    def _kind(self, c) -> str:
        return "rotating" if self.is_rotating(c) else "kv"

    @staticmethod
    def from_state(arrays: dict, meta: dict, like):
        """A layer cache from `to_state`'s output; `like` is a fresh cache of the wanted kind."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        kind = meta["kind"]
        if kind != ("rotating" if isinstance(like, RotatingKVCache) else "kv"):
            raise ValueError(f"layer kind {kind!r} does not match the model's cache")
        if kind == "rotating":
            c = RotatingKVCache(max_size=int(meta.get("max_size", like.max_size)))
            if arrays:
                c.keys, c.values = arrays["keys"], arrays["values"]
                c.offset, c.keep, c._idx = int(meta["offset"]), int(meta["keep"]), int(meta["idx"])
            if c.max_size != like.max_size:
                raise ValueError("sliding window size differs from the model's")
            return c
        c = KVCache()
        if arrays:
            c.keys, c.values, c.offset = arrays["keys"], arrays["values"], int(meta["offset"])
        return c



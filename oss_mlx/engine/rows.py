"""Where the decoding rows of the loop (engine/loop.py) keep their KV caches between steps: one
store per loop, for the model's compiled step or for its plain forward.

    store = DecoderRows(model.decoder(), context)    # or PlainRows(model)
    store.join(cache)               # a row's B=1 mlx-lm caches (prompt prefilled), appended
    logits = store.forward(y)       # y [B]: one token per row -> logits [B, V]; all advance
    cache = store.extract(i)        # row i as B=1 mlx-lm caches (for the prompt cache)
    store.keep([0, 2])              # only these rows go on, in this order
    layers = store.sliding(i)       # row i's sliding layers as mlx-lm caches (for a snapshot)

DecoderRows holds per layer one buffer for all rows: a full layer's [B, n_kv, C, D] with C on the
capacity grid (model/decode.py) and past every row's length, a sliding layer's ring [B, n_kv,
window, D], and each row's own length: rows at different lengths decode in one compiled step
(`Decoder.rows`), traced once per (B, C). Nothing is padded on the left and nothing moves
when a row joins or leaves but the rows themselves (one copy each). One row alone shares its
buffers with the caches it came from, so a single stream is the compiled step as it always was.

PlainRows runs the plain forward: one row on its own caches (any kind: quantized, sharded,
a stand-in model's), several merged into mlx-lm's BatchKVCache / BatchRotatingKVCache (left
padded), when every layer's cache can merge (the quantized ones of --kv-bits cannot: `can_join`
is then false while a row decodes, and rows take turns).
"""

from __future__ import annotations

import mlx.core as mx

from oss_mlx.model.decode import capacity_for, to_decoder, to_mlx_lm


def _take(a, i: int):
    """Row i of a [B, ...] buffer as its own [1, ...] array (a copy, so the batch's buffer is
    not kept alive by it)."""
    return mx.take(a, mx.array([i]), axis=0)


class DecoderRows:
    """The rows of the compiled step (see the module docstring)."""

    compiled = True

    def __init__(self, decoder, context: int):
        self.decoder = decoder
        self.context = context
        self.sliding = list(decoder.model._sliding)
        self.kv = None  # per layer [keys, values], all rows
        self.offsets: list[int] = []

    def __len__(self) -> int:
        return len(self.offsets)

    def can_join(self, cache) -> bool:
        return True

    @property
    def capacity(self) -> int:
        full = [k.shape[2] for (k, _), s in zip(self.kv or [], self.sliding) if not s]
        return full[0] if full else 0

    def join(self, cache: list):
        """Append a row: `cache` (mlx-lm's, B=1) is emptied, its arrays move here."""
        layers = to_decoder(cache, self.context)
        like = self.decoder._like(1)
        for c in layers:
            c.reserve(*like)
        kv = [[c.keys, c.values] for c in layers]
        cache[:] = []  # no other reference: the step writes the buffers in place
        if self.kv is None:
            self.kv, self.offsets = kv, [layers[0].offset]
            return
        self.offsets.append(layers[0].offset)
        cap = max(self.capacity, *(k.shape[2] for (k, _), s in zip(kv, self.sliding) if not s))
        self._grow(cap)
        for mine, theirs, s in zip(self.kv, kv, self.sliding):
            for j in (0, 1):
                a = theirs[j] if s else _pad(theirs[j], cap)
                mine[j] = mx.concatenate([mine[j], a], axis=0)

    def _grow(self, cap: int):
        """Every full layer's buffers to capacity `cap` (a grid value)."""
        for pair, s in zip(self.kv, self.sliding):
            if not s and pair[0].shape[2] < cap:
                pair[0], pair[1] = _pad(pair[0], cap), _pad(pair[1], cap)

    def forward(self, y) -> mx.array:
        need = max(self.offsets) + 1
        if need > self.capacity:
            self._grow(capacity_for(need, self.context))
        kv, self.kv = self.kv, None
        logits, new_kv = self.decoder.rows(y[:, None], self.offsets, kv)
        del kv
        self.kv = [list(p) for p in new_kv]
        self.offsets = [o + 1 for o in self.offsets]
        return logits

    def _row_layers(self, i: int) -> list:
        """Row i as the decoder's caches (B=1); a lone row's are the buffers themselves."""
        from oss_mlx.model.decode import FixedKVCache, RingKVCache

        alone = len(self.offsets) == 1
        out = []
        for (k, v), s in zip(self.kv, self.sliding):
            c = RingKVCache(k.shape[2]) if s else FixedKVCache()
            if not s:
                c.limit = self.context
            c.keys, c.values = (k, v) if alone else (_take(k, i), _take(v, i))
            c.offset = self.offsets[i]
            out.append(c)
        return out

    def extract(self, i: int) -> list:
        return to_mlx_lm(self._row_layers(i))

    def sliding_layers(self, i: int) -> list:
        """Row i's layers for a snapshot: the sliding ones as mlx-lm's rotating caches (the
        full ones are not read by a snapshot: None)."""
        from oss_mlx.model.decode import RingKVCache

        out = []
        for (k, v), s in zip(self.kv, self.sliding):
            if not s:
                out.append(None)
                continue
            g = RingKVCache(k.shape[2])
            g.keys, g.values = (k, v) if len(self.offsets) == 1 else (_take(k, i), _take(v, i))
            g.offset = self.offsets[i]
            out.append(to_mlx_lm([g])[0])
        return out

    def keep(self, rows: list[int]):
        if not rows:
            self.kv, self.offsets = None, []
            return
        idx = mx.array(rows)
        self.kv = [[k[idx], v[idx]] for k, v in self.kv]
        self.offsets = [self.offsets[i] for i in rows]


def _pad(a, cap: int):
    """a [B, H, n, D] with zeros up to n = cap along the positions."""
    n = a.shape[2]
    if n >= cap:
        return a
    return mx.concatenate([a, mx.zeros(a.shape[:2] + (cap - n, a.shape[3]), a.dtype)], axis=2)


def _mergeable(cache) -> bool:
    return all(hasattr(type(c), "merge") for c in cache)


class PlainRows:
    """The rows of the plain forward (see the module docstring)."""

    compiled = False

    def __init__(self, model):
        self.model = model
        self.caches = None  # one row: its own caches; several: mlx-lm's batch caches
        self.merged = False
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def can_join(self, cache) -> bool:
        return self.n == 0 or (_mergeable(cache) and (self.merged or _mergeable(self.caches)))

    def join(self, cache: list):
        if self.n == 0:
            self.caches, self.merged, self.n = list(cache), False, 1
            return
        if not self.merged:
            self.caches = [type(c).merge([c]) for c in self.caches]
            self.merged = True
        for batch, c in zip(self.caches, cache):
            batch.extend(type(c).merge([c]))
        self.n += 1

    def forward(self, y) -> mx.array:
        return self.model(y[:, None], cache=self.caches)[:, -1, :]

    def extract(self, i: int) -> list:
        return [c.extract(i) for c in self.caches] if self.merged else list(self.caches)

    def sliding_layers(self, i: int) -> list:
        from mlx_lm.models.cache import BatchRotatingKVCache

        if not self.merged:
            return list(self.caches)
        return [c.extract(i) if isinstance(c, BatchRotatingKVCache) else None
                for c in self.caches]

    def keep(self, rows: list[int]):
        self.n = len(rows)
        if not rows:
            self.caches, self.merged = None, False
        elif self.merged:
            for c in self.caches:
                c.filter(mx.array(rows))

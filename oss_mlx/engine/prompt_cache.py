"""The prompt cache: KV state for many conversations at once, found by longest common prefix.

    pc = PromptCache(model.make_cache, memory_bytes=8 << 30)
    cache, n = pc.acquire(prompt, key="session-1")   # a private cache holding prompt[:n]
    ... feed prompt[n:] and the completion into `cache`, calling pc.snapshot(cache, pos) where a
    later prompt may branch ...
    pc.release(prompt + generated, cache, key="session-1")   # the cache may be kept

Each entry holds a per-layer KV cache, the token list it holds and snapshots of the rotating
(sliding-window) layers. A full-attention cache can be cut back to any shorter prefix; a rotating
one that has wrapped cannot, so a prompt that leaves an entry before its end resumes from the last
snapshot at or before the branch point. Snapshots are taken at the end of every prompt and
completion and at message boundaries (the engine decides where); each costs the sliding window's
K/V only (~3 MB on gpt-oss-20b).

Lookup compares the prompt with every entry (numpy, so thousands of tokens cost microseconds)
whatever the order the conversations arrive in; `key` (a Responses `prompt_cache_key` or a
`user`) breaks ties towards the entry that conversation left. Entries that a released cache
extends are replaced by it (their snapshots carried over), so a growing session holds one entry.
Memory is bounded (`memory_bytes`), least recently used entries going first, to `disk` when one is
given (see DiskCache), from where a later hit restores them; a restored entry's file stays on disk
(a later start finds it too) until the disk budget evicts it, and `flush` (at shutdown) writes
what memory holds that the disk does not.

`acquire` hands out a private cache. A request that continues an entry from its end (the common
case: an agent's next step) takes the entry itself, whose buffers it then extends in place, and
`release` puts it back longer (a request that fails with an error loses that entry; a cancelled
one is released with what it did). A request that branches off inside an entry gets a copy and
the entry stays for the others (two chat tabs, an agent and its title request); copies share the
entry's buffers until they write.

All knowledge of mlx-lm's cache classes lives in `KVAdapter`; a new cache type (a fixed-capacity
ring buffer for a compiled decode step, a quantized KV cache) needs only a new case there.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from oss_mlx.defaults import MAX_SNAPSHOTS
from oss_mlx.engine.kv_adapter import KVAdapter

log = logging.getLogger("oss_mlx.prompt_cache")



# ---- entries and snapshots ------------------------------------------------------------------


@dataclass(eq=False)  # identity: entries and snapshots are compared by object
class Snapshot:
    pos: int      # tokens the cache held when taken
    layers: dict  # layer index -> copy of that (rotating) layer's cache
    nbytes: int = 0
    complete: bool = False  # its layers hold every token from the start: any pos' <= pos too


class Held(list):
    """A private per-layer cache list handed out by `PromptCache.acquire`, with the snapshots
    taken along its token list (inherited from its entry, then added by `snapshot`)."""

    snapshots: list


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # int32, the tokens `cache` holds, in order
    cache: list
    snapshots: list = field(default_factory=list)
    key: Optional[str] = None
    used: int = 0
    nbytes: int = 0
    path: Optional[Path] = None  # its file in the disk cache, if any (cache None: not loaded)
    extra: dict = field(default_factory=dict)  # saved beside it (e.g. the token history)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


EARLY_SNAPSHOTS = 4  # the first snapshots of an entry, kept however long it grows


def keep_snapshots(snaps: list, most: int) -> list:
    """At most `most` snapshots, in order: the latest, where the conversation goes on, and the
    first few, where another conversation with the same instructions and tools branches off (a
    new agent session: its system and developer messages end there)."""
    snaps = sorted(snaps, key=lambda s: s.pos)
    if len(snaps) <= most:
        return snaps
    early = min(EARLY_SNAPSHOTS, most // 2)
    return snaps[:early] + snaps[len(snaps) - (most - early):]


def default_memory_bytes() -> int:
    """An eighth of the machine's memory (at least 512 MiB): room for tens of long sessions
    of gpt-oss-20b (about 24 KB of K/V per token) beside the weights."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        total = 16 << 30
    return max(total // 8, 512 << 20)


class PromptCache:
    """KV caches for many token prefixes under a memory budget (see the module docstring)."""

    def __init__(self, make_cache: Callable[[], list], memory_bytes: int | None = None,
                 max_snapshots: int = MAX_SNAPSHOTS, disk=None,
                 adapter: KVAdapter | None = None):
        self.make_cache = make_cache
        self.memory_bytes = default_memory_bytes() if memory_bytes is None else int(memory_bytes)
        self.max_snapshots = max_snapshots
        self.disk = disk
        self.adapter = adapter or KVAdapter()
        self.entries: list[Entry] = []
        self._tick = 0
        self._lock = threading.Lock()

    # ---- lookup ----

    def _usable(self, e: Entry, lcp: int) -> tuple[int, Optional[Snapshot]]:
        """How many of `e`'s tokens a prompt sharing `lcp` of them can resume from, and the
        snapshot to restore (None: cut the caches back, or nothing to cut)."""
        drop = len(e.tokens) - lcp
        if drop == 0 or (e.cache is not None
                         and all(self.adapter.can_trim(c, drop) for c in e.cache)):
            return lcp, None

        def reach(s: Snapshot) -> int:
            return min(s.pos, lcp) if s.complete else (s.pos if s.pos <= lcp else 0)

        best = max(e.snapshots, key=reach, default=None)
        return (reach(best), best) if best is not None and reach(best) > 0 else (0, None)

    def _best(self, prompt: np.ndarray, key: str | None):
        best, best_n, best_snap = None, 0, None
        # An entry restored from disk stays there too: its file is not a second candidate.
        held = {e.path for e in self.entries if e.path is not None}
        stored = [e for e in self.disk.entries() if e.path not in held] if self.disk else []
        for e in self.entries + stored:
            n, snap = self._usable(e, common_prefix(e.tokens, prompt))
            better = n > best_n or (n == best_n and n > 0 and key is not None
                                    and e.key == key and best.key != key)
            if better:
                best, best_n, best_snap = e, n, snap
        return best, best_n, best_snap

    def acquire(self, prompt: list[int], key: str | None = None) -> tuple[Held, int]:
        """A private cache holding prompt[:n] for the longest reusable prefix, n < len(prompt)
        (the last prompt token is always fed again, for its logits); n is 0 on a miss."""
        want = np.asarray(prompt[:-1], dtype=np.int32)
        with self._lock:
            e, n, snap = self._best(want, key)
            if e is not None and e.cache is None:  # on disk: bring it back first
                e = self._restore(e)
                n, snap = (0, None) if e is None else self._usable(e, common_prefix(e.tokens, want))
            if e is None or n == 0:
                held = Held(self.make_cache())
                held.snapshots = []
                return held, 0
            self._tick += 1
            e.used = self._tick
            if n == len(e.tokens):
                # The request continues this entry: hand it over, so its writes need no copy
                # of the buffers (release puts it back, longer).
                self.entries.remove(e)
                held = Held(e.cache)
                held.snapshots = list(e.snapshots)
                return held, n
            held = Held(self.adapter.copy(c) for c in e.cache)
            drop = len(e.tokens) - n
            for i, c in enumerate(held):
                if snap is not None and i in snap.layers:
                    layer = snap.layers[i]
                    held[i] = (self.adapter.copy(layer) if snap.pos == n
                               else self.adapter.cut(layer, n))
                else:
                    self.adapter.trim(c, drop)
            held.snapshots = [s for s in e.snapshots if s.pos <= n]
            return held, n

    # ---- snapshots ----

    def snapshot(self, cache: list, pos: int):
        """Record the rotating layers of `cache`, which holds `pos` tokens now."""
        import mlx.core as mx

        ad = self.adapter
        layers = {i: ad.compact(c) for i, c in enumerate(cache) if ad.is_rotating(c)}
        if not layers or not hasattr(cache, "snapshots"):
            return
        mx.async_eval([a for c in layers.values() for a in ad.arrays(c)])
        snap = Snapshot(pos, layers, sum(ad.nbytes(c) for c in layers.values()),
                        all(ad.holds_all(c) for c in layers.values()))
        cache.snapshots = [s for s in cache.snapshots if s.pos != pos] + [snap]

    # ---- hand back ----

    def release(self, tokens: list[int], cache: list, key: str | None = None):
        """Hand back a cache holding exactly `tokens` (one more, fed last, is undone)."""
        ad = self.adapter
        held = {ad.offset(c) for c in cache}
        if held == {len(tokens) + 1}:
            for c in cache:
                ad.undo_last_token(c)
        elif held != {len(tokens)}:
            log.debug("not caching: the cache holds %s tokens, the list %d", held, len(tokens))
            return
        if not tokens:
            return
        if hasattr(cache, "snapshots") and not any(s.pos == len(tokens) for s in cache.snapshots):
            self.snapshot(cache, len(tokens))  # the end of a completion: the next turn's start
        snaps = [s for s in getattr(cache, "snapshots", []) if s.pos <= len(tokens)]
        # Computed here, in the thread whose MLX streams made them: an entry is written to disk
        # from another thread at shutdown, which cannot evaluate work queued on those streams.
        import mlx.core as mx

        mx.eval([a for c in cache for a in ad.arrays(c)]
                + [a for s in snaps for c in s.layers.values() for a in ad.arrays(c)])
        entry = Entry(np.asarray(tokens, dtype=np.int32), list(cache), snaps, key)
        with self._lock:
            self._insert(entry)

    def _insert(self, entry: Entry):
        kept = []
        for e in self.entries:
            n = len(e.tokens)
            if n <= len(entry.tokens) and common_prefix(e.tokens, entry.tokens) == n:
                have = {s.pos for s in entry.snapshots}
                entry.snapshots += [s for s in e.snapshots if s.pos not in have]
                entry.key = entry.key or e.key
            else:
                kept.append(e)
        entry.snapshots = keep_snapshots(entry.snapshots, self.max_snapshots)
        entry.nbytes = (sum(self.adapter.nbytes(c) for c in entry.cache)
                        + sum(s.nbytes for s in entry.snapshots))
        self._tick += 1
        entry.used = self._tick
        self.entries = kept + [entry]
        self._evict()

    def _evict(self):
        while self.entries and self.nbytes > self.memory_bytes:
            lru = min(self.entries, key=lambda e: e.used)
            self.entries.remove(lru)
            if self.disk is not None:
                self.disk.put(lru, self.adapter)

    def _restore(self, e: Entry) -> Entry | None:
        loaded = self.disk.load(e, self.adapter, self.make_cache)
        if loaded is None:
            return None

        self._tick += 1
        loaded.used = self._tick
        self.entries.append(loaded)
        return loaded

    # ---- the rest ----

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def clear(self):
        with self._lock:
            self.entries = []

    def latest_tokens(self) -> list[int]:
        """The tokens of the most recently used entry ([] when empty)."""
        with self._lock:
            if not self.entries:
                return []
            return [int(t) for t in max(self.entries, key=lambda e: e.used).tokens]

    def find(self, tokens: list[int]) -> Entry | None:
        """The entry sharing the longest prefix with `tokens` (for saving a conversation)."""
        want = np.asarray(tokens, dtype=np.int32)
        with self._lock:
            scored = [(common_prefix(e.tokens, want), e) for e in self.entries]
            scored = [(n, e) for n, e in scored if n > 0]
            return max(scored, key=lambda t: (t[0], t[1].used))[1] if scored else None

    def add(self, entry: Entry):
        """Keep (a copy of) `entry`, e.g. one read from a file."""
        copy = Entry(entry.tokens, [self.adapter.copy(c) for c in entry.cache],
                     list(entry.snapshots), entry.key)
        with self._lock:
            self._insert(copy)

    def _unsaved(self) -> list[Entry]:
        """The entries in memory the disk cache does not hold yet: the most recently used that
        fit in its budget, least recent first (so the folder keeps the newest longest)."""
        out, total = [], 0
        for e in sorted(self.entries, key=lambda e: e.used, reverse=True):
            if self.disk.holds(e):
                continue
            if total + e.nbytes > self.disk.max_bytes:
                break
            total += e.nbytes
            out.append(e)
        return out[::-1]

    def unsaved(self) -> list[Entry]:
        """What `flush` would write ([] without a disk cache)."""
        if self.disk is None:
            return []
        with self._lock:
            return self._unsaved()

    def flush(self):
        """Write the entries held in memory to the disk cache (at shutdown), if there is one;
        those it holds already are not written again."""
        if self.disk is None:
            return
        with self._lock:
            for e in self._unsaved():
                self.disk.put(e, self.adapter)



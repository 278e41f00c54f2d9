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
given (see DiskCache), from where a later hit restores them.

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

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

log = logging.getLogger("oss_mlx.prompt_cache")

FORMAT_VERSION = 1  # of the files written by save_entry


# ---- the adapter: everything that knows mlx-lm cache internals ------------------------------


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
    path: Optional[Path] = None  # on disk only: where (cache is None until loaded)
    extra: dict = field(default_factory=dict)  # saved beside it (e.g. the token history)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


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
                 max_snapshots: int = 96, disk: "DiskCache | None" = None,
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
        for e in self.entries + (self.disk.entries() if self.disk else []):
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
        entry.snapshots = sorted(entry.snapshots, key=lambda s: s.pos)[-self.max_snapshots:]
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

    def flush(self):
        """Write every entry held in memory to the disk cache (at shutdown), if there is one."""
        if self.disk is None:
            return
        with self._lock:
            for e in self.entries:
                self.disk.put(e, self.adapter)


# ---- options ---------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from "512M", "8G", "1.5G", "4096" (a plain number is bytes)."""
    from .errors import OssMlxError

    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise OssMlxError(f"{text!r} is not a size: write e.g. 512M or 8G") from None
    if value < 0:
        raise OssMlxError(f"{text!r}: a size cannot be negative")
    return int(value * scale)


def add_cache_arguments(parser):
    parser.add_argument("--cache-memory", default=None, metavar="SIZE",
                        help="memory for the prompt cache of many conversations, e.g. 8G "
                             "(default: an eighth of this machine's memory)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="keep prompt-cache entries evicted from memory in DIR and restore "
                             "them on a later hit, also after a restart")
    parser.add_argument("--cache-disk", default="16G", metavar="SIZE",
                        help="most disk space --cache-dir may take (default: 16G)")


def cache_options(args) -> dict:
    """Engine keyword arguments from add_cache_arguments' options."""
    memory = getattr(args, "cache_memory", None)
    return {"cache_memory": parse_size(memory) if memory is not None else None,
            "cache_dir": getattr(args, "cache_dir", None),
            "cache_disk": parse_size(getattr(args, "cache_disk", "16G") or "16G")}


# ---- files: one entry per safetensors file --------------------------------------------------


def save_entry(path, entry: Entry, fingerprint: str, adapter: KVAdapter, extra: dict | None = None):
    """Write `entry` (caches, tokens, snapshots) to `path` atomically; `extra`: more JSON
    metadata (read back by `read_extra`)."""
    import mlx.core as mx

    arrays = {"tokens": mx.array(entry.tokens)}
    layers = []
    for i, c in enumerate(entry.cache):
        a, meta = adapter.to_state(c)
        arrays.update({f"layer.{i}.{k}": v for k, v in a.items()})
        layers.append(meta)
    snaps = []
    for j, s in enumerate(entry.snapshots):
        metas = {}
        for i, c in s.layers.items():
            a, metas[str(i)] = adapter.to_state(c)
            arrays.update({f"snap.{j}.{i}.{k}": v for k, v in a.items()})
        snaps.append({"pos": s.pos, "layers": metas, "complete": s.complete})
    meta = {"format": FORMAT_VERSION, "model": fingerprint, "key": entry.key,
            "layers": layers, "snapshots": snaps, "extra": extra or {}}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata={"oss_mlx_prompt_cache": json.dumps(meta)})
        os.replace(tmp, path)  # never a half-written file under the final name
    finally:
        tmp.unlink(missing_ok=True)


def _read_meta(path) -> tuple[dict, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {})["oss_mlx_prompt_cache"])
        tokens = f.get_tensor("tokens")
    return meta, tokens


def check_entry(path, fingerprint: str) -> tuple[dict, np.ndarray]:
    """The metadata and tokens of a cache file; ValueError saying why it cannot be used."""
    try:
        meta, tokens = _read_meta(path)
    except Exception as e:  # noqa: BLE001 - any damage reads as one reason
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"cache format {meta.get('format')}, this version reads {FORMAT_VERSION}")
    if meta.get("model") != fingerprint:
        raise ValueError("written for another model or converter version")
    return meta, tokens


def load_entry(path, fingerprint: str, adapter: KVAdapter, make_cache) -> Entry:
    """Read a file written by save_entry; ValueError when it does not fit this model."""
    import mlx.core as mx

    meta, tokens = check_entry(path, fingerprint)
    try:
        arrays = mx.load(str(path))
        like = make_cache()
        if len(meta["layers"]) != len(like):
            raise ValueError("layer count differs")

        def layer(prefix, m, i):
            names = {k: f"{prefix}.{k}" for k in ("keys", "values")}
            a = {k: arrays[n] for k, n in names.items() if n in arrays}
            return adapter.from_state(a, m, like[i])

        cache = [layer(f"layer.{i}", m, i) for i, m in enumerate(meta["layers"])]
        snaps = []
        for j, s in enumerate(meta["snapshots"]):
            ls = {int(i): layer(f"snap.{j}.{i}", m, int(i)) for i, m in s["layers"].items()}
            snaps.append(Snapshot(int(s["pos"]), ls, sum(adapter.nbytes(c) for c in ls.values()),
                                  all(adapter.holds_all(c) for c in ls.values())))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"damaged ({type(e).__name__}: {e})") from None
    if {adapter.offset(c) for c in cache} != {len(tokens)}:
        raise ValueError("its caches do not hold its token list")
    mx.eval([a for c in cache for a in adapter.arrays(c)])
    entry = Entry(tokens.astype(np.int32), cache, snaps, meta.get("key"))
    entry.extra = meta.get("extra") or {}
    return entry


def warn_unusable(path, why: str):
    print(f"oss-mlx: warning: ignoring prompt cache file {path}: {why}", flush=True)


class DiskCache:
    """Evicted entries kept in a folder (one safetensors file each), bounded by `max_bytes`
    (oldest files go first), indexed by their token lists so a later hit, also after a restart,
    can restore them. Files for another model or damaged ones are ignored with a warning."""

    def __init__(self, folder, fingerprint: str, max_bytes: int = 16 << 30,
                 extra: Callable[[Entry], dict] | None = None):
        from .errors import OssMlxError

        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OssMlxError(f"cannot use {self.folder} as the prompt cache folder: "
                              f"{e.strerror or e}") from None
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.extra = extra  # more to write beside an entry (the engine: its token history)
        self._index: dict[Path, Entry] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name.endswith(".tmp.safetensors"):
                continue
            try:
                meta, tokens = check_entry(path, fingerprint)
            except ValueError as e:
                warn_unusable(path, str(e))
                continue
            self._index[path] = self._stub(path, meta, tokens)

    @staticmethod
    def _stub(path, meta, tokens) -> Entry:
        snaps = [Snapshot(int(s["pos"]), {}, 0, bool(s.get("complete")))
                 for s in meta["snapshots"]]
        return Entry(tokens.astype(np.int32), None, snaps, meta.get("key"), path=path,
                     extra=meta.get("extra") or {})

    def entries(self) -> list[Entry]:
        return list(self._index.values())

    def put(self, entry: Entry, adapter: KVAdapter):
        digest = hashlib.sha256(entry.tokens.tobytes()).hexdigest()[:32]
        path = self.folder / f"{digest}.safetensors"
        try:
            save_entry(path, entry, self.fingerprint, adapter,
                       self.extra(entry) if self.extra else None)
        except (OSError, RuntimeError) as e:  # a full disk: the entry is only lost
            log.warning("cannot write %s: %s", path, e)
            return
        stubs = [Snapshot(s.pos, {}, 0, s.complete) for s in entry.snapshots]
        self._index[path] = Entry(entry.tokens, None, stubs, entry.key, path=path)
        self._bound()

    def _bound(self):
        files = sorted(self._index, key=lambda p: p.stat().st_mtime if p.exists() else 0)
        total = sum(p.stat().st_size for p in files if p.exists())
        while files and total > self.max_bytes:
            p = files.pop(0)
            total -= p.stat().st_size if p.exists() else 0
            self._index.pop(p, None)
            p.unlink(missing_ok=True)

    def load(self, stub: Entry, adapter: KVAdapter, make_cache) -> Entry | None:
        """The full entry for an index stub (the file is removed: the entry is in memory now)."""
        self._index.pop(stub.path, None)
        try:
            entry = load_entry(stub.path, self.fingerprint, adapter, make_cache)
        except ValueError as e:
            warn_unusable(stub.path, str(e))
            return None
        finally:
            stub.path.unlink(missing_ok=True)
        entry.nbytes = (sum(adapter.nbytes(c) for c in entry.cache)
                        + sum(s.nbytes for s in entry.snapshots))
        return entry

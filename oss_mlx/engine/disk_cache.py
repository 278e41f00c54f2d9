"""The prompt cache on disk: one entry per safetensors file (its layers, tokens and snapshots,
and JSON metadata), written atomically, checked against the model's fingerprint when read, and
`DiskCache`, the folder of evicted entries a later hit (also after a restart) restores."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from oss_mlx.defaults import DISK_CACHE_SIZE, parse_size
from oss_mlx.errors import OssMlxError
from oss_mlx.checkpoint.files import atomic_path
from oss_mlx.engine.kv_adapter import KVAdapter
from oss_mlx.engine.prompt_cache import Entry, Snapshot

log = logging.getLogger("oss_mlx.prompt_cache")

FORMAT_VERSION = 1  # of the files written by save_entry


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
    with atomic_path(path, suffix=".safetensors") as tmp:  # never half a file under its name
        mx.save_safetensors(str(tmp), arrays, metadata={"oss_mlx_prompt_cache": json.dumps(meta)})


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
    # Read now, in this thread: arrays loaded lazily belong to its streams, and an entry may be
    # written back from another thread (the shutdown's flush), which cannot evaluate them.
    mx.eval([a for c in cache for a in adapter.arrays(c)]
            + [a for s in snaps for c in s.layers.values() for a in adapter.arrays(c)])
    entry = Entry(tokens.astype(np.int32), cache, snaps, meta.get("key"))
    entry.extra = meta.get("extra") or {}
    return entry


def warn_unusable(path, why: str):
    print(f"oss-mlx: warning: ignoring prompt cache file {path}: {why}", flush=True)


@dataclass(frozen=True)
class PerModel:
    """A root folder holding one disk cache per model: `root/<the first 16 hex digits of the
    model's fingerprint>` (what `serve` uses by default: $OSS_MLX_HOME/prompt-cache), with a
    `model.txt` naming the model for whoever looks."""

    root: Path
    name: str = ""

    def folder(self, fingerprint: str) -> Path:
        return Path(self.root).expanduser() / fingerprint[:16]


class DiskCache:
    """Evicted entries kept in a folder (one safetensors file each), bounded by `max_bytes`
    (the least recently used files go first), indexed by their token lists so a later hit, also
    after a restart, can restore them. A restored entry's file stays until the budget evicts it.
    Files for another model or damaged ones are ignored with a warning."""

    def __init__(self, folder, fingerprint: str, max_bytes: int = parse_size(DISK_CACHE_SIZE),
                 extra: Callable[[Entry], dict] | None = None):
        """folder: a path, or a PerModel root (this model's folder under it)."""
        per_model = folder if isinstance(folder, PerModel) else None
        self.folder = per_model.folder(fingerprint) if per_model else Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if per_model is not None and per_model.name:
                (self.folder / "model.txt").write_text(per_model.name + "\n")
        except OSError as e:
            raise OssMlxError(f"cannot use {self.folder} as the prompt cache folder: "
                              f"{e.strerror or e}") from None
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.extra = extra  # more to write beside an entry (the engine: its token history)
        self._index: dict[Path, Entry] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name.startswith("."):  # a writer's temporary file (files.atomic_path)
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

    def path_of(self, tokens: np.ndarray) -> Path:
        """Where the entry holding exactly `tokens` is kept (named by their hash)."""
        digest = hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:32]
        return self.folder / f"{digest}.safetensors"

    def holds(self, entry: Entry) -> bool:
        """Whether the folder keeps an entry with exactly `entry`'s tokens."""
        path = self.path_of(entry.tokens)
        return path in self._index and path.exists()

    def put(self, entry: Entry, adapter: KVAdapter) -> bool:
        """Keep `entry` in the folder (an entry already there is only marked as recently
        used); False when nothing was written."""
        path = self.path_of(entry.tokens)
        if self.holds(entry):
            _touch(path)
            return False
        try:
            save_entry(path, entry, self.fingerprint, adapter,
                       self.extra(entry) if self.extra else None)
        except (OSError, RuntimeError) as e:  # a full disk: the entry is only lost
            log.warning("cannot write %s: %s", path, e)
            return False
        stubs = [Snapshot(s.pos, {}, 0, s.complete) for s in entry.snapshots]
        stub = Entry(entry.tokens, None, stubs, entry.key, path=path)
        self._index[path] = stub
        self._drop_covered(stub)
        self._bound()
        return True

    def _drop_covered(self, new: Entry):
        """Remove the files `new` makes redundant: entries whose tokens are a prefix of its
        own and whose every snapshot it has too (it resumes wherever they could)."""
        have = {s.pos for s in new.snapshots}
        for path, e in list(self._index.items()):
            n = len(e.tokens)
            if (e is not new and n < len(new.tokens)
                    and np.array_equal(e.tokens, new.tokens[:n])
                    and {s.pos for s in e.snapshots} <= have):
                self._index.pop(path, None)
                path.unlink(missing_ok=True)

    def _bound(self):
        files = sorted(self._index, key=lambda p: p.stat().st_mtime if p.exists() else 0)
        total = sum(p.stat().st_size for p in files if p.exists())
        while files and total > self.max_bytes:
            p = files.pop(0)
            total -= p.stat().st_size if p.exists() else 0
            self._index.pop(p, None)
            p.unlink(missing_ok=True)

    def load(self, stub: Entry, adapter: KVAdapter, make_cache) -> Entry | None:
        """The full entry for an index stub. The file stays (marked as recently used) until the
        folder's budget evicts it: the entry is in memory now, and on disk for the next start."""
        try:
            entry = load_entry(stub.path, self.fingerprint, adapter, make_cache)
        except ValueError as e:
            warn_unusable(stub.path, str(e))
            self._index.pop(stub.path, None)
            stub.path.unlink(missing_ok=True)
            return None
        _touch(stub.path)
        entry.path = stub.path
        entry.nbytes = (sum(adapter.nbytes(c) for c in entry.cache)
                        + sum(s.nbytes for s in entry.snapshots))
        return entry


def _touch(path: Path):
    """Mark a file as recently used (the folder's budget evicts the least recent first)."""
    try:
        path.touch()
    except OSError:
        pass

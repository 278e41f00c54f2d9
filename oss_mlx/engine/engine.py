"""The generation engine: the one object `generate`, `chat`, `bench` and the server call.

    from oss_mlx.engine import Engine, SamplingParams
    from oss_mlx.harmony import build_conversation, user_message

    engine = Engine.load("gpt-oss-20b")                # a converted folder or a store name; offline
    conv = build_conversation([user_message("Hi")], reasoning="low")
    for ev in engine.stream(conv, SamplingParams(temperature=1.0, max_tokens=2048)):
        if ev.type == "delta" and ev.channel == "final":
            print(ev.text, end="", flush=True)
        elif ev.type == "done":
            completion = ev.completion                 # text per channel, tool calls, stats

Events and stop reasons: oss_mlx/harmony/parser.py and oss_mlx/engine/types.py. How a request
flows through the prompt cache, prefill chunks, the compiled decode step and the parser:
docs/architecture.md. `stream` runs the request through the same loop the server's scheduler
runs (oss_mlx/engine/loop.py), as a batch of one; the loop uses the engine's steps: `acquire`,
`prefill_steps`, `snapshot`, `release`. One loop drives the model at a time (a lock); `stream`
is a generator, so errors such as a prompt longer than the context (OssMlxError) are raised at
the first `next()`.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Iterator

from oss_mlx.defaults import MAX_SNAPSHOTS, PREFILL_CHUNK, parse_size, DISK_CACHE_SIZE
from oss_mlx.engine.pace import PrefillPace
from oss_mlx.engine.types import Completion, Event, SamplingParams
from oss_mlx.errors import OssMlxError
from oss_mlx.harmony.encoding import CLOSERS, load_encoding


# ---- the engine -----------------------------------------------------------------------------


def model_fingerprint(model) -> str:
    """What a saved KV cache must have been computed with: the converted folder's manifest
    (weights' checksums, converter version), or the config for a model without one, and the
    dtype (the K/V are stored in it)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256(str(getattr(model, "dtype", "")).encode())
    folder = getattr(model, "model_dir", None)
    manifest = Path(folder) / "manifest.json" if folder else None
    if manifest is not None and manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        h.update(repr(getattr(model, "config", type(model).__name__)).encode())
    return h.hexdigest()


class Engine:
    """Generation over one model and its harmony encoding, with a prompt cache for many
    conversations (oss_mlx.prompt_cache) and exact token history (oss_mlx.token_history)."""

    def __init__(self, model, encoding, prefill_chunk: int = PREFILL_CHUNK,
                 max_snapshots: int = MAX_SNAPSHOTS, cache_memory: int | None = None,
                 cache_dir=None, cache_disk: int | None = None, compiled: bool = True):
        from oss_mlx.engine.disk_cache import DiskCache
        from oss_mlx.engine.prompt_cache import PromptCache
        from oss_mlx.harmony.history import TokenHistory

        self.model = model
        self.encoding = encoding
        self.prefill_chunk = prefill_chunk  # the largest prefill chunk (the memory plan's)
        self.pace = PrefillPace(prefill_chunk)  # the size of each chunk (engine/pace.py)
        self.compiled = compiled  # False: always the plain forward (--no-compile)
        self._lock = threading.Lock()
        self.fingerprint = model_fingerprint(model)
        self.history = TokenHistory(encoding)
        disk = None
        if cache_dir:
            disk = DiskCache(cache_dir, self.fingerprint,
                             cache_disk or parse_size(DISK_CACHE_SIZE), self._history_of)
            for stub in disk.entries():  # so the first prompt after a restart matches them
                self._remember_history(stub)
        self.prompt_cache = PromptCache(model.make_cache, cache_memory, max_snapshots, disk)
        import mlx_lm.generate  # noqa: F401 - slow first import; keep it out of the first TTFT

    def _history_of(self, entry) -> dict:
        """What to save beside a prompt-cache entry: the sampled tokens of its messages."""
        return {"history": self.history.export([int(t) for t in entry.tokens])}

    def _remember_history(self, entry):
        self.history.load(entry.extra.get("history", []))

    @classmethod
    def load(cls, model: str, dtype=None, **kwargs) -> "Engine":
        """Load a converted model folder or a model-store name; never touches the network."""
        from oss_mlx.model import default_dtype, load
        from oss_mlx.store import resolve_model

        folder = resolve_model(model)
        encoding = load_encoding(folder)  # fails fast, before the weights load

        if dtype is None:
            dtype = default_dtype()
        return cls(load(folder, dtype=dtype), encoding, **kwargs)

    @property
    def max_context(self) -> int:
        # memory.apply sets model.max_context from --max-context (the context the plan allowed)
        return int(getattr(self.model, "max_context", None) or self.model.config.max_context)

    # ---- prompts ----

    def render(self, conversation) -> list[int]:
        """Prompt tokens for a Conversation (see harmony.render_prompt), with the assistant
        messages this engine generated written as the tokens it sampled (token_history)."""
        return self.history.render(conversation)

    def reset_cache(self):
        """Forget the prompt cache (the next request starts cold)."""
        self.prompt_cache.clear()

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens of the most recently used prompt-cache entry (a copy)."""
        return self.prompt_cache.latest_tokens()

    def _check_fits(self, prompt: list[int]):
        if len(prompt) == 0:
            raise OssMlxError("empty prompt")
        if len(prompt) >= self.max_context:
            raise OssMlxError(
                f"context_length_exceeded: the prompt is {len(prompt)} tokens and the model's "
                f"context is {self.max_context} tokens; shorten the conversation"
            )

    # ---- the prompt cache, one request at a time or driven by a scheduler ----

    def acquire(self, prompt: list[int], key: str | None = None) -> tuple[list, int]:
        """A private per-layer cache (B=1, the caller may mutate it) holding prompt[:n] for the
        longest cached prefix, n < len(prompt); n is the number of cached tokens."""
        return self.prompt_cache.acquire(prompt, key)

    def prefill_steps(self, prompt: list[int], cache: list, start: int,
                      cancel=None) -> Iterator[int]:
        """Prefill prompt[start:-1] into `cache` chunk by chunk, yielding after each chunk the
        number of tokens this call has prefilled so far; stops early (before a chunk) when
        `cancel` is set. Each chunk is as long as `self.pace` says (the measured prefill rate),
        at most `prefill_chunk`; chunks end at message boundaries too, where the prompt cache
        takes a snapshot, and at the end. Afterwards the cache holds all but the last prompt
        token."""
        import mlx.core as mx

        end = len(prompt) - 1
        closers = [p + 1 for p in range(start, end) if prompt[p] in CLOSERS]
        pos, pace = start, self.pace
        whole = start == 0  # a `complete` snapshot follows the chunks (see _next_cut)
        while pos < end:
            if cancel is not None and cancel.is_set():
                return
            asked = pace.size()
            cut, snap = _next_cut(closers, pos, end, asked, self.prefill_chunk if whole else 0)
            t = pace.clock()
            # Only fills the cache: no [T, vocab] unembedding for logits nobody reads.
            self.model.prefill(mx.array(prompt[pos:cut])[None], cache, self.prefill_chunk,
                               logits=False)
            pace.measure(cut - pos, pace.clock() - t, asked)
            if whole and pos > 0:
                whole = self._extend_whole(cache, pos, cut)
            elif snap:
                self.prompt_cache.snapshot(cache, cut)
            pos = cut
            whole = whole and pos < self.prefill_chunk
            yield pos - start

    def _extend_whole(self, cache: list, pos: int, cut: int) -> bool:
        """After a chunk pos..cut of a prompt prefilled from an empty cache: the `complete`
        snapshot at pos (its rotating layers holding every position from 0) becomes one at
        cut, so that a later prompt branching anywhere in the first prefill_chunk tokens (the
        system message, mid-sentence) resumes there whatever the chunk sizes were. False when
        there is none to extend."""
        from oss_mlx.engine.prompt_cache import Snapshot

        snaps = getattr(cache, "snapshots", None)
        last = next((s for s in reversed(snaps or []) if s.pos == pos and s.complete), None)
        if last is None:
            return False
        ad = self.prompt_cache.adapter
        layers = {i: ad.extend(layer, cache[i], cut - pos) for i, layer in last.layers.items()}
        snap = Snapshot(cut, layers, sum(ad.nbytes(c) for c in layers.values()), complete=True)
        cache.snapshots = [s for s in snaps if s is not last] + [snap]
        return True

    def release(self, tokens: list[int], cache: list, key: str | None = None):
        """Hand back a cache holding exactly `tokens` (prompt + generated, without the final stop
        token; one more token fed last is undone) to the prompt cache, which may keep it."""
        self.prompt_cache.release(tokens, cache, key)

    def snapshot(self, cache: list, pos: int):
        """Snapshot the rotating layers of `cache` (from acquire), which holds `pos` tokens: a
        scheduler calls it after feeding the last prompt token (pos = len(prompt)) and after
        each <|end|> it feeds, where later prompts branch (a dropped analysis message)."""
        self.prompt_cache.snapshot(cache, pos)

    def _last_logits(self, prompt: list[int], cache: list):
        """Feed the last prompt token (the rest is cached) and return its logits [1, V]."""
        import mlx.core as mx

        logits = self.model.prefill(mx.array(prompt[-1:])[None], cache, self.prefill_chunk)
        self.snapshot(cache, len(prompt))
        return logits

    def logits(self, prompt: list[int], key: str | None = None):
        """Logits [V] (float32) of the last position of `prompt`, through the prompt cache.

        For scoring and tests: the same reuse path as `stream`, so comparing with a cold model
        checks the cache machinery.
        """
        import mlx.core as mx

        self._check_fits(prompt)
        with self._lock:
            cache, start = self.acquire(prompt, key)
            for _ in self.prefill_steps(prompt, cache, start):
                pass
            out = self._last_logits(prompt, cache)[0].astype(mx.float32)
            mx.eval(out)
            self.release(prompt, cache, key)
            return out

    # ---- saving a conversation's KV state ----

    def save_cache(self, path, conversation) -> bool:
        """Write the prompt-cache entry that `conversation` continues (and the sampled tokens
        of its messages) to `path` (safetensors); False when nothing is cached for it."""
        from oss_mlx.engine.disk_cache import save_entry

        tokens = self.render(conversation)
        entry = self.prompt_cache.find(tokens)
        if entry is None:
            return False
        try:
            save_entry(path, entry, self.fingerprint, self.prompt_cache.adapter,
                       self._history_of(entry))
        except (OSError, RuntimeError) as e:
            raise OssMlxError(f"cannot write {path}: {e}") from None
        return True

    def load_cache(self, path) -> str | None:
        """Restore a file written by save_cache into the prompt cache, so the conversation
        resumes without prefilling it again. Returns None, or why the file was ignored (another
        model or converter version, a damaged file) as a one-line warning."""
        from oss_mlx.engine.disk_cache import load_entry

        try:
            entry = load_entry(path, self.fingerprint, self.prompt_cache.adapter,
                               self.model.make_cache)
        except ValueError as e:
            return f"ignoring the KV cache in {path}: {e}"
        self._remember_history(entry)
        self.prompt_cache.add(entry)
        return None

    # ---- generation ----

    def _use_compiled(self, cache: list) -> bool:
        """The one rule for which step a request decodes on: the model's compiled step
        (oss_mlx.model.decode), unless the engine was made with compiled=False (--no-compile),
        the model has no `decoder()` of its own (a stand-in such as the tests' ScriptedModel, or
        a wrapper around a model whose calls it watches: the step would bypass them), it is
        split across the ranks of a launch (oss_mlx.model.shard: its collectives count their
        bytes and tick the ranks' watchdogs as the graph is built, which a compiled replay
        never does), or a layer's cache is not one of mlx-lm's plain KVCache / RotatingKVCache
        (the quantized caches of --kv-bits). Otherwise the plain forward (engine/rows.py)."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        decoder = getattr(self.model, "decoder", None)
        return (self.compiled and callable(decoder) and decoder().model is self.model
                and getattr(self.model, "sharding", None) is None
                and all(type(c) is KVCache or (type(c) is RotatingKVCache and c.keep == 0)
                        for c in cache))

    def make_loop(self, max_rows: int = 1):
        """The request loop over this engine (oss_mlx.engine.loop), `max_rows` requests at once."""
        from oss_mlx.engine.loop import Loop

        return Loop(self, max_rows)

    def complete(self, conversation, params: SamplingParams | None = None, cancel=None,
                 key: str | None = None, progress=None) -> Completion:
        """Run `stream` to the end and return its Completion."""
        for ev in self.stream(conversation, params, cancel, key, progress):
            if ev.type == "done":
                return ev.completion
        raise RuntimeError("stream ended without a done event")  # pragma: no cover

    def stream(self, conversation, params: SamplingParams | None = None, cancel=None,
               key: str | None = None, progress=None) -> Iterator[Event]:
        """Generate one assistant turn, yielding delta / message events and a final done event.

        conversation: an openai_harmony.Conversation (see harmony.build_conversation), a list of
        Messages, or already-rendered prompt tokens (list of ints). cancel: a threading.Event;
        when set, prefill stops before its next chunk and generation before the next token, with
        stop_reason "cancelled". key: which conversation this continues (a Responses
        prompt_cache_key or a user id; default params.cache_key), a hint for the prompt cache.
        progress: called as progress(read, total, tok_s) after each prefill chunk (prompt
        tokens in the cache of the prompt's total, and the prefill rate so far).
        """
        params = params or SamplingParams()
        t0 = time.perf_counter()
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], int):
            prompt = list(conversation)
        else:
            prompt = self.render(conversation)
        self._check_fits(prompt)
        job = StreamJob(prompt, params, cancel, key or params.cache_key, progress, t0)
        with self._lock:
            yield from self._run(job)

    def _run(self, job: "StreamJob"):
        """One request through the loop, in this thread, as a batch of one."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, wired_limit

        mx.reset_peak_memory()
        loop = self.make_loop(1)
        with wired_limit(self.model, [generation_stream]):
            loop.add(job)
            try:
                while loop.busy:
                    loop.step()
                    yield from job.take()
            except GeneratorExit:
                # The consumer stopped at an event: the caches and the tokens agree; keep them.
                loop.close()
                raise


class StreamJob:
    """A request of `Engine.stream`: the loop puts its events here, the stream yields them."""

    def __init__(self, prompt, params, cancel, key, progress, t0):
        self.conversation, self.params, self.cancel, self.key = prompt, params, cancel, key
        self.progress, self.t0 = progress, t0
        self.items: list = []

    def put(self, item):
        self.items.append(item)

    def take(self) -> list:
        items, self.items = self.items, []
        return items


def _next_cut(closers: list[int], pos: int, end: int, chunk: int,
              whole: int = 0) -> tuple[int, bool]:
    """Where the prefill chunk starting at `pos` ends, and whether to snapshot there: at most
    `chunk` tokens, ending early after a message closer (a later prompt may branch at a message
    boundary: a dropped analysis, an edited turn), and at `end`. While the prompt's first
    `whole` tokens are prefilled from an empty cache, chunks take no early end: the rotating
    layers' first write holds all of it, and the engine extends that `complete` snapshot chunk
    by chunk (Engine._extend_whole), which serves every boundary inside (PromptCache)."""
    if pos < whole:
        return min(pos + chunk, end, whole), True
    limit = min(pos + chunk, end)
    i = bisect.bisect_right(closers, pos)
    if i < len(closers) and closers[i] <= limit:
        return closers[i], True
    return limit, limit == end

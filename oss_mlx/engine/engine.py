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
docs/architecture.md. One engine serves one request at a time (a lock); `stream` is a
generator, so errors such as a prompt longer than the context (OssMlxError) are raised at the
first `next()`. A scheduler driving several requests uses the same steps as `stream`:
`acquire`, `prefill_steps`, `snapshot`, `release` (oss_mlx/engine/batch.py).
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from oss_mlx.defaults import MAX_SNAPSHOTS, PREFILL_CHUNK, parse_size, DISK_CACHE_SIZE
from oss_mlx.engine.request import Request
from oss_mlx.engine.types import Completion, Event, SamplingParams
from oss_mlx.errors import OssMlxError
from oss_mlx.harmony.encoding import CLOSERS, END, load_encoding


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
        self.prefill_chunk = prefill_chunk
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
        `cancel` is set. Chunks end at message boundaries too, where the prompt cache takes a
        snapshot, and at the end. Afterwards the cache holds all but the last prompt token."""
        import mlx.core as mx

        end = len(prompt) - 1
        pos = start
        for cut, snap in _chunk_plan(prompt, start, end, self.prefill_chunk):
            if cancel is not None and cancel.is_set():
                return
            # Only fills the cache: no [T, vocab] unembedding for logits nobody reads.
            self.model.prefill(mx.array(prompt[pos:cut])[None], cache, self.prefill_chunk,
                               logits=False)
            pos = cut
            if snap:
                self.prompt_cache.snapshot(cache, pos)
            yield pos - start

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
        """The one rule for how a single request decodes: with the model's compiled step
        (oss_mlx.decode), unless the engine was made with compiled=False (--no-compile), the
        model has no `decoder()` of its own (a stand-in such as the tests' ScriptedModel, or a
        wrapper around a model whose calls it watches: the step would bypass them), it is split
        across the ranks of a launch (oss_mlx.shard: its collectives count their bytes and tick
        the ranks' watchdogs as the graph is built, which a compiled replay never does), or a
        layer's cache is not one of mlx-lm's plain KVCache / RotatingKVCache (the quantized
        caches of --kv-bits). The batcher (oss_mlx.batch) always runs the plain forward."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        decoder = getattr(self.model, "decoder", None)
        return (self.compiled and callable(decoder) and decoder().model is self.model
                and getattr(self.model, "sharding", None) is None
                and all(type(c) is KVCache or (type(c) is RotatingKVCache and c.keep == 0)
                        for c in cache))

    def complete(self, conversation, params: SamplingParams | None = None, cancel=None,
                 key: str | None = None) -> Completion:
        """Run `stream` to the end and return its Completion."""
        for ev in self.stream(conversation, params, cancel, key):
            if ev.type == "done":
                return ev.completion
        raise RuntimeError("stream ended without a done event")  # pragma: no cover

    def stream(self, conversation, params: SamplingParams | None = None, cancel=None,
               key: str | None = None) -> Iterator[Event]:
        """Generate one assistant turn, yielding delta / message events and a final done event.

        conversation: an openai_harmony.Conversation (see harmony.build_conversation), a list of
        Messages, or already-rendered prompt tokens (list of ints). cancel: a threading.Event;
        when set, prefill stops before its next chunk and generation before the next token, with
        stop_reason "cancelled". key: which conversation this continues (a Responses
        prompt_cache_key or a user id; default params.cache_key), a hint for the prompt cache.
        """
        params = params or SamplingParams()
        t0 = time.perf_counter()
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], int):
            prompt = list(conversation)
        else:
            prompt = self.render(conversation)
        self._check_fits(prompt)
        with self._lock:
            yield from self._generate(prompt, params, cancel, t0, key or params.cache_key)

    def _generate(self, prompt, params, cancel, t0, key):
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, wired_limit

        mx.reset_peak_memory()
        cache, start = self.acquire(prompt, key)
        req = Request.start(prompt, params, self.encoding, self.max_context, cached=start,
                            cancel=cancel, t0=t0)
        tokens = list(prompt[:start])  # what `cache` holds, in order
        decoder = self.model.decoder() if self._use_compiled(cache) else None

        def step(y):
            with mx.stream(generation_stream):
                if decoder is not None:  # `cache` holds the decoder's caches while decoding
                    logits = decoder(y[None], cache)
                else:
                    logits = self.model(y[None], cache=cache)[:, -1, :]
                return req.sampler(lambda: req.history(y), logits)  # y: fed, not yet read

        reason = None
        try:
            with wired_limit(self.model, [generation_stream]):
                if req.limit > 0:
                    with mx.stream(generation_stream):
                        if decoder is not None:  # the full layers' buffers, on its grid
                            decoder.presize(cache, len(prompt) + 1)
                        for done in self.prefill_steps(prompt, cache, start, cancel):
                            tokens = list(prompt[: start + done])
                    if len(tokens) < len(prompt) - 1:
                        reason = "cancelled"
                else:
                    reason = req.limit_reason
                if reason is None:
                    reason = yield from self._decode(req, cache, tokens, step,
                                                     decoder is not None)
        except GeneratorExit:
            # The consumer stopped at an event: the cache and `tokens` agree; keep them.
            self.release(tokens, cache, key)
            raise
        mx.synchronize()
        self.release(req.kept_tokens(tokens, reason), cache, key)
        self.history.remember(prompt[-2:], req.generated, req.parser.done)
        completion = req.finish(reason)
        yield from req.parser.drain()
        yield Event("done", completion=completion)

    def _decode(self, req: Request, cache, tokens, step, compiled: bool = False):
        """Sample up to `req.limit` tokens after the prompt, appending to `tokens` each one fed
        to the model (the pipeline feeds a token before it is read; the last one of the limit
        is never fed); returns the stop reason. `compiled`: `step` runs the compiled decoder,
        so `cache` (prefilled on mlx-lm's caches) holds the decoder's caches from the first
        step on, and mlx-lm's again for each snapshot and when this returns or is closed."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        from oss_mlx.model.decode import to_decoder, to_mlx_lm

        prompt = req.prompt
        with mx.stream(generation_stream):
            y = req.sampler(req.history, self._last_logits(prompt, cache))
            if compiled:
                cache[:] = to_decoder(cache, self.max_context)  # in place: keeps its snapshots
        tokens.append(prompt[-1])
        mx.async_eval(y)
        try:
            return (yield from self._sample_loop(req, cache, tokens, step, y, compiled))
        finally:
            if compiled:
                cache[:] = to_mlx_lm(cache)  # what the prompt cache keeps

    def _snapshot_decoding(self, cache: list, pos: int, compiled: bool):
        """A snapshot while decoding; the prompt cache snapshots mlx-lm's rotating caches."""
        from oss_mlx.model.decode import to_decoder, to_mlx_lm

        if compiled:
            cache[:] = to_mlx_lm(cache)
        self.snapshot(cache, pos)
        if compiled:
            cache[:] = to_decoder(cache, self.max_context)  # the same arrays back: no data moves

    def _sample_loop(self, req: Request, cache, tokens, step, y, compiled):
        import mlx.core as mx

        n = 0
        while True:
            # Queue the next step before reading this token, so the device never waits.
            fed = n + 1 < req.limit
            if fed:
                next_y = step(y)
                mx.async_eval(next_y)
            tok = int(y.item())
            n += 1
            if fed:
                tokens.append(tok)
                if tok == END:  # a message boundary: a later prompt may branch here
                    self._snapshot_decoding(cache, len(tokens), compiled)
            reason = req.emit(tok)
            yield from req.parser.drain()
            reason = req.stop_reason(reason)
            if reason is not None:
                return reason
            if n % 256 == 0:
                mx.clear_cache()
            y = next_y


def _chunk_plan(prompt: list[int], start: int, end: int, chunk: int) -> list[tuple[int, bool]]:
    """Where prefill chunks of prompt[start:end] end, and whether to snapshot there: at most
    `chunk` tokens each, also ending after every message closer (a later prompt may branch at a
    message boundary: a dropped analysis, an edited turn) and at `end`."""
    cuts = {p + 1 for p in range(start, end) if prompt[p] in CLOSERS}
    if start == 0:
        # The first chunk into an empty cache leaves its rotating layers holding all of it,
        # so its snapshot serves every boundary inside it (PromptCache: complete snapshots).
        first = min(chunk, end)
        cuts = {c for c in cuts if c > first} | {first}
    plan, pos = [], start
    for b in sorted(cuts | {end}):
        while b - pos > chunk:
            pos += chunk
            plan.append((pos, False))
        if b > pos:
            plan.append((b, True))
            pos = b
    return plan

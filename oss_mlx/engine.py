"""The generation engine: one object that `generate`, `chat`, `bench` and the server call.

    from oss_mlx.engine import Engine, SamplingParams
    from oss_mlx.harmony import build_conversation, user_message

    engine = Engine.load("gpt-oss-20b")                # a converted folder or a store name; offline
    conv = build_conversation([user_message("Hi")], reasoning="low")
    for ev in engine.stream(conv, SamplingParams(temperature=1.0, max_tokens=2048)):
        if ev.type == "delta" and ev.channel == "final":
            print(ev.text, end="", flush=True)        # ev.channel "analysis" = reasoning
        elif ev.type == "message":
            ...                                        # ev.message: a finished openai_harmony.Message
        elif ev.type == "done":
            completion = ev.completion                 # Completion (text per channel, tool calls, stats)

    completion = engine.complete(conv, params)         # the same, without the events

Events (`Event.type`):
  "delta"    ev.channel ("analysis" | "commentary" | "final" | None), ev.recipient (e.g.
             "functions.get_weather" while the model writes a tool call's JSON arguments, else
             None), ev.text (new text; never contains a special token).
  "message"  a message was closed (by <|end|>, <|call|> or <|return|>): ev.message (the
             openai_harmony.Message), plus ev.channel / ev.recipient / ev.text (its whole text).
  "done"     always last, exactly once: ev.completion.

Stop reasons (`Completion.stop_reason`): "stop" (<|return|>), "tool_call" (<|call|> after a message
to a recipient: run the tool, append its result with harmony.tool_result_message, call again),
"length" (max_tokens reached), "context" (the model's context is full), "cancelled" (the `cancel`
threading.Event was set; checked between tokens), "malformed" (the model broke the harmony grammar:
a stray special token, a bad header; what was parsed before is kept). <|end|> only closes a message.

Prompt cache (oss_mlx.prompt_cache): KV state for many conversations at once, under a memory
budget. A new prompt resumes from the entry sharing its longest prefix, whatever the order
conversations arrive in, and prefills only the rest (`Stats.cached_tokens`). The sliding layers'
rotating caches cannot be rolled back once they wrapped, so snapshots of them are taken where a
later prompt can branch: at message boundaries, before the last token of each prompt, at its end
and at the end of each completion. After a completion the entry holds prompt + completion without
the final stop token (the next harmony turn renders <|return|> as <|end|>).

Decode path (`Engine._use_compiled`, the one rule): a single request decodes with the model's
compiled single-token step (oss_mlx.decode, `model.decoder()`, built once per model and reused
for every request), on the decoder's own caches: prefill fills mlx-lm's caches (the prompt
cache's kind), which are converted to the decoder's before the first step (decode.to_decoder)
and back (decode.to_mlx_lm) for each snapshot taken at a generated <|end|> and before the cache
goes back to the prompt cache, sharing the arrays (see oss_mlx.decode). The plain forward
(`model(tokens, cache)`) stays for `compiled=False` (`--no-compile`), quantized KV caches
(`--kv-bits`), a model split across ranks (oss_mlx.shard), a model without a `decoder()` of its
own (the tests' ScriptedModel, a wrapper that watches a model's calls) and the batcher
(oss_mlx.batch). Both give the same tokens and logits
(1e-5 in float32; tests/test_engine_compiled.py).

Exact token history (oss_mlx.token_history): `render` writes the assistant messages this engine
generated as the tokens it sampled, so the next prompt matches the cache through the end of the
previous completion, even when a client re-serialised the tool call's JSON arguments.

A scheduler driving several requests uses the same three steps as `stream`:
    cache, n = engine.acquire(prompt, key)              # private; holds prompt[:n]
    for done in engine.prefill_steps(prompt, cache, n, cancel): ...  # chunk by chunk
    ... feed prompt[-1], engine.snapshot(cache, len(prompt)), then the sampled tokens
        (engine.snapshot(cache, pos) after each <|end|> fed) ...
    engine.release(tokens, cache, key)                  # prompt + generated, no stop token

One engine serves one request at a time (a lock); `stream` is a generator, so errors such as a
prompt longer than the context (OssMlxError) are raised at the first `next()`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

from openai_harmony import HarmonyError, Message, Role, StreamableParser, StreamState

from . import harmony
from .errors import OssMlxError

# Tokens that close a message in harmony's parser (its stop_tokens(), spec 5.6).
_CLOSERS = (harmony.END, harmony.RETURN, harmony.CALL)

STOP_REASONS = ("stop", "tool_call", "length", "context", "cancelled", "malformed")


@dataclass
class SamplingParams:
    """Sampling settings; the defaults are OpenAI's recommendation (temperature 1, top-p 1).

    temperature 0 means greedy (argmax). top_k 0 and min_p 0 mean off. seed: the same seed gives
    the same tokens. max_tokens None means: until a stop token or the end of the context.
    logits_processors: mlx-lm style callables `processor(tokens, logits) -> logits`, applied in
    order before sampling; `tokens` (mx.array) are the tokens sampled so far in this turn (e.g.
    oss_mlx.constrain's grammar constraint).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    # mlx-lm style (tokens: mx.array, logits: mx.array) -> logits, applied before sampling.
    logits_processors: list = field(default_factory=list)
    # Which conversation the request continues (a Responses prompt_cache_key or a `user`): a
    # hint for the prompt cache; it travels with the settings through any scheduler.
    cache_key: Optional[str] = None


@dataclass
class Stats:
    """Figures for one request. prefill_tps counts only the tokens actually prefilled
    (prompt_tokens - cached_tokens); ttft_s runs from the request to the first sampled token."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_bytes: int = 0
    total_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    """What one assistant turn produced.

    analysis / final: the text on those channels (several messages joined by a newline; a message
    with no channel, e.g. a bare refusal, counts as final). commentary: user-visible preambles
    (commentary without a recipient). tool_calls: [{"name": "get_weather", "recipient":
    "functions.get_weather", "arguments": '<JSON text as the model wrote it>', "channel":
    "commentary", "content_type": "<|constrain|>json"}] for each finished message to a recipient.
    messages: the finished openai_harmony.Messages, ready to append to the history, plus, when the
    turn was cut (length/context/cancelled/malformed), the unfinished final-channel message (an
    unfinished analysis or tool call is left out). tokens: the sampled token ids, stop token
    included.
    """

    analysis: str = ""
    final: str = ""
    commentary: str = ""
    tool_calls: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    stop_reason: str = "stop"
    stats: Stats = field(default_factory=Stats)
    tokens: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The `oss-mlx generate --json` object."""
        return {
            "analysis": self.analysis,
            "final": self.final,
            "tool_calls": [dict(c) for c in self.tool_calls],
            "stop_reason": self.stop_reason,
            "stats": self.stats.to_dict(),
            "tokens": list(self.tokens),
        }


@dataclass
class Event:
    type: str  # "delta" | "message" | "done"
    channel: Optional[str] = None
    recipient: Optional[str] = None
    text: str = ""
    message: Optional[Message] = None
    completion: Optional[Completion] = None


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

    def __init__(self, model, encoding, prefill_chunk: int = 512, max_snapshots: int = 96,
                 cache_memory: int | None = None, cache_dir=None, cache_disk: int = 16 << 30,
                 compiled: bool = True):
        from .prompt_cache import DiskCache, PromptCache
        from .token_history import TokenHistory

        self.model = model
        self.encoding = encoding
        self.prefill_chunk = prefill_chunk
        self.compiled = compiled  # False: always the plain forward (--no-compile)
        self._lock = threading.Lock()
        self.fingerprint = model_fingerprint(model)
        self.history = TokenHistory(encoding)
        disk = None
        if cache_dir:
            disk = DiskCache(cache_dir, self.fingerprint, cache_disk, self._history_of)
            for stub in disk.entries():  # so the first prompt after a restart matches them
                self._remember_history(stub)
        self.prompt_cache = PromptCache(model.make_cache, cache_memory, max_snapshots, disk)
        self._stop = set(encoding.stop_tokens_for_assistant_actions())  # <|return|>, <|call|>
        import mlx_lm.generate  # noqa: F401 - slow first import; keep it out of the first TTFT

    def _history_of(self, entry) -> dict:
        """What to save beside a prompt-cache entry: the sampled tokens of its messages."""
        return {"history": self.history.export([int(t) for t in entry.tokens])}

    def _remember_history(self, entry):
        self.history.load(entry.extra.get("history", []))

    @classmethod
    def load(cls, model: str, dtype=None, **kwargs) -> "Engine":
        """Load a converted model folder or a model-store name; never touches the network."""
        folder = resolve_model_dir(model)
        encoding = harmony.load_encoding(folder)  # fails fast, before the weights load
        from .model import default_dtype, load

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
        from .prompt_cache import save_entry

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
        from .prompt_cache import load_entry

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

        room = self.max_context - len(prompt)
        if params.max_tokens is not None and params.max_tokens <= room:
            limit, limit_reason = max(int(params.max_tokens), 0), "length"
        else:
            limit, limit_reason = room, "context"
        sample = _make_sampler(params, turn_start=len(prompt))
        if params.seed is not None:
            mx.random.seed(params.seed)
        mx.reset_peak_memory()
        stats = Stats(prompt_tokens=len(prompt))
        out = _Collector(self.encoding)
        cache, start = self.acquire(prompt, key)
        stats.cached_tokens = start
        tokens = list(prompt[:start])  # what `cache` holds, in order
        decoder = self.model.decoder() if self._use_compiled(cache) else None

        def step(y):
            with mx.stream(generation_stream):
                if decoder is not None:  # `cache` holds the decoder's caches while decoding
                    logits = decoder(y[None], cache)
                else:
                    logits = self.model(y[None], cache=cache)[:, -1, :]
                return sample(tokens, logits, y)  # y is fed, not yet read (nor in `tokens`)

        stop_reason = None
        try:
            with wired_limit(self.model, [generation_stream]):
                t_prefill = time.perf_counter()
                if limit > 0:
                    with mx.stream(generation_stream):
                        if decoder is not None:  # the full layers' buffers, on its grid
                            decoder.presize(cache, len(prompt) + 1)
                        for done in self.prefill_steps(prompt, cache, start, cancel):
                            tokens = list(prompt[: start + done])
                    if len(tokens) < len(prompt) - 1:
                        stop_reason = "cancelled"
                else:
                    stop_reason = limit_reason
                if stop_reason is None:
                    stop_reason = yield from self._decode(prompt, cache, tokens, step, sample,
                                                          limit, limit_reason, cancel, out,
                                                          stats, t0, t_prefill,
                                                          decoder is not None)
        except GeneratorExit:
            # The consumer stopped at an event: the cache and `tokens` agree; keep them.
            self.release(tokens, cache, key)
            raise
        mx.synchronize()
        if stop_reason in ("stop", "tool_call") and tokens and tokens[-1] in self._stop:
            # The pipeline fed the stop token; the next turn renders <|return|> as <|end|>.
            tokens.pop()
        self.release(tokens, cache, key)
        self.history.remember(prompt[-2:], out.tokens, out.done)
        stats.total_s = time.perf_counter() - t0
        stats.peak_memory_bytes = int(mx.get_peak_memory())
        completion = out.finish(stop_reason, stats)
        yield from out.drain()
        yield Event("done", completion=completion)

    def _decode(self, prompt, cache, tokens, step, sample, limit, limit_reason, cancel, out,
                stats, t0, t_prefill, compiled: bool = False):
        """Sample up to `limit` tokens after the prompt, appending to `tokens` each one fed to
        the model (the pipeline feeds a token before it is read; the last one of the limit is
        never fed); returns the stop reason. `compiled`: `step` runs the compiled decoder, so
        `cache` (prefilled on mlx-lm's caches) holds the decoder's caches from the first step
        on, and mlx-lm's again for each snapshot and when this returns or is closed."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        from .decode import to_decoder, to_mlx_lm

        with mx.stream(generation_stream):
            y = sample(tokens + prompt[-1:], self._last_logits(prompt, cache))
            if compiled:
                cache[:] = to_decoder(cache, self.max_context)  # in place: keeps its snapshots
        tokens.append(prompt[-1])
        mx.async_eval(y)
        try:
            return (yield from self._sample_loop(prompt, cache, tokens, step, y, limit,
                                                 limit_reason, cancel, out, stats, t0,
                                                 t_prefill, compiled))
        finally:
            if compiled:
                cache[:] = to_mlx_lm(cache)  # what the prompt cache keeps

    def _snapshot_decoding(self, cache: list, pos: int, compiled: bool):
        """A snapshot while decoding; the prompt cache snapshots mlx-lm's rotating caches."""
        from .decode import to_decoder, to_mlx_lm

        if compiled:
            cache[:] = to_mlx_lm(cache)
        self.snapshot(cache, pos)
        if compiled:
            cache[:] = to_decoder(cache, self.max_context)  # the same arrays back: no data moves

    def _sample_loop(self, prompt, cache, tokens, step, y, limit, limit_reason, cancel, out,
                     stats, t0, t_prefill, compiled):
        import mlx.core as mx

        n = 0
        while True:
            # Queue the next step before reading this token, so the device never waits.
            fed = n + 1 < limit
            if fed:
                next_y = step(y)
                mx.async_eval(next_y)
            tok = int(y.item())
            if n == 0:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
                prefilled = len(prompt) - stats.cached_tokens
                stats.prefill_tps = prefilled / max(t_first - t_prefill, 1e-9)
            n += 1
            if fed:
                tokens.append(tok)
                if tok == harmony.END:  # a message boundary: a later prompt may branch here
                    self._snapshot_decoding(cache, len(tokens), compiled)
            reason = out.feed(tok, self._stop)
            yield from out.drain()
            if reason is None and n >= limit:
                reason = limit_reason
            if reason is None and cancel is not None and cancel.is_set():
                reason = "cancelled"
            if reason is not None:
                break
            if n % 256 == 0:
                mx.clear_cache()
            y = next_y
        stats.generated_tokens = n
        if n > 1:
            stats.decode_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9)
        return reason


def _make_sampler(params: SamplingParams, turn_start: int = 0):
    """sample(tokens, logits [1, V], last=None) -> token [1], with params.logits_processors
    applied first (mlx-lm style callables (tokens: mx.array, logits) -> logits); the processors
    see this turn's tokens: `tokens` (prompt and generated so far) less the first `turn_start`
    (the prompt), then `last`, a token array not yet read. Building that array costs a few
    tokens per step, not the whole prompt's."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p,
                           top_k=params.top_k)
    processors = list(params.logits_processors or [])

    def sample(tokens, logits, last=None):
        logits = logits.astype(mx.float32)
        if processors:
            history = mx.array(tokens[turn_start:], dtype=mx.int32)
            if last is not None:
                history = mx.concatenate([history, last.reshape(-1).astype(mx.int32)])
            for p in processors:
                logits = p(history, logits)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return sample


def _chunk_plan(prompt: list[int], start: int, end: int, chunk: int) -> list[tuple[int, bool]]:
    """Where prefill chunks of prompt[start:end] end, and whether to snapshot there: at most
    `chunk` tokens each, also ending after every message closer (a later prompt may branch at a
    message boundary: a dropped analysis, an edited turn) and at `end`."""
    cuts = {p + 1 for p in range(start, end) if prompt[p] in _CLOSERS}
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


class _Collector:
    """Feeds sampled tokens to harmony's StreamableParser and turns them into events.

    Lenient where the model is sloppy but the meaning is clear (a message with no header before
    its stop token, a stray <|end|> or stop token between messages); everything else that breaks
    the grammar ends the turn as "malformed", keeping what was parsed.
    """

    def __init__(self, encoding):
        self.enc = encoding
        self.parser = StreamableParser(encoding, Role.ASSISTANT, strict=False)
        self.tokens: list[int] = []
        self.events: list[Event] = []
        self.done: list[Message] = []  # finished messages
        self.streamed = ""  # text of the current message already sent as deltas
        # The parser's state, tracked here: StreamableParser.state serialises the whole current
        # message, which would make each token cost O(message length).
        self.state = StreamState.HEADER  # the prompt ended with <|start|>assistant

    def drain(self):
        events, self.events = self.events, []
        return events

    def _close(self) -> bool:
        """Record the message the parser just closed; False if it closed none."""
        messages = self.parser.messages
        if len(messages) <= len(self.done):
            return False
        msg = messages[-1]
        text = harmony.message_text(msg)
        if len(text) > len(self.streamed) and text.startswith(self.streamed):
            # e.g. a header-less message: its text only appears when it closes.
            self.events.append(Event("delta", msg.channel, msg.recipient, text[len(self.streamed):]))
        self.streamed = ""
        self.done.append(msg)
        self.events.append(Event("message", msg.channel, msg.recipient, text, message=msg))
        return True

    def feed(self, tok: int, stop: set) -> Optional[str]:
        """Process one sampled token; returns a stop reason when the turn ends."""
        self.tokens.append(tok)
        state = self.state
        if tok in stop or tok == harmony.ENDOFTEXT:
            if state == StreamState.EXPECT_START:
                # A stop right after <|end|>: the turn is complete (seen as HTTP 500s elsewhere).
                return "stop"
            if tok == harmony.ENDOFTEXT:
                # Not a harmony stop token, but the end of text: close what is open.
                if state != StreamState.CONTENT or not self._eos():
                    return "malformed"
                return "stop"
            if not self._process(tok) or not self._close():
                return "malformed"
            return "tool_call" if tok == harmony.CALL and harmony.is_tool_call(self.done[-1].recipient) else "stop"
        if state == StreamState.EXPECT_START:
            if tok == harmony.END:
                return None  # a doubled <|end|>: nothing to close
            if tok != harmony.START:
                return "malformed"
        if state == StreamState.CONTENT and tok != harmony.END and self.enc.is_special_token(tok):
            return "malformed"  # a control token inside a message: never leak it as text
        if not self._process(tok):
            return "malformed"
        if state != StreamState.EXPECT_START and self.state == StreamState.EXPECT_START:
            self._close()
        elif self.state == StreamState.CONTENT:
            delta = self.parser.last_content_delta
            if delta:
                self.streamed += delta
                self.events.append(
                    Event("delta", self.parser.current_channel, self.parser.current_recipient, delta)
                )
        return None

    def _process(self, tok) -> bool:
        try:
            self.parser.process(tok)
        except HarmonyError:
            return False
        if self.state == StreamState.EXPECT_START:
            self.state = StreamState.HEADER  # only <|start|> gets here
        elif tok in _CLOSERS:
            self.state = StreamState.EXPECT_START
        elif tok == harmony.MESSAGE and self.state == StreamState.HEADER:
            self.state = StreamState.CONTENT
        return True

    def _eos(self) -> bool:
        try:
            self.parser.process_eos()
        except HarmonyError:
            return False
        self.state = StreamState.EXPECT_START
        return self._close()

    def finish(self, stop_reason: str, stats: Stats) -> Completion:
        messages = list(self.done)
        partial = None
        if stop_reason not in ("stop", "tool_call"):
            try:
                if self.state == StreamState.CONTENT and self.parser.current_content:
                    partial = Message.from_role_and_content(Role.ASSISTANT, self.parser.current_content)
                    partial.channel = self.parser.current_channel
                    partial.recipient = self.parser.current_recipient
                    partial.content_type = self.parser.current_content_type
            except HarmonyError:  # pragma: no cover - parser left in a broken state
                partial = None
        texts = {"analysis": [], "final": [], "commentary": []}
        calls = []
        for m in messages + ([partial] if partial is not None else []):
            if m.author.role != Role.ASSISTANT:
                continue
            text = harmony.message_text(m)
            if harmony.is_tool_call(m.recipient):
                if m is not partial:
                    calls.append({
                        "name": harmony.function_name(m.recipient) or m.recipient,
                        "recipient": m.recipient,
                        "arguments": text,
                        "channel": m.channel,
                        "content_type": m.content_type,
                    })
            elif m.channel in (None, "final"):
                texts["final"].append(text)
            elif m.channel in texts:
                texts[m.channel].append(text)
        if partial is not None and partial.channel in (None, "final") and not harmony.is_tool_call(partial.recipient):
            messages.append(partial.with_channel("final"))
        return Completion(
            analysis="\n".join(texts["analysis"]),
            final="\n".join(texts["final"]),
            commentary="\n".join(texts["commentary"]),
            tool_calls=calls,
            messages=messages,
            stop_reason=stop_reason,
            stats=stats,
            tokens=list(self.tokens),
        )


def resolve_model_dir(model):
    """A converted model folder from a path or a model-store name (oss_mlx.store); offline."""
    from .store import resolve_model

    return resolve_model(model)

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

Prompt cache: the engine keeps the KV cache of its last request and the token list it holds. A new
prompt that shares a prefix with it prefills only the rest (`Stats.cached_tokens`). The sliding
layers' rotating caches cannot be rolled back once they wrapped, so the engine keeps a few copies of
their state (a few MB each) before the last token of each prompt and at the end of each completion, and restores the
best one. After a completion the cache holds prompt + completion without the final stop token,
so the next harmony turn (which renders <|return|> as <|end|> and drops the analysis) reuses
either everything up to there or the previous prompt but its last token (where the prefill
snapshot is taken, so that the same prompt again also reuses all but one token).

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
    """

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    seed: Optional[int] = None
    max_tokens: Optional[int] = None


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


# ---- KV cache helpers ---------------------------------------------------------------------


def _copy_cache(c):
    """A copy of one cache object whose arrays are new array objects.

    MLX slice assignment (`keys[..., i, :] = k`, used by the caches) rebinds the array object it
    is applied to, so a copy must hold different array objects to stay untouched.
    """
    import mlx.core as mx

    new = object.__new__(type(c))
    new.__dict__ = {
        k: (mx.array(v) if isinstance(v, mx.array) else v) for k, v in c.__dict__.items()
    }
    return new


def _is_rotating(c) -> bool:
    from mlx_lm.models.cache import RotatingKVCache

    return isinstance(c, RotatingKVCache)


def _undo_last_token(c):
    """Forget the last token fed one at a time (the stop token the pipeline already fed).

    A wrapped rotating cache is not trimmable in general, but right after a single-token write
    the slot it overwrote held the token that just left the window, which no later query sees; so
    moving the write index and offset back one is exact (the next single-token write reuses the
    slot; a multi-token update treats the slot as the oldest entry and drops it).
    """
    if c.is_trimmable():
        c.trim(1)
    elif _is_rotating(c):
        c.offset -= 1
        c._idx -= 1
    else:  # pragma: no cover - a cache type we do not know how to roll back
        raise RuntimeError(f"cannot roll back a {type(c).__name__}")


@dataclass
class _Snapshot:
    pos: int  # number of cached tokens when taken
    layers: dict  # layer index -> copy of a rotating cache


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Generation over one model and its harmony encoding, with a reusable prompt cache."""

    def __init__(self, model, encoding, prefill_chunk: int = 512, max_snapshots: int = 4):
        self.model = model
        self.encoding = encoding
        self.prefill_chunk = prefill_chunk
        self.max_snapshots = max_snapshots
        self._lock = threading.Lock()
        self._cache = None
        self._cached: list[int] = []  # tokens whose K/V the cache holds, in order
        self._snapshots: list[_Snapshot] = []
        self._stop = set(encoding.stop_tokens_for_assistant_actions())  # <|return|>, <|call|>
        import mlx_lm.generate  # noqa: F401 - slow first import; keep it out of the first TTFT

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
        return int(self.model.config.max_context)

    # ---- prompts ----

    def render(self, conversation) -> list[int]:
        """Prompt tokens for a Conversation (see harmony.render_prompt)."""
        return harmony.render_prompt(self.encoding, conversation)

    def reset_cache(self):
        """Forget the prompt cache (the next request starts cold)."""
        with self._lock:
            self._cache, self._cached, self._snapshots = None, [], []

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens the prompt cache holds now (a copy)."""
        return list(self._cached)

    def _check_fits(self, prompt: list[int]):
        if len(prompt) == 0:
            raise OssMlxError("empty prompt")
        if len(prompt) >= self.max_context:
            raise OssMlxError(
                f"context_length_exceeded: the prompt is {len(prompt)} tokens and the model's "
                f"context is {self.max_context} tokens; shorten the conversation"
            )

    def _snapshot(self):
        layers = {i: _copy_cache(c) for i, c in enumerate(self._cache) if _is_rotating(c)}
        if not layers:
            return
        import mlx.core as mx

        mx.eval([a for c in layers.values() for a in c.__dict__.values() if isinstance(a, mx.array)])
        pos = len(self._cached)
        self._snapshots = [s for s in self._snapshots if s.pos != pos] + [_Snapshot(pos, layers)]
        self._snapshots = sorted(self._snapshots, key=lambda s: s.pos)[-self.max_snapshots :]

    def _rewind(self, n: int) -> bool:
        """Make the cache hold exactly self._cached[:n] (or fewer); False means start cold."""
        drop = len(self._cached) - n
        if drop == 0:
            return True
        if all(c.is_trimmable() for c in self._cache):
            for c in self._cache:
                c.trim(drop)
            self._cached = self._cached[:n]
            self._snapshots = [s for s in self._snapshots if s.pos <= n]
            return True
        best = max((s for s in self._snapshots if s.pos <= n), key=lambda s: s.pos, default=None)
        if best is None or best.pos == 0:
            return False
        for i, c in enumerate(self._cache):
            if i in best.layers:
                self._cache[i] = _copy_cache(best.layers[i])
            else:
                c.trim(len(self._cached) - best.pos)
        self._cached = self._cached[: best.pos]
        self._snapshots = [s for s in self._snapshots if s.pos <= best.pos]
        return True

    def _prepare(self, prompt: list[int]) -> int:
        """Point the cache at the longest reusable prefix of `prompt`; returns its length.

        At least the last prompt token is always fed again, for its logits.
        """
        n = min(_common_prefix(self._cached, prompt), len(prompt) - 1)
        if self._cache is None or n == 0 or not self._rewind(n):
            self._cache = self.model.make_cache()
            self._cached, self._snapshots = [], []
        return len(self._cached)

    def _prefill(self, tokens: list[int]):
        """Feed `tokens` after what is cached; returns the logits [1, V] of the last one.

        All but the last token go first and the rotating caches are snapshotted there, so the
        same prompt again, or one that continues it differently, can restore that point and
        still get the last token's logits.
        """
        import mlx.core as mx

        if len(tokens) > 1:
            # Only fills the cache: no [T, vocab] unembedding for logits nobody reads.
            self.model.prefill(
                mx.array(tokens[:-1])[None], self._cache, self.prefill_chunk, logits=False
            )
            self._cached += tokens[:-1]
            self._snapshot()
            tokens = tokens[-1:]
        logits = self.model.prefill(mx.array(tokens)[None], self._cache, self.prefill_chunk)
        self._cached += tokens
        return logits

    def logits(self, prompt: list[int]):
        """Logits [V] (float32) of the last position of `prompt`, through the prompt cache.

        For scoring and tests: the same reuse path as `stream`, so comparing with a cold model
        checks the cache machinery.
        """
        import mlx.core as mx

        self._check_fits(prompt)
        with self._lock:
            start = self._prepare(prompt)
            out = self._prefill(prompt[start:])[0].astype(mx.float32)
            mx.eval(out)
            return out

    # ---- generation ----

    def complete(self, conversation, params: SamplingParams | None = None, cancel=None) -> Completion:
        """Run `stream` to the end and return its Completion."""
        for ev in self.stream(conversation, params, cancel):
            if ev.type == "done":
                return ev.completion
        raise RuntimeError("stream ended without a done event")  # pragma: no cover

    def stream(self, conversation, params: SamplingParams | None = None, cancel=None) -> Iterator[Event]:
        """Generate one assistant turn, yielding delta / message events and a final done event.

        conversation: an openai_harmony.Conversation (see harmony.build_conversation), a list of
        Messages, or already-rendered prompt tokens (list of ints). cancel: a threading.Event;
        when set, generation stops before the next token with stop_reason "cancelled".
        """
        params = params or SamplingParams()
        t0 = time.perf_counter()
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], int):
            prompt = list(conversation)
        else:
            prompt = self.render(conversation)
        self._check_fits(prompt)
        with self._lock:
            try:
                yield from self._generate(prompt, params, cancel, t0)
            except GeneratorExit:
                raise  # the consumer stopped at an event: the cache and its token list agree
            except BaseException:
                # Interrupted between a cache update and its bookkeeping (e.g. Ctrl-C): forget it.
                self._cache, self._cached, self._snapshots = None, [], []
                raise

    def _generate(self, prompt, params, cancel, t0):
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, wired_limit
        from mlx_lm.sample_utils import make_sampler

        room = self.max_context - len(prompt)
        if params.max_tokens is not None and params.max_tokens <= room:
            limit, limit_reason = max(int(params.max_tokens), 0), "length"
        else:
            limit, limit_reason = room, "context"
        sampler = make_sampler(
            temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
        )
        if params.seed is not None:
            mx.random.seed(params.seed)
        mx.reset_peak_memory()
        stats = Stats(prompt_tokens=len(prompt))
        out = _Collector(self.encoding)

        def sample(logits):
            logits = logits.astype(mx.float32)
            return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

        def step(y):
            with mx.stream(generation_stream):
                return sample(self.model(y[None], cache=self._cache)[:, -1, :])

        stop_reason = None
        fed_last = False  # whether the last sampled token was fed to the model (pipelining)
        with wired_limit(self.model, [generation_stream]):
            start = self._prepare(prompt)
            stats.cached_tokens = start
            if limit == 0:
                stop_reason = limit_reason
            else:
                t_prefill = time.perf_counter()
                with mx.stream(generation_stream):
                    y = sample(self._prefill(prompt[start:]))
                mx.async_eval(y)
                n = 0
                while True:
                    # Queue the next step before reading this token, so the device never waits.
                    fed_last = n + 1 < limit
                    if fed_last:
                        next_y = step(y)
                        mx.async_eval(next_y)
                    tok = int(y.item())
                    if n == 0:
                        t_first = time.perf_counter()
                        stats.ttft_s = t_first - t0
                        stats.prefill_tps = (len(prompt) - start) / max(t_first - t_prefill, 1e-9)
                    if fed_last:
                        self._cached.append(tok)
                    n += 1
                    stop_reason = out.feed(tok, self._stop)
                    yield from out.drain()
                    if stop_reason is None and n >= limit:
                        stop_reason = limit_reason
                    if stop_reason is None and cancel is not None and cancel.is_set():
                        stop_reason = "cancelled"
                    if stop_reason is not None:
                        break
                    if n % 256 == 0:
                        mx.clear_cache()
                    y = next_y
                stats.generated_tokens = n
                if n > 1:
                    stats.decode_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9)
            mx.synchronize()
            # Keep the cache at prompt + completion without its stop token: the next turn renders
            # that token differently (<|return|> -> <|end|>), or identically (<|call|>).
            if fed_last and stop_reason in ("stop", "tool_call") and out.tokens[-1] in self._stop:
                for c in self._cache:
                    _undo_last_token(c)
                self._cached.pop()
            self._snapshot()
        stats.total_s = time.perf_counter() - t0
        stats.peak_memory_bytes = int(mx.get_peak_memory())
        completion = out.finish(stop_reason, stats)
        yield from out.drain()
        yield Event("done", completion=completion)


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

"""One request in flight: its token limit, its sampler, its harmony parser, its stop handling and
its figures: what the request loop (engine/loop.py) keeps of each row, so a request ends,
counts and reports the same way alone or beside others.

    req = Request.start(prompt, params, encoding, max_context, cached=n, cancel=event)
    reason = req.emit(token)                # each sampled token: None, or why the turn ends
    events = req.parser.drain()             # the events it produced, delivered, then
    reason = req.stop_reason(reason)        # ... "cancelled" if the cancel event is set
    kept = req.kept_tokens(tokens, reason)  # what the prompt cache keeps (no final stop token)
    completion = req.finish(reason)         # stats filled in
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from oss_mlx.engine.sampling import Sampler
from oss_mlx.engine.types import Completion, SamplingParams, Stats
from oss_mlx.harmony.encoding import STOPS
from oss_mlx.harmony.parser import TurnParser


def token_limit(params: SamplingParams, prompt_tokens: int, max_context: int) -> tuple[int, str]:
    """(most tokens to sample, the stop reason when they run out): max_tokens when it fits in
    what the context has left ("length"), else the rest of the context ("context")."""
    room = max_context - prompt_tokens
    if params.max_tokens is not None and params.max_tokens <= room:
        return max(int(params.max_tokens), 0), "length"
    return room, "context"


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    parser: TurnParser
    limit: int
    limit_reason: str
    stats: Stats
    cancel: Any = None  # a threading.Event (or anything with is_set()), or None
    t0: float = field(default_factory=time.perf_counter)
    t_prefill: float = 0.0
    t_first: float = 0.0

    @classmethod
    def start(cls, prompt: list[int], params: SamplingParams | None, encoding, max_context: int,
              cached: int = 0, cancel=None, t0: float | None = None) -> "Request":
        params = params or SamplingParams()
        limit, reason = token_limit(params, len(prompt), max_context)
        req = cls(list(prompt), params, Sampler(params), TurnParser(encoding), limit, reason,
                  Stats(prompt_tokens=len(prompt), cached_tokens=cached), cancel)
        if t0 is not None:
            req.t0 = t0
        req.t_prefill = time.perf_counter()
        return req

    @property
    def generated(self) -> list[int]:
        """The tokens sampled so far."""
        return self.parser.tokens

    def history(self, last=None):
        """This turn's tokens so far as an mx.array (what SamplingParams.logits_processors
        see), with `last`, a sampled token array not yet read, after them."""
        import mlx.core as mx

        tokens = mx.array(self.parser.tokens, dtype=mx.int32)
        if last is None:
            return tokens
        return mx.concatenate([tokens, last.reshape(-1).astype(mx.int32)])

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def emit(self, tok: int) -> Optional[str]:
        """One sampled token: fed to the parser (its events wait in `parser.drain()`); returns
        the stop reason when the turn ends here: the harmony stream's or the token limit's.
        Cancellation is asked after the events are delivered (`stop_reason`)."""
        if not self.parser.tokens:
            self.t_first = time.perf_counter()
            self.stats.ttft_s = self.t_first - self.t0
            prefilled = self.stats.prefilled_tokens
            self.stats.prefill_tps = prefilled / max(self.t_first - self.t_prefill, 1e-9)
        reason = self.parser.feed(tok)
        if reason is None and len(self.parser.tokens) >= self.limit:
            reason = self.limit_reason
        return reason

    def stop_reason(self, reason: Optional[str]) -> Optional[str]:
        """`reason`, or "cancelled" when the cancel event is set: asked once a token's events
        were delivered, so a consumer that reacts to an event stops the turn at that token."""
        return "cancelled" if reason is None and self.cancelled else reason

    def kept_tokens(self, tokens: list[int], reason: str) -> list[int]:
        """What the prompt cache keeps of `tokens` (prompt + what was fed): without a final stop
        token, which the next harmony turn renders differently (<|return|> as <|end|>)."""
        if reason in ("stop", "tool_call") and tokens and tokens[-1] in STOPS:
            return tokens[:-1]
        return tokens

    def finish(self, reason: str) -> Completion:
        import mlx.core as mx

        s = self.stats
        s.generated_tokens = len(self.parser.tokens)
        if s.generated_tokens > 1:
            s.decode_tps = (s.generated_tokens - 1) / max(time.perf_counter() - self.t_first, 1e-9)
        s.total_s = time.perf_counter() - self.t0
        s.peak_memory_bytes = int(mx.get_peak_memory())
        return self.parser.finish(reason, s)

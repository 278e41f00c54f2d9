"""What the engine takes and gives: sampling settings, a request's figures, and (from the
harmony parser) the events of a turn and its Completion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from oss_mlx.harmony.parser import Completion, Event

__all__ = ["SamplingParams", "Stats", "Completion", "Event", "STOP_REASONS"]

# Completion.stop_reason: "stop" (<|return|>), "tool_call" (<|call|> to a tool: run it, append its
# result, call again), "length" (max_tokens), "context" (the context is full), "cancelled" (the
# cancel event was set), "malformed" (the model broke the harmony grammar; what was parsed is
# kept). <|end|> only closes a message.
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
    """Figures for one request. cached_tokens: the prompt's tokens the prompt cache held;
    prefilled_tokens: those computed (prompt_tokens - cached_tokens, fewer when cancelled during
    the prefill); prefill_tps counts only those; ttft_s runs from the request to the first
    sampled token."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_bytes: int = 0
    total_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

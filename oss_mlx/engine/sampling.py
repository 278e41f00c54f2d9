"""One sampler for every request, alone or in a batch: the logits processors (e.g. a grammar
constraint), then mlx-lm's sampling filters (top-p, min-p, top-k, in mlx-lm's `make_sampler`
order) and a categorical draw at the temperature, or the argmax at temperature 0.

Each request draws from its own key (mlx-lm's sampler reads MLX's one global random state,
which the rows of a batch would share): key(seed) split once per draw, as MLX's global generator
after mx.random.seed(seed), so a seeded request draws the same tokens alone or in any batch.
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from oss_mlx.engine.types import SamplingParams


def _filters(params: SamplingParams) -> list:
    """mlx-lm's make_sampler chain before its categorical draw (same order, same rules)."""
    out = []
    if 0 < params.top_p < 1.0:
        out.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p != 0.0:
        out.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        out.append(lambda x: apply_top_k(x, params.top_k))
    return out


class Sampler:
    """`sampler(history, logits [1, V]) -> token [1]`. `history()` gives this turn's tokens so
    far as an mx.array; it is only called when a logits processor needs it."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.processors = list(params.logits_processors or [])
        self.filters = _filters(params)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.key = mx.random.key(seed)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply first: a batch of such rows takes one argmax."""
        return self.params.temperature == 0 and not self.processors

    def __call__(self, history: Callable[[], mx.array], logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if self.processors:
            tokens = history()
            for processor in self.processors:
                logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.params.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        for f in self.filters:
            logprobs = f(logprobs)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1.0 / self.params.temperature), key=sub)

"""Steering a random-weight model into constrained messages, for the constrain tests.

A random model never writes `<|channel|>final<|message|>` or a tool call's header by itself, and
inside a JSON string it almost never samples the closing quote. Two test-only logits processors
fix that without touching what is being tested:

- `Forced(prefix)` allows only the next token of a scripted harmony prefix (the header), then
  lets the model go; the constraint under test sees these tokens like any other.
- `short_json_bias` adds a large bias to tokens made only of JSON punctuation and digits (most to
  those that close a string or a container) and to the closing tokens. It runs AFTER the
  constraint, so it only reorders the tokens the constraint allowed (-inf + bias is -inf): every
  token still comes from the constraint's mask, and the output stays short. Without the
  constraint the same bias makes the model write invalid JSON at once (the tests check that).
"""

from __future__ import annotations

import dataclasses
import functools

import mlx.core as mx
import numpy as np

from oss_mlx import harmony
from oss_mlx.engine import Engine

FINAL = "<|channel|>final<|message|>"
WEATHER_CALL = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"


def tokens(encoding, text: str) -> list[int]:
    return encoding.encode(text, allowed_special="all")


class Forced:
    """Allows only prefix[k] as the k-th token of the turn, then nothing is forced."""

    def __init__(self, prefix: list[int]):
        self.prefix = prefix

    def __call__(self, toks, logits):
        k = len(toks)
        if k >= len(self.prefix):
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == self.prefix[k], logits, -mx.inf)


@functools.lru_cache(maxsize=2)
def _bias_vector(encoding) -> mx.array:
    decode = encoding._inner.decode_bytes
    bias = np.zeros(201088, dtype=np.float32)
    for i in range(199998):
        b = decode([i])
        if b and all(c in b'"{}[],:.@-+Z0123456789' for c in b):
            bias[i] = 40.0 if any(c in b for c in b'"}]Z@') else 30.0
    bias[[harmony.RETURN, harmony.CALL]] = 50.0
    return mx.array(bias)


def short_json_bias(encoding):
    vec = _bias_vector(encoding)
    return lambda toks, logits: logits + vec


class Steered(Engine):
    """The real engine, with a scripted header forced first and the short-JSON bias last, around
    whatever processors the caller (the server) put in the sampling parameters."""

    prefix: str = FINAL

    def stream(self, conversation, params=None, cancel=None, key=None, progress=None):
        procs = list(params.logits_processors) if params else []
        params = dataclasses.replace(params, logits_processors=[
            Forced(tokens(self.encoding, self.prefix)), *procs, short_json_bias(self.encoding)])
        return super().stream(conversation, params, cancel, key, progress)

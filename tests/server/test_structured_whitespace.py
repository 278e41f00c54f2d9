"""Structured outputs cannot be padded with whitespace: a model that would write whitespace
forever (it ranks every whitespace-only token above everything else) still ends its constrained
JSON in a few tokens, with at most one space between two JSON tokens and no newline (the
grammar's whitespace option, oss_mlx/harmony/constrain.py). Through the real server: a Chat
`response_format` and a tool call's arguments."""

from __future__ import annotations

import functools
import json
import re

import httpx
import mlx.core as mx
import numpy as np
import pytest
from support.scripted import ScriptedModel
from support.serverkit import ServerThread, StrictTransport

from oss_mlx import harmony
from oss_mlx.engine import Engine
from oss_mlx.server import create_app

MODEL = "scripted-oss"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "unit": {"enum": ["c", "f"]}},
          "required": ["ok", "unit"], "additionalProperties": False}


@functools.lru_cache(maxsize=1)
def preferences(encoding) -> mx.array:
    """Whitespace-only tokens first, then JSON punctuation and the closing tokens, then the
    rest (all equal)."""
    decode = encoding._inner.decode_bytes
    score = np.zeros(201088, dtype=np.float32)
    for i in range(199998):
        b = decode([i])
        if b and all(c in b" \t\r\n" for c in b):
            score[i] = 100.0
        elif b and all(c in b'"{}[],:' for c in b):
            score[i] = 40.0
    score[[harmony.RETURN, harmony.CALL]] = 50.0
    return mx.array(score)


class WhitespaceLover(ScriptedModel):
    """Writes its scripted header (a reply), then ranks its tokens by `preferences`."""

    def _forced(self, batch: int, length: int, tok: int):
        if self.pos <= len(self.reply):
            return super()._forced(batch, length, tok)
        return mx.broadcast_to(preferences(self.encoding), (batch, length, self.config.vocab_size))


@pytest.fixture(scope="module")
def server(encoding):
    model = WhitespaceLover(encoding=encoding)
    with ServerThread(create_app(Engine(model, encoding), MODEL)) as srv:
        srv.model = model
        srv.http = httpx.Client(base_url=srv.url, transport=StrictTransport(), timeout=60)
        yield srv
        srv.http.close()


def tight(text: str):
    assert not re.search(r"\s\s|\n", text), repr(text)
    assert len(text) < 60, repr(text)


def test_a_structured_answer_has_no_whitespace_runs(server):
    server.model.push("<|channel|>final<|message|>")
    r = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "ok?"}], "temperature": 0,
        "max_tokens": 200,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    tight(choice["message"]["content"])
    assert set(json.loads(choice["message"]["content"])) == {"ok", "unit"}


def test_tool_arguments_have_no_whitespace_runs(server):
    server.model.push("<|channel|>commentary to=functions.report <|constrain|>json<|message|>")
    r = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "report"}], "temperature": 0,
        "max_tokens": 200, "tools": [{"type": "function", "function": {
            "name": "report", "parameters": SCHEMA}}]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
    tight(arguments)
    assert set(json.loads(arguments)) == {"ok", "unit"}

"""Recorded agent traffic replayed through the real server: Codex CLI, opencode and qwen-code
sessions (tests/server/traffic/*.json, recorded with traffic/record.py from the real clients)
sent again, request by request, to `create_app` over the real Engine on a ScriptedModel giving
the replies recorded with them. Each follow-up request must reuse (cached tokens) at least 95% of
its longest common prefix with any earlier request of the session. Also: two conversations
interleaved ABABAB over the server, and a client disconnect stopping a long prefill.

    PYTHONPATH=tests python tests/server/test_agent_traffic.py   # the reuse table, per request
                                  # (another checkout: PYTHONPATH=OTHER:OTHER/tests python ...)
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
TRAFFIC = TESTS / "traffic"
sys.path.insert(0, str(TRAFFIC))

from record import sanitize  # noqa: E402
from support.scripted import ScriptedModel, vocab_dir  # noqa: E402
from support.serverkit import ServerThread  # noqa: E402

from oss_mlx.engine import Engine  # noqa: E402
from oss_mlx.harmony import load_encoding  # noqa: E402
from oss_mlx.server import create_app  # noqa: E402

SESSIONS = ["codex", "opencode", "qwen-code"]


def common_prefix(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class Recorder:
    """Wraps an engine: notes each request's prompt (as rendered) and its cached tokens."""

    def __init__(self, engine):
        self.engine, self.requests = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def render(self, conversation):
        tokens = self.engine.render(conversation)
        self.requests.append({"prompt": tokens})
        return tokens

    def stream(self, conversation, params=None, cancel=None, *args, **kw):
        for ev in self.engine.stream(conversation, params, cancel, *args, **kw):
            if ev.type == "done":
                stats = ev.completion.stats
                self.requests[-1].update(cached=stats.cached_tokens, ttft=stats.ttft_s)
            yield ev


def scripted_engine(encoding, **model_kw) -> Engine:
    return Engine(ScriptedModel(encoding=encoding, **model_kw), encoding)


def replay(session: dict, engine=None) -> list[dict]:
    """Send the session's requests in order; per request: prompt tokens, cached tokens, time to
    first token and the longest common prefix with any earlier request's prompt. `engine`: one
    whose model has push(reply) (default: a ScriptedModel over a vocabulary in a temporary
    folder, for the script below)."""
    if engine is None:
        enc = load_encoding(vocab_dir(tempfile.mkdtemp(prefix="oss-mlx-vocab-")))
        engine = scripted_engine(enc, max_context=131072)
    model, engine = engine.model, Recorder(engine)
    with ServerThread(create_app(engine, "scripted-oss")) as srv, httpx.Client(
            base_url=srv.url, timeout=120) as http:
        for req, reply in zip(session["requests"], session["replies"]):
            model.push(reply)
            r = http.post(req["path"], json=sanitize(req["body"]))
            assert r.status_code == 200, r.text[:500]
            r.read()
    out = []
    for i, r in enumerate(engine.requests):
        lcp = max((common_prefix(r["prompt"], e["prompt"]) for e in engine.requests[:i]),
                  default=0)
        out.append({"prompt": len(r["prompt"]), "cached": r.get("cached", 0), "lcp": lcp,
                    "ttft": r.get("ttft", 0.0)})
    return out


def load(name: str) -> dict:
    return json.loads((TRAFFIC / f"{name}.json").read_text())


@pytest.mark.parametrize("name", SESSIONS)
def test_recorded_session_reuses_its_common_prefix(name, encoding):
    session = load(name)
    rows = replay(session, scripted_engine(encoding, max_context=131072))
    assert len(rows) == len(session["requests"])
    for i, r in enumerate(rows[1:], 1):
        assert r["lcp"] > 0, (name, i, r)
        assert r["cached"] >= 0.95 * min(r["lcp"], r["prompt"] - 1), (name, i, rows)


def test_interleaved_conversations_over_the_server_all_hit(encoding):
    """A B A B A B: two chat conversations with different instructions, alternating; every
    follow-up resumes from all its conversation's previous prompt and answer."""
    enc = encoding
    model = ScriptedModel(encoding=enc)
    engine = Engine(model, enc)
    convs = {"A": [{"role": "system", "content": "You answer in French."}],
             "B": [{"role": "system", "content": "You answer in haiku, about the sea."}]}
    last = {}
    with ServerThread(create_app(engine, "scripted-oss")) as srv, httpx.Client(
            base_url=srv.url, timeout=60) as http:
        for i, name in enumerate("ABABAB"):
            convs[name].append({"role": "user", "content": f"question {i} for {name}"})
            model.push(f"<|channel|>analysis<|message|>Think {i}.<|end|>"
                       f"<|start|>assistant<|channel|>final<|message|>Answer {i}.<|return|>")
            body = {"model": "scripted-oss", "messages": convs[name]}
            r = http.post("/v1/chat/completions", json=body).json()
            usage = r["usage"]
            if name in last:
                # the previous prompt + its answer (without the stop token), analysis included:
                # harmony drops it from the new prompt only after it
                assert usage["prompt_tokens_details"]["cached_tokens"] >= last[name], (i, usage)
            convs[name].append({"role": "assistant",
                                "content": r["choices"][0]["message"]["content"]})
            last[name] = usage["prompt_tokens"]


def test_client_disconnect_stops_a_long_prefill(encoding):
    """A streaming client that goes away during a long prefill: the server's cancel reaches the
    engine between chunks (explicit synchronisation: the model's second chunk waits for the
    cancel event, then the engine must run no further chunk and never decode)."""
    enc = encoding
    entered, chunks = threading.Event(), []

    class Gate(ScriptedModel):
        cancel = None

        def prefill(self, tokens, cache, chunk_size=512, logits=True):
            chunks.append(tokens.shape[1])
            out = super().prefill(tokens, cache, chunk_size, logits)
            if len(chunks) == 2:
                entered.set()
                assert Gate.cancel.wait(timeout=60), "the disconnect never cancelled"
            return out

    model = Gate(encoding=enc, max_context=8192)
    engine = Engine(model, enc, prefill_chunk=64)
    steps = engine.prefill_steps

    def capture(prompt, cache, start, cancel=None):
        Gate.cancel = cancel
        return steps(prompt, cache, start, cancel)

    engine.prefill_steps = capture
    model.push("<|channel|>final<|message|>never<|return|>")
    body = {"model": "scripted-oss", "stream": True,
            "messages": [{"role": "user", "content": "word " * 2000}]}
    with ServerThread(create_app(engine, "scripted-oss")) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert entered.wait(timeout=60)
            # the response is closed here: the client has gone away
        assert Gate.cancel.wait(timeout=60)
        engine._lock.acquire(timeout=60)  # the engine finished with the request
        engine._lock.release()
    assert len(chunks) == 2 and model.fed == []  # no chunk after the cancel, no decode step



def test_prompt_cache_key_and_user_reach_the_prompt_cache(encoding):
    enc = encoding
    model = ScriptedModel(encoding=enc)
    engine = Engine(model, enc)
    answer = "<|channel|>final<|message|>ok<|return|>"
    with ServerThread(create_app(engine, "scripted-oss")) as srv, httpx.Client(
            base_url=srv.url, timeout=60) as http:
        model.push(answer)
        http.post("/v1/responses", json={"model": "scripted-oss", "input": "hi",
                                         "prompt_cache_key": "session-1"}).raise_for_status()
        model.push(answer)
        http.post("/v1/chat/completions", json={
            "model": "scripted-oss", "user": "alice",
            "messages": [{"role": "user", "content": "something else"}]}).raise_for_status()
    assert sorted(e.key for e in engine.prompt_cache.entries) == ["alice", "session-1"]


if __name__ == "__main__":
    for name in SESSIONS:
        rows = replay(load(name))
        print(f"{name}: request  prompt  cached  lcp-with-earlier  reuse-of-lcp")
        for i, r in enumerate(rows):
            frac = r["cached"] / max(min(r["lcp"], r["prompt"] - 1), 1) if i else float("nan")
            print(f"  {i:2d}  {r['prompt']:6d}  {r['cached']:6d}  {r['lcp']:6d}  {frac:6.1%}")

"""The prompt cache on the tiny model (window 8, so every prompt here wraps the rotating caches):
after any restore (memory or disk, from each kind of snapshot) the last-position logits and the
greedy tokens equal a cold start's, computed with no cache at all; many conversations interleaved;
eviction under a small budget; prefill cancellation between chunks."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from oss_mlx.engine import Engine, SamplingParams
from oss_mlx.harmony import build_conversation, render_prompt, user_message
from oss_mlx.engine.disk_cache import DiskCache, load_entry, save_entry
from oss_mlx.engine.kv_adapter import KVAdapter
from support.scripted import harmony_tokens

RETURN, END, START = 200002, 200007, 200006
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return Engine.load(str(tiny_model), dtype=mx.float32)


class Forced:
    """Wraps a model: decode step i's logits force script[i] (None: the model's own choice), so
    a turn of a random model writes messages (an <|end|> boundary, a <|return|>) like a real one
    while every K/V in the cache comes from the real model."""

    def __init__(self, model, script):
        self.inner, self.script, self.n = model, list(script), 0
        self.config, self.model_dir, self.dtype = model.config, model.model_dir, model.dtype
        self.prefills = 0

    def make_cache(self):
        return self.inner.make_cache()

    def _force(self, logits):
        tok = self.script[self.n] if self.n < len(self.script) else None
        self.n += 1
        if tok is None:
            return logits
        row = mx.where(mx.arange(logits.shape[-1]) == tok, 100.0, -100.0)
        return mx.broadcast_to(row, logits.shape)

    def prefill(self, tokens, cache, chunk_size=512, logits=True):
        self.n = 0
        self.prefills += 1
        out = self.inner.prefill(tokens, cache, chunk_size, logits=logits)
        return self._force(out) if logits else out

    def __call__(self, tokens, cache=None):
        return self._force(self.inner(tokens, cache))


def cold_logits(model, seq):
    """Reference: the whole sequence in one forward pass, no cache at all."""
    h = model.hidden(mx.array(seq)[None])[:, -1:]
    return np.array(model.unembedding(model.norm(h))[0, -1].astype(mx.float32))


def text(enc, s):
    return harmony_tokens(enc, s)


def first_turn(enc, engine):
    """Turn 1: a prompt and, forced by SCRIPT_TEXT, a completion with a message boundary inside
    it (an analysis message, <|end|>, then a final one closed by <|return|>)."""
    p1 = render_prompt(enc, build_conversation([user_message("w0 w1 w2 w3 w4 w5")], date=""))
    c1 = engine.complete(p1, GREEDY)
    assert c1.stop_reason == "stop" and c1.tokens[-1] == RETURN
    return p1, c1


SCRIPT_TEXT = ("<|channel|>analysis<|message|> one two three four five six seven<|end|>"
               "<|start|>assistant<|channel|>final<|message|> eight nine<|return|>")


@pytest.fixture(scope="module")
def turn1(tiny):
    """An engine after turn 1 (read only: each test restores copies of its entry)."""
    engine = Engine(Forced(tiny.model, text(tiny.encoding, SCRIPT_TEXT)), tiny.encoding,
                    prefill_chunk=5)
    return (engine, *first_turn(tiny.encoding, engine))


@pytest.mark.parametrize("kind", ["prompt-boundary", "prompt-end-1", "prompt-end",
                                  "completion-boundary", "completion-end", "first-chunk",
                                  "before-boundary"])
@pytest.mark.parametrize("where", ["memory", "disk"])
def test_restore_equals_cold_start_for_every_snapshot_kind(tiny, turn1, tmp_path, kind, where):
    enc, model = tiny.encoding, tiny.model
    engine, p1, c1 = turn1
    sampled = c1.tokens[:-1]
    boundary = p1.index(END) + 1  # the end of the system message
    end_analysis = len(p1) + sampled.index(END) + 1
    tail = text(enc, "<|start|>user<|message|> a different turn past the window<|end|>"
                     "<|start|>assistant")
    branches = {  # a follow-up prompt, and the snapshot it must resume from
        "prompt-boundary": (p1[:boundary] + tail, boundary),
        "prompt-end-1": (p1[:-1] + tail[1:], len(p1) - 1),
        "prompt-end": (p1 + text(enc, "<|channel|>final<|message|> short<|end|>") + tail, len(p1)),
        "completion-boundary": (p1 + sampled[: end_analysis - len(p1)] + tail, end_analysis),
        "completion-end": (p1 + sampled + [END] + tail, len(p1) + len(sampled)),
        # inside the first prefill chunk (5 tokens): its snapshot holds all of it
        "first-chunk": (p1[:3] + tail, 3),
        # past it, before the first boundary: back to the first chunk's end
        "before-boundary": (p1[:12] + tail, 5),
    }
    prompt, expect = branches[kind]

    def restored():
        """A fresh engine whose prompt cache holds turn 1 as `engine` left it (from a file for
        "disk"); its model decodes freely."""
        fresh = Engine(Forced(model, []), enc, prefill_chunk=5)
        entry = engine.prompt_cache.find(p1)
        if where == "disk":
            path = tmp_path / "e.safetensors"
            save_entry(path, entry, engine.fingerprint, KVAdapter())
            entry = load_entry(path, fresh.fingerprint, KVAdapter(), model.make_cache)
        fresh.prompt_cache.add(entry)
        return fresh

    got = np.array(restored().logits(prompt))
    np.testing.assert_allclose(got, cold_logits(model, prompt), rtol=1e-4, atol=1e-4)
    # ...and greedy decoding from there, against a cold engine
    params = SamplingParams(temperature=0.0, max_tokens=6)
    c = restored().complete(prompt, params)
    assert c.stats.cached_tokens == expect
    assert c.tokens == Engine(model, enc, prefill_chunk=5).complete(prompt, params).tokens


def test_interleaved_conversations_all_hit(tiny):
    """A B A B A B through one engine: every follow-up resumes where its conversation left."""
    enc = tiny.encoding
    engine = Engine(Forced(tiny.model, text(enc, "<|channel|>final<|message|> ok<|return|>")), enc)
    history = {"A": [user_message("first conversation, about w1 w2 w3")],
               "B": [user_message("second one, about something else")]}
    held = {}
    for name in "ABABAB":
        conv = build_conversation(history[name], date="", developer_instructions=f"Be {name}.")
        prompt = engine.render(conv)
        c = engine.complete(conv, GREEDY)
        if name in held:
            assert c.stats.cached_tokens == held[name]  # all the cache held for it
        held[name] = len(prompt) + len(c.tokens) - 1
        history[name] += c.messages + [user_message(f"and then {len(history[name])}?")]
    assert len(engine.prompt_cache.entries) == 2


def test_eviction_under_a_small_budget_gives_cold_tokens(tiny):
    enc, model = tiny.encoding, tiny.model
    prompts = [render_prompt(enc, build_conversation([user_message(f"topic {i} " * 6)], date=""))
               for i in range(3)]
    cold = Engine(model, enc)
    for budget in (0, 1_000_000):  # nothing fits; about one entry fits
        engine = Engine(model, enc, cache_memory=budget)
        for p in prompts + prompts[::-1] + prompts:
            cold.reset_cache()
            c = engine.complete(p, SamplingParams(temperature=0.0, max_tokens=5))
            ref = cold.complete(p, SamplingParams(temperature=0.0, max_tokens=5))
            assert c.tokens == ref.tokens
            assert engine.prompt_cache.nbytes <= budget
        assert len(engine.prompt_cache.entries) <= 1


def test_disk_cache_restores_evicted_entries_after_a_restart(tiny, tmp_path):
    enc, model = tiny.encoding, tiny.model
    a, b = (render_prompt(enc, build_conversation([user_message(t * 5)], date=""))
            for t in ("alpha ", "beta "))
    engine = Engine(model, enc, cache_memory=1_000_000, cache_dir=tmp_path)
    ca = engine.complete(a, SamplingParams(temperature=0.0, max_tokens=5))
    engine.complete(b, SamplingParams(temperature=0.0, max_tokens=5))  # evicts a, to disk
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    follow = a + ca.tokens[:-1] + [END] + text(enc, "<|start|>user<|message|>more<|end|><|start|>assistant")
    restarted = Engine(model, enc, cache_dir=tmp_path)
    got = np.array(restarted.logits(follow))
    np.testing.assert_allclose(got, cold_logits(model, follow), rtol=1e-4, atol=1e-4)
    assert restarted.cached_tokens[: len(a) + len(ca.tokens) - 1] == a + ca.tokens[:-1]


def test_disk_cache_ignores_foreign_and_damaged_files(tiny, tmp_path, capsys):
    enc, model = tiny.encoding, tiny.model
    engine = Engine(model, enc)
    p = render_prompt(enc, build_conversation([user_message("gamma " * 5)], date=""))
    engine.complete(p, SamplingParams(temperature=0.0, max_tokens=3))
    entry = engine.prompt_cache.find(p)
    save_entry(tmp_path / "other.safetensors", entry, "another-model", KVAdapter())
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_entry(tmp_path / "cut.safetensors", entry, engine.fingerprint, KVAdapter())
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    disk = DiskCache(tmp_path, engine.fingerprint)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "warning" in ln]
    assert len(lines) == 3 and all(ln.startswith("oss-mlx: warning: ignoring prompt cache file")
                                   for ln in lines)
    assert "another model" in " ".join(lines)
    assert disk.entries() == []
    fresh = Engine(model, enc, cache_dir=tmp_path)  # and serving with that folder still works
    assert fresh.complete(p, SamplingParams(temperature=0.0, max_tokens=3)).stats.cached_tokens == 0


def test_prefill_cancel_stops_between_chunks_and_keeps_the_work(tiny):
    """The cancel event, set while chunk 2 runs (explicitly, from inside it), stops the prefill
    before chunk 3; the chunks done stay cached for the next request."""
    enc = tiny.encoding
    prompt = render_prompt(enc, build_conversation([user_message("x " * 40)], date=""))
    cancel = threading.Event()

    class CancelAt(Forced):
        def prefill(self, tokens, cache, chunk_size=512, logits=True):
            out = super().prefill(tokens, cache, chunk_size, logits)
            if self.prefills == 2:
                cancel.set()
            return out

    model = CancelAt(tiny.model, [])
    engine = Engine(model, enc, prefill_chunk=8)
    c = engine.complete(prompt, SamplingParams(temperature=0.0, max_tokens=5), cancel=cancel)
    assert (c.stop_reason, c.stats.generated_tokens, model.prefills) == ("cancelled", 0, 2)
    done = engine.cached_tokens
    assert 0 < len(done) <= 16 and done == prompt[: len(done)]
    c = engine.complete(prompt, SamplingParams(temperature=0.0, max_tokens=5))
    assert c.stats.cached_tokens == len(done) and c.stop_reason != "cancelled"


def test_saved_conversation_resumes_without_prefill(tiny, tmp_path):
    """What chat's /save and /load do: the KV state and the sampled tokens of the turn go to a
    safetensors file; a new engine (a new process) resumes the conversation from it, with the
    same greedy tokens as a cold start."""
    enc, model = tiny.encoding, tiny.model
    script = text(enc, "<|channel|>final<|message|> eight nine<|return|>")
    engine = Engine(Forced(model, script), enc)
    history = [user_message("w0 w1 w2 w3 w4 w5")]
    c1 = engine.complete(build_conversation(history, date=""), GREEDY)
    history += c1.messages
    assert engine.save_cache(tmp_path / "chat.safetensors", build_conversation(history, date=""))
    follow = build_conversation(history + [user_message("and more")], date="")

    fresh = Engine(Forced(model, []), enc)
    assert fresh.load_cache(tmp_path / "chat.safetensors") is None
    prompt = fresh.render(follow)
    assert prompt == engine.render(follow)  # the answer as sampled, from the file
    c2 = fresh.complete(follow, SamplingParams(temperature=0.0, max_tokens=4))
    first = render_prompt(enc, build_conversation(history[:1], date=""))
    assert c2.stats.cached_tokens == len(first) + len(c1.tokens) - 1
    cold = Engine(model, enc).complete(prompt, SamplingParams(temperature=0.0, max_tokens=4))
    assert c2.tokens == cold.tokens
    # a file for another model is refused with one line, and nothing is loaded
    other = Engine(Forced(model, []), enc)
    other.fingerprint = "another-model"
    warning = other.load_cache(tmp_path / "chat.safetensors")
    assert "another model" in warning and "\n" not in warning
    assert other.cached_tokens == []


@pytest.mark.subprocess
def test_chat_save_and_load_resume_the_kv_state(tiny_model, tmp_path):
    """`oss-mlx chat` through a pipe: /save writes the conversation and its KV state beside it;
    a second chat process /loads both and its first turn reuses the whole conversation."""
    import os
    import re
    import subprocess
    import sys

    def chat(script: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "oss_mlx.cli", "chat", "--model", str(tiny_model),
             "--max-tokens", "6", "--temperature", "0"],
            input=script, capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stderr
        return run.stderr

    first = chat("hello there\n/save conv.json\n")
    assert (tmp_path / "conv.json").is_file() and (tmp_path / "conv.safetensors").is_file()
    assert "saved the KV cache" in first
    second = chat("/load conv.json\nand a follow-up\n/stats\n")
    cached = int(re.search(r"cached tokens ([\d,]+)", second).group(1).replace(",", ""))
    assert cached > 60, second  # the system message, the first exchange and the follow-up's start
    (tmp_path / "conv.safetensors").write_bytes(b"damaged")
    third = chat("/load conv.json\nand a follow-up\n/stats\n")
    assert "ignoring the KV cache" in third and "Traceback" not in third
    assert "cached tokens 0," in third  # without it, the same turn starts cold


def _dummy_cache():
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    return [RotatingKVCache(max_size=4), KVCache()]


def _filled(tokens):
    """A cache fed `tokens` (their ids stand in for K/V), in one write."""
    cache = _dummy_cache()
    kv = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1)
    for c in cache:
        c.update_and_fetch(kv, kv)
    return cache


def test_lru_eviction_and_lookup_whatever_the_order():
    from oss_mlx.engine.prompt_cache import PromptCache

    per_entry = sum(KVAdapter.nbytes(c) for c in _filled(list(range(30))))
    pc = PromptCache(_dummy_cache, memory_bytes=2 * per_entry + per_entry // 2)
    a, b, c = list(range(100, 130)), list(range(200, 230)), list(range(300, 330))
    for t in (a, b):
        pc.release(t, _filled(t))
    held, n = pc.acquire(a + [1, 2])  # A continues: handed over, then back, longer
    assert n == len(a)
    kv = mx.array([1.0]).reshape(1, 1, 1, 1)
    for layer in held:
        layer.update_and_fetch(kv, kv)
    pc.release(a + [1], held)
    pc.release(c, _filled(c))  # over budget: B, least recently used, goes (not the first entry)
    assert sorted(len(e.tokens) for e in pc.entries) == [30, 31]
    assert [int(e.tokens[0]) for e in pc.entries] == [100, 300]
    # lookup by longest usable prefix, in any order; B is gone: a miss
    assert pc.acquire(c + [9])[1] == 30 and pc.acquire(a + [1, 5, 6])[1] == 31
    assert pc.acquire(b + [9])[1] == 0


def test_flush_keeps_what_is_in_memory_across_a_restart(tiny, tmp_path):
    """`serve --cache-dir` flushes the prompt cache at shutdown; the next server resumes."""
    enc, model = tiny.encoding, tiny.model
    p = render_prompt(enc, build_conversation([user_message("delta " * 5)], date=""))
    engine = Engine(model, enc, cache_dir=tmp_path)
    c = engine.complete(p, SamplingParams(temperature=0.0, max_tokens=4))
    engine.prompt_cache.flush()
    follow = p + c.tokens[:-1] + [END] + text(enc, "<|start|>user<|message|>next<|end|><|start|>assistant")
    again = Engine(model, enc, cache_dir=tmp_path).complete(
        follow, SamplingParams(temperature=0.0, max_tokens=4))
    assert again.stats.cached_tokens == len(p) + len(c.tokens) - 1
    cold = Engine(model, enc).complete(follow, SamplingParams(temperature=0.0, max_tokens=4))
    assert again.tokens == cold.tokens


def test_key_hint_breaks_ties_between_conversations():
    """Two conversations sharing a prefix (say, one system prompt): a request that leaves both
    at the same point resumes from the one its prompt_cache_key / user names."""
    from mlx_lm.models.cache import KVCache

    from oss_mlx.engine.prompt_cache import PromptCache

    def filled(tokens):
        c = KVCache()
        kv = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1)
        c.update_and_fetch(kv, kv)
        return [c]

    pc = PromptCache(lambda: [KVCache()])
    base = list(range(50))
    pc.release(base + [1], filled(base + [1]), key="alice")
    pc.release(base + [2], filled(base + [2]), key="bob")
    for key in ("alice", "bob", "alice"):
        held, n = pc.acquire(base + [3, 4], key=key)
        assert n == len(base)
        chosen = max(pc.entries, key=lambda e: e.used)
        assert chosen.key == key


def test_restart_keeps_the_exact_token_history(tmp_path):
    """After a restart with --cache-dir, a conversation holding a tool call this server
    generated still renders as sampled (the history is saved with the entries), so its first
    request hits the restored entry through the end of the call."""
    from oss_mlx.harmony import load_encoding, tool_result_message
    from support.scripted import ScriptedModel, vocab_dir

    enc = load_encoding(vocab_dir(tmp_path / "vocab"))
    call = ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"x": 1}<|call|>')
    tools = [{"name": "f", "parameters": {"type": "object"}}]
    first = Engine(ScriptedModel(call, encoding=enc), enc, cache_dir=tmp_path / "kv")
    history = [user_message("f?")]
    c1 = first.complete(build_conversation(history, date="", tools=tools))
    first.prompt_cache.flush()
    history += c1.messages + [tool_result_message("functions.f", "2")]
    conv = build_conversation(history, date="", tools=tools)

    model = ScriptedModel("<|channel|>final<|message|>2<|return|>", encoding=enc)
    restarted = Engine(model, enc, cache_dir=tmp_path / "kv")
    assert restarted.render(conv) == first.render(conv) != render_prompt(enc, conv)
    c2 = restarted.complete(conv)
    p1 = render_prompt(enc, build_conversation(history[:1], date="", tools=tools))
    assert c2.stats.cached_tokens == len(p1) + len(c1.tokens) - 1

"""The disk cache keeps what it restores: an entry read back from disk stays there (a later start
finds it too, even one after a crash that wrote nothing) until the folder's budget evicts it, the
least recently used first; a flush writes only what the disk does not hold yet, and an entry that
continues a stored one replaces it. Engines over a ScriptedModel (its caches are mlx-lm's own,
fed with the token ids), restarted by making a new Engine on the same folder."""

from __future__ import annotations

import os
import time

from support.scripted import ScriptedModel

from oss_mlx.engine import Engine
from oss_mlx.harmony import build_conversation, render_prompt, user_message

REPLY = "<|channel|>final<|message|>Noted.<|return|>"


def conv(text: str):
    return build_conversation([user_message(text)], date="")


def engine(encoding, folder, **kw) -> Engine:
    model = ScriptedModel(*[REPLY] * 8, encoding=encoding)
    return Engine(model, encoding, cache_dir=folder, **kw)


def files(folder) -> set:
    return set(folder.glob("*.safetensors"))


def cached(e: Engine, text: str) -> int:
    return e.complete(conv(text)).stats.cached_tokens


def test_a_restored_entry_stays_on_disk_for_the_next_start(encoding, tmp_path):
    first = engine(encoding, tmp_path)
    assert cached(first, "alpha " * 30) == 0
    first.prompt_cache.flush()
    stored = files(tmp_path)
    assert len(stored) == 1

    second = engine(encoding, tmp_path)  # a restart: the index only, nothing in memory
    assert cached(second, "alpha " * 30) > 0  # read from disk
    assert files(tmp_path) == stored  # and still there, though `second` never flushes
    assert second.prompt_cache.unsaved() == []  # the disk holds it: nothing to write again

    third = engine(encoding, tmp_path)  # a start after one that ended without writing
    assert cached(third, "alpha " * 30) > 0


def test_a_continued_entry_replaces_the_stored_one(encoding, tmp_path):
    first = engine(encoding, tmp_path)
    history = [user_message("beta " * 30)]
    c1 = first.complete(build_conversation(history, date=""))
    first.prompt_cache.flush()
    (old,) = files(tmp_path)

    second = engine(encoding, tmp_path)
    history += c1.messages + [user_message("and then?")]
    c2 = second.complete(build_conversation(history, date=""))
    assert c2.stats.cached_tokens > 0
    second.prompt_cache.flush()
    (new,) = files(tmp_path)  # the longer entry holds everything the old one did
    assert new != old

    third = engine(encoding, tmp_path)
    history += c2.messages + [user_message("one more")]
    c3 = third.complete(build_conversation(history, date=""))
    assert c3.stats.cached_tokens >= c2.stats.prompt_tokens


def test_the_budget_evicts_the_least_recently_used_file(encoding, tmp_path):
    first = engine(encoding, tmp_path)
    for text in ("gamma " * 30, "delta " * 30):
        first.complete(conv(text))
    first.prompt_cache.flush()
    size = max(p.stat().st_size for p in files(tmp_path))
    by_age = sorted(files(tmp_path), key=lambda p: p.stat().st_mtime)
    now = time.time()
    for i, p in enumerate(by_age):  # explicit ages: gamma's file the oldest
        os.utime(p, (now - 100 + i, now - 100 + i))

    second = engine(encoding, tmp_path, cache_disk=int(size * 2.5))
    assert cached(second, "gamma " * 30) > 0  # restores the oldest file: now the most recent
    second.complete(conv("epsilon " * 30))
    second.prompt_cache.flush()  # a third file: one must go, and it is not the one just used
    kept = files(tmp_path)
    assert len(kept) == 2
    third = engine(encoding, tmp_path)
    whole = cached(third, "gamma " * 30)  # its own file: all but the last prompt token or so
    shared = cached(third, "delta " * 30)  # its file is gone: only the prefix both share
    assert 0 < shared < whole - 20, (shared, whole)


def test_a_long_session_keeps_the_snapshot_where_its_instructions_end(encoding, tmp_path):
    """An agent session that leaves more message boundaries than an entry keeps snapshots of
    still resumes a NEW conversation with the same instructions and tools from where they end
    (the first request of the agent's next session), from memory and, after a restart, from
    disk. (Keeping only the latest snapshots lost that point after a few turns.)"""
    tools = [{"name": "run", "parameters": {"type": "object",
                                            "properties": {"cmd": {"type": "string"}}}}]
    rules = "Follow the house rules. " * 30

    def conv_of(messages):
        return build_conversation(messages, developer_instructions=rules, tools=tools, date="")

    first = engine(encoding, tmp_path, max_snapshots=6)
    for _ in range(20):
        first.model.push(REPLY)
    history = [user_message("fix the build")]
    for i in range(12):  # an agent's turns, one request each
        history += first.complete(conv_of(history)).messages + [user_message(f"step {i}")]
    (entry,) = first.prompt_cache.entries
    assert len(entry.snapshots) == 6
    shared = len(render_prompt(encoding, conv_of([])))  # instructions and tools
    assert first.complete(conv_of([user_message("write the docs")])).stats.cached_tokens >= shared
    first.prompt_cache.flush()

    restarted = engine(encoding, tmp_path, max_snapshots=6)
    again = restarted.complete(conv_of([user_message("review the tests")]))
    assert again.stats.cached_tokens >= shared

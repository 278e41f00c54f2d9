"""The prompt cache on disk survives every way `oss-mlx serve` ends: the real command (serving a
ScriptedModel, tests/support/serve_scripted.py) is stopped by a real SIGTERM or SIGINT, then
started again on the same folder, and the same request reads its prefix from disk.

Also: with no --cache-dir the cache is kept under $OSS_MLX_HOME/prompt-cache/ (a folder per
model), and --no-cache-dir keeps nothing.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest
from support import SUPPORT, child_env

SERVE = [sys.executable, str(SUPPORT / "serve_scripted.py"), "--port", "0", "--responsive"]
BODY = {"model": "scripted-oss", "messages": [
    {"role": "system", "content": "You are a careful assistant. " * 20},
    {"role": "user", "content": "Say hello to the prompt cache."}]}


class Serve:
    """One `serve_scripted.py` process: its URL once it listens, stopped with a real signal."""

    def __init__(self, *args: str, env: dict | None = None):
        # Unbuffered: reading the first line must not swallow the next ones (communicate
        # reads the pipe itself, past any buffer).
        self.proc = subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0,
                                     env={**child_env(env), "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline().decode()
        if " at http" not in line:
            self.proc.kill()
            raise AssertionError((line, *(b.decode() for b in self.proc.communicate(timeout=30))))
        self.url = line.split(" at ")[1].split()[0]

    def usage(self, body: dict = BODY) -> dict:
        r = httpx.post(self.url + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    def stop(self, sig) -> tuple[str, str]:
        self.proc.send_signal(sig)
        try:
            out, err = (b.decode() for b in self.proc.communicate(timeout=60))
        finally:
            self.proc.kill()
        assert self.proc.returncode == 0, (sig, self.proc.returncode, err)
        assert "Traceback" not in err, err
        return out, err


def files(folder) -> list:
    return sorted(folder.rglob("*.safetensors"))


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cache_dir_survives_a_signal_and_restart(tmp_path, sig):
    folder = tmp_path / "kv"
    first = Serve("--cache-dir", str(folder))
    cold = first.usage()
    assert cold["prompt_tokens_details"]["cached_tokens"] == 0
    first.stop(sig)
    assert files(folder), "nothing was written at shutdown"

    again = Serve("--cache-dir", str(folder))
    warm = again.usage()
    again.stop(signal.SIGTERM)
    assert warm["prompt_tokens"] == cold["prompt_tokens"]
    assert warm["prompt_tokens_details"]["cached_tokens"] > cold["prompt_tokens"] // 2, warm
    # The entry read back stays on disk: a third start still has it.
    assert files(folder)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_conversation_continued_after_a_restart_is_written_at_the_next_stop(tmp_path):
    """The entry restored from disk (its sliding-window snapshots read lazily by the engine's
    thread) is continued, and the longer entry is written by the next shutdown, from the main
    thread: a third start resumes the whole conversation."""
    folder = tmp_path / "kv"
    follow = {**BODY, "messages": BODY["messages"] + [
        {"role": "assistant", "content": "Hello from oss-mlx."},
        {"role": "user", "content": "And once more."}]}
    first = Serve("--cache-dir", str(folder))
    first.usage()
    first.stop(signal.SIGTERM)
    second = Serve("--cache-dir", str(folder))
    grown = second.usage(follow)
    _, err = second.stop(signal.SIGTERM)
    assert "cannot write" not in err, err
    third = Serve("--cache-dir", str(folder))
    again = third.usage(follow)
    third.stop(signal.SIGTERM)
    assert grown["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["prompt_tokens_details"]["cached_tokens"] > grown["prompt_tokens_details"][
        "cached_tokens"], (grown, again)


def session(first_message: str) -> dict:
    """The first request of an agent session: the same instructions and tools every time."""
    return {"model": "scripted-oss", "tools": [{"type": "function", "function": {
        "name": "shell", "description": "Run a command.", "parameters": {
            "type": "object", "properties": {"cmd": {"type": "string"}}}}}],
        "messages": [{"role": "system", "content": "You are a coding agent. " * 40},
                     {"role": "user", "content": first_message}]}


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_next_session_starts_warm_from_the_default_folder(tmp_path):
    """No --cache-dir: the cache is kept under $OSS_MLX_HOME/prompt-cache/<model>; after a
    restart the first request of a new session, sharing only the instructions and tools with
    the last one, reads them from disk. With --no-cache-dir nothing is kept."""
    env = {**child_env(), "OSS_MLX_HOME": str(tmp_path / "home")}
    first = Serve(env=env)
    cold = first.usage(session("List the files."))
    out, _ = first.stop(signal.SIGTERM)
    assert "prompt cache on disk in" in out
    (folder,) = (tmp_path / "home" / "prompt-cache").iterdir()
    assert len(folder.name) == 16 and files(folder)  # one folder for this model, written

    again = Serve(env=env)
    warm = again.usage(session("Count the lines of notes.txt."))
    again.stop(signal.SIGTERM)
    off = Serve("--no-cache-dir", env=env)
    offline = off.usage(session("Count the lines of notes.txt."))
    off.stop(signal.SIGTERM)
    assert cold["prompt_tokens_details"]["cached_tokens"] == 0
    assert offline["prompt_tokens_details"]["cached_tokens"] == 0
    shared = warm["prompt_tokens_details"]["cached_tokens"]
    assert shared > cold["prompt_tokens"] // 2, (warm, cold)  # the instructions and tools


def test_where_the_cache_goes(tmp_path, monkeypatch):
    """--cache-dir as given; by default a folder per model under $OSS_MLX_HOME; in memory
    only with --no-cache-dir, for --demo, and under mlx.launch (an explicit folder included:
    the ranks must restore exactly the same entries)."""
    from argparse import Namespace
    from pathlib import Path

    from oss_mlx.cli.models import Chosen
    from oss_mlx.cli.serve import cache_dir
    from oss_mlx.engine.disk_cache import DiskCache, PerModel

    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path))
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    model = Chosen(Path("/models/gpt-oss-20b"), "gpt-oss-20b")
    demo = Chosen(Path("/tmp/demo"), "tiny-random", demo=True)
    args = Namespace(cache_dir=None, no_cache_dir=False)
    default = cache_dir(args, model)
    assert default == PerModel(tmp_path / "prompt-cache", "gpt-oss-20b")
    disk = DiskCache(default, "ab" * 32)
    assert disk.folder == tmp_path / "prompt-cache" / ("ab" * 8)
    assert (disk.folder / "model.txt").read_text() == "gpt-oss-20b\n"
    assert cache_dir(Namespace(cache_dir="/x", no_cache_dir=False), model) == "/x"
    assert cache_dir(Namespace(cache_dir=None, no_cache_dir=True), model) is None
    assert cache_dir(args, demo) is None
    assert cache_dir(Namespace(cache_dir="/x", no_cache_dir=False), demo) == "/x"
    monkeypatch.setenv("MLX_RANK", "1")
    assert cache_dir(args, model) is None
    assert cache_dir(Namespace(cache_dir="/x", no_cache_dir=False), model) is None

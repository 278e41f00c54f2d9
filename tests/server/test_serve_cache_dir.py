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
        self.proc = subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**child_env(env), "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if " at http" not in line:
            self.proc.kill()
            raise AssertionError((line, self.proc.communicate(timeout=30)))
        self.url = line.split(" at ")[1].split()[0]

    def usage(self) -> dict:
        r = httpx.post(self.url + "/chat/completions", json=BODY, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    def stop(self, sig) -> tuple[str, str]:
        self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=60)
        finally:
            self.proc.kill()
        assert self.proc.returncode == 0, (sig, self.proc.returncode, err)
        assert "Traceback" not in err, err
        return out, err


def files(folder) -> list:
    return sorted(folder.rglob("*.safetensors"))


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

"""A bounded load test of `oss-mlx serve`: the real command, the tiny synthetic model, loopback only.

16 streaming clients send 5 requests each (80 in all) at once to a server that decodes up to 8 of
them in one batched step (`--max-concurrency 8`); every request must come back whole (a role
chunk, deltas, one finish_reason, a usage chunk, `data: [DONE]`), none lost, none mixed up. It
prints the throughput and the server process's peak resident memory (VmHWM), e.g.

    python -m pytest -q -s tests/test_server_load.py
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

CLIENTS, REQUESTS, MAX_TOKENS, CONCURRENCY = 16, 5, 8, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set size (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture(scope="module")
def server(tiny_model):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "oss_mlx.cli", "serve", "--model", str(tiny_model),
         "--name", "tiny", "--port", str(port), "--max-concurrency", str(CONCURRENCY)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Bounded: a server that never says it is serving is killed after 120 s.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        # serve listens before it loads the model and prints this line once it has: from then
        # on a connection waits in the backlog until the app accepts it. No polling.
        lines = []
        while "serving" not in (line := proc.stdout.readline()):
            assert line, f"serve exited before serving: {''.join(lines)}"
            lines.append(line)
        watchdog.cancel()
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # drain
        proc.url = f"http://127.0.0.1:{port}"
        assert httpx.get(proc.url + "/health", timeout=30).status_code == 200
        yield proc
    finally:
        watchdog.cancel()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def one_request(url: str, client: int, i: int) -> dict:
    """A streamed chat request read as raw SSE; returns what it saw."""
    body = {"model": "tiny", "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": client * 100 + i,
            "messages": [{"role": "user", "content": f"client {client} request {i}: hello"}]}
    seen = {"ids": set(), "finish": [], "usage": None, "done": False, "text": "", "chunks": 0}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            assert not seen["done"], "data after [DONE]"
            if data == "[DONE]":
                seen["done"] = True
                continue
            chunk = json.loads(data)
            seen["chunks"] += 1
            seen["ids"].add(chunk["id"])
            if chunk.get("usage"):
                seen["usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                seen["text"] += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    seen["finish"].append(choice["finish_reason"])
    seen["latency"] = time.perf_counter() - t0
    return seen


@pytest.mark.subprocess
@pytest.mark.slow
def test_sixteen_streaming_clients(server):
    t0 = time.perf_counter()

    def client(c):
        return [one_request(server.url, c, i) for i in range(REQUESTS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    wall = time.perf_counter() - t0
    rss = peak_rss_mib(server.pid)
    assert server.poll() is None, "the server died under load"

    assert len(results) == CLIENTS * REQUESTS
    ids = set()
    for r in results:
        assert r["done"] and len(r["ids"]) == 1, r
        assert len(r["finish"]) == 1 and r["finish"][0] in ("stop", "length", "tool_calls"), r
        u = r["usage"]
        assert u and 0 < u["completion_tokens"] <= MAX_TOKENS and u["prompt_tokens"] > 0, r
        assert "<|" not in r["text"]
        ids |= r["ids"]
    assert len(ids) == CLIENTS * REQUESTS  # every request answered once, by its own stream

    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    lat = sorted(r["latency"] for r in results)
    print(f"\nload: {CLIENTS} clients x {REQUESTS} streamed requests (max_tokens {MAX_TOKENS}, "
          f"--max-concurrency {CONCURRENCY}, tiny model): {len(results)} ok in {wall:.2f} s = {len(results) / wall:.2f} req/s, "
          f"{tokens} completion tokens = {tokens / wall:.1f} tok/s; request latency "
          f"p50 {lat[len(lat) // 2]:.2f} s, max {lat[-1]:.2f} s; "
          f"server peak RSS {rss:.0f} MiB")

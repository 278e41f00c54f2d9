"""`oss-mlx bench --serve 1,2,4,8`: the serving benchmark, N concurrent streaming clients.

For each N, the real server (create_app; the scheduler with --max-concurrency set to the largest
N, or --serve-concurrency, for every level, so only the number of clients changes; uvicorn)
listens on a loopback port and N client threads each send `--serve-requests` streamed chat
requests one after the other: the first a distinct prompt of about `--prompt-tokens` tokens,
each next one the same conversation grown by the previous answer and a new user turn (an agent's
pattern, so the prompt cache has something to reuse). Reported per N: aggregate decode tokens/s (all streams'
tokens over the wall time, prefill included), per-stream decode tokens/s (median over requests of
(tokens - 1) / (last - first token)), time to first token p50 / p95 as the client sees it, and
cache reuse (cached / prompt tokens of the follow-up requests); and the ratio of the aggregate to
one stream's.

Random weights never write a harmony message, so nothing would stream: the model is wrapped in
`Steered`, which runs the full forward pass of every step (its logits are computed and waited
for) and then picks the next token by a fixed rule on the current one (<|channel|>final<|message|>
then " la" forever), so every request streams exactly its max_tokens of text. A real model
costs the same per step.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from oss_mlx.defaults import PREFILL_CHUNK
from oss_mlx.errors import OssMlxError

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey yankee zulu").split()


class Steered:
    """A model whose steps cost what the wrapped model's cost, but whose next token follows
    `table[current token]` (see the module docstring). Has the Model API the engine uses."""

    def __init__(self, model, encoding):
        import mlx.core as mx

        enc = lambda s: encoding.encode(s, allowed_special="all")  # noqa: E731
        head, la = enc("<|channel|>final<|message|>"), enc(" la")[0]
        assistant = enc("<|start|>assistant")[-1]
        if max(head + [assistant]) >= model.config.vocab_size:
            raise OssMlxError(f"--serve needs a model with harmony's vocabulary (this one has "
                              f"{model.config.vocab_size:,} tokens, without its special tokens)")
        table = [la] * model.config.vocab_size
        for cur, nxt in zip([assistant] + head[:-1], head):  # assistant -> <|channel|> -> ...
            table[cur] = nxt
        self.model, self.table = model, mx.array(table, dtype=mx.uint32)
        self.config = model.config

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _steer(self, logits, last):
        import mlx.core as mx

        nxt = self.table[last.reshape(-1)]  # [B]
        forced = mx.where(mx.arange(logits.shape[-1])[None] == nxt[:, None], 0.0, -1e9)
        return mx.depends(forced.astype(logits.dtype), logits)  # the real logits still run

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, tokens, cache=None):
        logits = self.model(tokens, cache=cache)
        return self._steer(logits[:, -1, :], tokens[:, -1])[:, None, :]

    def prefill(self, tokens, cache, chunk_size: int = PREFILL_CHUNK, logits: bool = True):
        out = self.model.prefill(tokens, cache, chunk_size, logits=logits)
        return self._steer(out, tokens[:, -1]) if logits else None


class LoopbackServer:
    """create_app on a loopback socket that listens before uvicorn starts."""

    def __init__(self, engine, concurrency: int, name: str = "bench"):
        import uvicorn

        from oss_mlx.server import create_app

        app = create_app(engine, name, max_concurrency=concurrency)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.url = self.base + "/chat/completions"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def _stream(url: str, messages: list, max_tokens: int, timeout: float) -> dict:
    """One streamed request (the standard library's http.client: nothing to install);
    client-side times of its first and last content delta."""
    import http.client
    from urllib.parse import urlsplit

    body = {"model": "bench", "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    out = {"text": "", "deltas": 0, "usage": None, "t0": time.perf_counter(), "first": None}
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise OssMlxError(f"the server answered {r.status}: {r.read()[:200]!r}")
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text:
                    now = time.perf_counter()
                    out["first"] = out["first"] or now
                    out["last"], out["deltas"] = now, out["deltas"] + 1
                    out["text"] += text
    finally:
        conn.close()
    if out["usage"] is None or out["first"] is None:
        raise OssMlxError("a request streamed no content (did the server fail?)")
    return out


def _client(url: str, c: int, requests: int, prompt_words: int, max_tokens: int,
            timeout: float) -> list:
    """One synthetic agent: a distinct opening prompt, then follow-ups of the same thread."""
    words = " ".join(WORDS[(c * 7 + i) % len(WORDS)] for i in range(prompt_words))
    messages = [{"role": "user", "content": f"Client {c}. {words}"}]
    results = []
    for r in range(requests):
        res = _stream(url, messages, max_tokens, timeout)
        res["follow_up"] = r > 0
        results.append(res)
        messages += [{"role": "assistant", "content": res["text"]},
                     {"role": "user", "content": f"Go on ({r + 1})."}]
    return results


def _pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_level(engine, n: int, concurrency: int, requests: int, prompt_words: int,
              max_tokens: int, timeout: float) -> dict:
    """N clients at once against a server with --max-concurrency `concurrency`; one row."""
    with LoopbackServer(engine, concurrency) as srv:
        _stream(srv.url, [{"role": "user", "content": "warm up"}], 4, timeout)  # untimed
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda c: _client(srv.url, c, requests, prompt_words,
                                                    max_tokens, timeout), range(n)))
        wall = time.perf_counter() - t0
    res = [r for rs in runs for r in rs]
    tokens = sum(r["usage"]["completion_tokens"] for r in res)
    per_stream = [(r["deltas"] - 1) / (r["last"] - r["first"]) for r in res
                  if r["deltas"] > 1 and r["last"] > r["first"]]
    ttft = [r["first"] - r["t0"] for r in res]
    follow = [r for r in res if r["follow_up"]]
    prompt = sum(r["usage"]["prompt_tokens"] for r in follow)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in follow)
    return {
        "concurrency": n, "requests": len(res), "completion_tokens": tokens, "wall_s": wall,
        "aggregate_tps": tokens / wall,
        "per_stream_tps_p50": statistics.median(per_stream) if per_stream else None,
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p95_s": _pct(ttft, 0.95),
        "prompt_tokens_p50": statistics.median(r["usage"]["prompt_tokens"] for r in res),
        "cache_reuse": cached / prompt if prompt else None,
    }


def render(rows: list, console) -> None:
    from rich.table import Table

    base = rows[0]["aggregate_tps"] if rows and rows[0]["concurrency"] == 1 else None
    t = Table(title="serving: N concurrent streaming clients over loopback HTTP")
    for col in ("streams", "requests", "aggregate tok/s", "x 1 stream", "per-stream tok/s",
                "TTFT p50", "TTFT p95", "prompt tok", "cache reuse"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["concurrency"]), str(r["requests"]), f"{r['aggregate_tps']:.1f}",
                  f"{r['aggregate_tps'] / base:.2f}" if base else "-",
                  f"{r['per_stream_tps_p50']:.1f}" if r["per_stream_tps_p50"] else "-",
                  f"{r['ttft_p50_s']:.2f} s", f"{r['ttft_p95_s']:.2f} s",
                  f"{r['prompt_tokens_p50']:.0f}",
                  f"{100 * r['cache_reuse']:.0f}%" if r["cache_reuse"] is not None else "-")
    console.print(t)


def main(args, model_ref, levels: list[int], log, console) -> dict:
    """Run every level on one loaded engine; returns the report (also rendered on `console`:
    the command line's, which never folds a line into a pipe)."""
    from oss_mlx.engine.engine import Engine

    requests, max_tokens = int(args.serve_requests), int(args.gen_tokens)
    concurrency = args.serve_concurrency or max(levels)
    prompt_words = int(str(args.prompt_tokens).split(",")[0]) // 2  # ~2 tokens per "word "
    if requests < 1 or max_tokens < 2 or prompt_words < 1 or concurrency < 1:
        raise OssMlxError("--serve needs --serve-requests >= 1, --gen-tokens >= 2, a "
                          "positive --prompt-tokens and --serve-concurrency")
    log(f"loading {model_ref} ...")
    engine = Engine.load(str(model_ref), dtype=None if args.dtype == "auto" else args.dtype)
    engine.model = Steered(engine.model, engine.encoding)
    rows = []
    for n in levels:
        log(f"{n} concurrent client(s) x {requests} request(s), {max_tokens} tokens each ...")
        engine.reset_cache()
        rows.append(run_level(engine, n, concurrency, requests, prompt_words, max_tokens,
                              timeout=600))
        r = rows[-1]  # said at once: a run cut short by a time limit keeps its finished levels
        log(f"  {n} stream(s): {r['aggregate_tps']:.2f} tok/s aggregate, TTFT p50 "
            f"{r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s, wall {r['wall_s']:.1f} s")
    render(rows, console)
    return {"format": "oss-mlx-bench-serve", "format_version": 1,
            "settings": {"levels": levels, "max_concurrency": concurrency,
                         "requests_per_client": requests,
                         "gen_tokens": max_tokens, "prompt_words": prompt_words},
            "results": rows}

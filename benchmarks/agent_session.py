"""An agent session end to end over real HTTP: a recorded session (tests/server/traffic/NAME.json,
Chat Completions: opencode, qwen-code) replayed request by request against `oss-mlx serve` and
`mlx_lm.server` (`python -m mlx_lm server`) on the same random-weight checkpoint, each a process
of its own, one after the other. Every reply is cut at a fixed length (--max-tokens, greedy), so
both servers do the same work: per request the prompt, what the server says it reused from its
cache, what it prefilled, the time to its first event carrying a token (TTFT; on random weights
oss-mlx may stream nothing visible, and then that is the reply's end) and the reply's time; the
session's wall time.

    python benchmarks/agent_session.py --shape narrow-vocab --session opencode
    python benchmarks/agent_session.py --shape 20b --layers 2 --session qwen-code

Shapes: narrow-vocab (the `narrow` preset, 24 layers at width 128, with the real 201,088-token
vocabulary: a real prompt needs real token ids) and 20b (the published shape; --layers cuts it).
Checkpoints are made once with synth and convert under --work (default: a folder under the
system's temporary directory) and reused.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TRAFFIC = ROOT / "tests" / "server" / "traffic"
SERVERS = ("oss-mlx", "mlx-lm")


def checkpoints(work: Path, shape: str, layers: int | None) -> tuple[Path, Path]:
    """(the HF-layout checkpoint mlx-lm reads, our converted folder), made once."""
    from oss_mlx.config import PRESETS
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    if shape == "narrow-vocab":
        config = replace(PRESETS["narrow"], vocab_size=PRESETS["20b"].vocab_size)
    else:
        config = PRESETS[shape]
    if layers:
        config = replace(config, num_hidden_layers=layers)
    name = f"{shape}-L{config.num_hidden_layers}"
    src, ours = work / f"{name}-hf", work / name
    if not (src / "config.json").is_file():
        synth(src, config=config, force=src.exists())
    if not (ours / "config.json").is_file():
        convert(src, ours)
    return src, ours


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, src: Path, ours: Path) -> tuple[subprocess.Popen, str, str]:
    """(process, base URL, the model name its requests carry); returns once it answers."""
    port = free_port()
    if server == "oss-mlx":
        cmd = [sys.executable, "-m", "oss_mlx.cli", "serve", "--model", str(ours), "--port",
               str(port), "--name", "bench", "--no-cache-dir", "--log-level", "warning"]
        model = "bench"
    else:
        # Its prefill chunk as large as ours can grow (serve's --prefill-chunk, 512).
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(src), "--port", str(port),
               "--log-level", "WARNING", "--prefill-step-size", "512"]
        model = "default_model"  # mlx_lm.server: the model given on its command line
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{server} ended: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url, model
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling a process's start-up, bounded by the deadline
    proc.kill()
    raise SystemExit(f"{server} did not start within 600 s")


def request(http: httpx.Client, body: dict) -> dict:
    """One streamed request: its usage, TTFT and time."""
    t0 = time.perf_counter()
    first, usage = None, {}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role" and v}
                if first is None and (delta or choice.get("finish_reason")):
                    first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    prompt = usage.get("prompt_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"prompt": prompt, "cached": cached, "prefilled": prompt - cached,
            "generated": usage.get("completion_tokens", 0), "ttft": first or total,
            "time": total}


def replay(server: str, url: str, model: str, session: dict, max_tokens: int) -> list[dict]:
    sys.path[:0] = [str(TRAFFIC), str(ROOT / "tests")]
    from record import sanitize

    rows = []
    with httpx.Client(base_url=url, timeout=1800) as http:
        for req in session["requests"]:
            if req["path"].rstrip("/").split("/")[-1] != "completions":
                raise SystemExit(f"{req['path']}: only Chat Completions sessions replay on both")
            body = {**sanitize(req["body"]), "model": model, "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                    "temperature": 0}
            body.pop("max_completion_tokens", None)
            rows.append(request(http, body))
            r = rows[-1]
            print(f"  {server:8s} {len(rows) - 1:2d}  prompt {r['prompt']:6d}  cached "
                  f"{r['cached']:6d}  prefilled {r['prefilled']:6d}  TTFT {r['ttft']:7.2f} s  "
                  f"reply {r['time']:7.2f} s", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="narrow-vocab", choices=["narrow-vocab", "20b"])
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--session", default="opencode", help="opencode or qwen-code")
    p.add_argument("--max-tokens", type=int, default=16, help="each reply's length")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "oss-mlx-bench")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src, ours = checkpoints(args.work, args.shape, args.layers)
    session = json.loads((TRAFFIC / f"{args.session}.json").read_text())
    print(f"{args.session}: {len(session['requests'])} requests, replies of {args.max_tokens} "
          f"tokens, on {ours.name}")
    results = {}
    for server in args.servers.split(","):
        proc, url, model = start(server, src, ours)
        try:
            t0 = time.perf_counter()
            rows = replay(server, url, model, session, args.max_tokens)
            results[server] = {"rows": rows, "wall": time.perf_counter() - t0}
        finally:
            proc.terminate()
            proc.wait(60)
    print("\nserver    session wall   prefilled   sum TTFT")
    for server, r in results.items():
        print(f"{server:8s}  {r['wall']:10.1f} s  {sum(x['prefilled'] for x in r['rows']):9d}  "
              f"{sum(x['ttft'] for x in r['rows']):8.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"shape": ours.name, "session": args.session,
                                         "max_tokens": args.max_tokens, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

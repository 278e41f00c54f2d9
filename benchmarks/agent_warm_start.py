"""The first request of an agent's second session, with and without the disk prompt cache.

An agent (Codex, opencode, ...) sends the same 5-6k tokens of instructions and tools at the
start of every session. With the prompt cache on disk (`serve`'s default) a restarted server
reads that prefix back instead of prefilling it; with `--no-cache-dir` it prefills it again.

For each mode, over real HTTP against the real `oss-mlx serve` command:

1. start `serve` (a fresh cache folder), replay a recorded session (tests/server/traffic/NAME.json,
   the bodies as the client sent them) request by request, every reply cut to --max-tokens; stop it with SIGTERM (what a user's
   Ctrl-C or a service manager does);
2. start `serve` again and send the first request of a SECOND session: the recorded session's
   first request with tools, its last user message replaced by another task (same
   instructions and tools, as a new session of the same agent sends).

Reported per mode: that request's prompt and cached tokens (the server's usage), its time to
first token as the client sees it, and the first session's wall time.

    python benchmarks/agent_warm_start.py --model gpt-oss-20b --session opencode
    python benchmarks/agent_warm_start.py --model 20b-L4      # oss-mlx synth 20b-L4-ck --preset 20b --layers 4 && oss-mlx convert 20b-L4-ck -o 20b-L4
    python benchmarks/agent_warm_start.py --tiny --session opencode --requests 2   # a quick check

`--tiny` builds the tiny random-weight preset (what `--demo` serves) once in a temporary folder:
its figures only show that the script works.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TRAFFIC = REPO / "tests" / "server" / "traffic"
NEW_TASK = "Find every TODO in this repository and list them with their file and line."


class Serve:
    """`oss-mlx serve` in a child process, on a free port; stopped with SIGTERM."""

    def __init__(self, model: str, *options: str):
        cmd = [sys.executable, "-m", "oss_mlx.cli", "serve", "--model", model, "--port", "0",
               "--name", "bench", "--log-level", "warning", *options]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     bufsize=0)
        self.lines: list[str] = []
        while " at http" not in (line := self.proc.stdout.readline().decode()):
            if not line:
                raise SystemExit("serve ended before serving:\n" + "".join(self.lines))
            self.lines.append(line)
        self.url = line.split(" at ")[1].split()[0]
        self.drain = threading.Thread(target=lambda: self.lines.extend(
            b.decode() for b in self.proc.stdout), daemon=True)
        self.drain.start()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(timeout=600) != 0:
            raise SystemExit(f"serve ended with status {self.proc.returncode}:\n"
                             + "".join(self.lines))
        self.drain.join(30)


def fixed_length(path: str, body: dict, max_tokens: int) -> dict:
    """The request streamed, with its usage, and its reply cut to `max_tokens`."""
    body = {**body, "stream": True, "model": "bench"}
    if path.endswith("/chat/completions"):
        body.pop("max_completion_tokens", None)
        body.update(max_tokens=max_tokens, stream_options={"include_usage": True})
    else:
        body["max_output_tokens"] = max_tokens
    return body


def send(url: str, path: str, body: dict) -> dict:
    """One streamed request: time to first generated text (any delta), usage, total time."""
    t0, first, usage = time.perf_counter(), None, None
    with httpx.stream("POST", url.removesuffix("/v1") + path, json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise SystemExit(f"{path}: {r.status_code} {r.read().decode()[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event and "object" not in event:
                raise SystemExit(f"{path}: {event['error']}")
            if first is None and (_delta(event) or event.get("type", "").endswith(".delta")):
                first = time.perf_counter() - t0
            usage = event.get("usage") or (event.get("response") or {}).get("usage") or usage
    total = time.perf_counter() - t0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    return {"prompt": prompt, "cached": details.get("cached_tokens", 0),
            "ttft": first if first is not None else total, "total": total}


def _delta(event: dict) -> bool:
    for choice in event.get("choices") or []:
        d = choice.get("delta") or {}
        if d.get("content") or d.get("reasoning_content") or d.get("tool_calls"):
            return True
    return False


def second_session(session: dict) -> tuple[str, dict]:
    """The first request with tools, as the agent's next session sends it: the same
    instructions and tools, another task in its last user message."""
    req = next(r for r in session["requests"] if r["body"].get("tools"))
    body = copy.deepcopy(req["body"])
    if "messages" in body:
        last = next(m for m in reversed(body["messages"]) if m["role"] == "user")
        last["content"] = NEW_TASK
    else:
        last = next(m for m in reversed(body["input"]) if m.get("role") == "user")
        last["content"] = [{"type": "input_text", "text": NEW_TASK}]
        if "prompt_cache_key" in body:
            body["prompt_cache_key"] = str(uuid.uuid4())
    return req["path"], body


def run(model: str, session: dict, mode: str, max_tokens: int, folder: Path) -> dict:
    options = ("--cache-dir", str(folder)) if mode == "disk" else ("--no-cache-dir",)
    first = Serve(model, *options)
    t0 = time.perf_counter()
    rows = [send(first.url, r["path"], fixed_length(r["path"], r["body"], max_tokens))
            for r in session["requests"]]
    wall = time.perf_counter() - t0
    first.stop()
    again = Serve(model, *options)
    path, body = second_session(session)
    row = send(again.url, path, fixed_length(path, body, max_tokens))
    again.stop()
    return {**row, "session_wall": wall, "session_prefilled": sum(r["prompt"] - r["cached"]
                                                                  for r in rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a converted model folder or a store name")
    which.add_argument("--tiny", action="store_true",
                       help="the tiny random-weight preset, built in a temporary folder")
    p.add_argument("--session", default="opencode",
                   help="a recorded session in tests/server/traffic (default: opencode)")
    p.add_argument("--max-tokens", type=int, default=16, help="every reply's length (16)")
    p.add_argument("--requests", type=int, default=None,
                   help="replay only the first N requests of the first session (a quick check)")
    args = p.parse_args()
    session = json.loads((TRAFFIC / f"{args.session}.json").read_text())
    session["requests"] = session["requests"][:args.requests]
    with tempfile.TemporaryDirectory(prefix="oss-mlx-warm-start-") as tmp:
        model = args.model
        if args.tiny:
            from oss_mlx.cli.models import make_demo_model

            model = str(make_demo_model(Path(tmp) / "model"))
        results = {mode: run(model, session, mode, args.max_tokens, Path(tmp) / mode)
                   for mode in ("memory", "disk")}
    print(f"model {args.model or 'tiny (random weights)'}; session {args.session} "
          f"({len(session['requests'])} requests, replies of {args.max_tokens} tokens)")
    print("| prompt cache | 2nd session's first request: prompt | cached | TTFT (s) "
          "| 1st session: prefilled tokens | wall (s) |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        label = "on disk (default)" if mode == "disk" else "memory only (--no-cache-dir)"
        print(f"| {label} | {r['prompt']} | {r['cached']} | {r['ttft']:.2f} "
              f"| {r['session_prefilled']} | {r['session_wall']:.1f} |")
    cold, warm = results["memory"]["ttft"], results["disk"]["ttft"]
    print(f"TTFT of the second session's first request: {cold:.2f} s -> {warm:.2f} s "
          f"({cold / max(warm, 1e-9):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

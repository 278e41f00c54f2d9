"""Record a real agent CLI's requests against `oss-mlx serve` on a scripted model.

    python tests/server/traffic/record.py --port 11500 --out codex.jsonl
    # then point the client at http://127.0.0.1:11500/v1 (model "scripted-oss") and run it

The server is the real app (oss_mlx.server.create_app) over the real Engine; the model is a
ScriptedModel whose reply to each request is chosen from the prompt, so a client can be driven
through tool calls: a prompt that declares a shell-like tool and has fewer than `--calls` tool
results since its last user message gets a tool call (ls, cat, wc in turn), any other prompt an
answer. Every request body is appended to --out as one JSON line {"method", "path", "body"}.
`tests/server/traffic/*.json` hold such sequences with the replies the model gave, replayed by
tests/server/test_agent_traffic.py. Needs the test dependencies (uvicorn, tests/ on sys.path).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from support.scripted import ScriptedModel, vocab_dir  # noqa: E402

COMMANDS = ["ls", "cat hello.py", "wc -l notes.txt"]
# tool name -> arguments for a command, as each client's shell tool takes them
SHELL_TOOLS = {
    "shell": lambda c: {"command": ["bash", "-lc", c]},
    "exec_command": lambda c: {"cmd": c},
    "bash": lambda c: {"command": c, "description": "Run " + c.split()[0]},
    "run_shell_command": lambda c: {"command": c},
}


def choose_reply(prompt_text: str, calls: int) -> str:
    """The harmony reply for a prompt (see the module docstring)."""
    turn = prompt_text[prompt_text.rfind("<|start|>user<|message|>"):]
    results = turn.count("<|start|>functions.")
    tool = next((t for t in SHELL_TOOLS if f"type {t} = " in prompt_text), None)
    if tool is not None and results < calls:
        command = COMMANDS[results % len(COMMANDS)]
        args = json.dumps(SHELL_TOOLS[tool](command))
        return (f"<|channel|>analysis<|message|>I will run {command}.<|end|>"
                f"<|start|>assistant<|channel|>commentary to=functions.{tool} <|constrain|>json"
                f"<|message|>{args}<|call|>")
    if tool is None:
        return "<|channel|>final<|message|>Listing the files<|return|>"
    return ("<|channel|>analysis<|message|>I have what I need.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>The folder holds hello.py and "
            "notes.txt.<|return|>")


class PolicyEngine:
    """Wraps an Engine: before each request, queue the reply `choose_reply` picks."""

    def __init__(self, engine, model, calls: int, log: list):
        self._engine, self._model, self._calls, self._log = engine, model, calls, log

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, conversation, params=None, cancel=None, key=None, progress=None):
        tokens = conversation if isinstance(conversation, list) else self._engine.render(conversation)
        reply = choose_reply(self._model.encoding.decode(tokens), self._calls)
        self._log.append(reply)
        self._model.push(reply)
        return self._engine.stream(conversation, params, cancel, key, progress)


def sanitize(body):
    """What this branch's server accepts of a recorded body: function tools only (Codex also
    declares namespace and web_search tools, which the Responses work of issue 11 handles)."""
    if isinstance(body, dict) and isinstance(body.get("tools"), list):
        body = {**body, "tools": [t for t in body["tools"] if t.get("type") == "function"]}
    return body


def recording(app, out: Path):
    """An ASGI wrapper appending each request's method, path and JSON body to `out`."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        chunks = []

        async def tap():
            msg = await receive()
            if msg["type"] == "http.request":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body") and scope["method"] == "POST":
                    raw = b"".join(chunks)
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw.decode(errors="replace")
                    with out.open("a") as f:
                        f.write(json.dumps({"method": scope["method"], "path": scope["path"],
                                            "body": body}) + "\n")
                    msg = {**msg, "body": json.dumps(sanitize(body)).encode()}
            return msg

        return await app(scope, tap, send)

    return wrapped


def main(argv=None) -> int:
    import uvicorn

    from oss_mlx.engine import Engine
    from oss_mlx.harmony import load_encoding
    from oss_mlx.server import create_app

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=11500)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calls", type=int, default=3, help="tool calls per user turn (default 3)")
    args = p.parse_args(argv)
    enc = load_encoding(vocab_dir(Path(tempfile.mkdtemp(prefix="oss-mlx-record-"))))
    model = ScriptedModel(encoding=enc, max_context=131072)
    replies: list[str] = []
    engine = PolicyEngine(Engine(model, enc), model, args.calls, replies)
    app = recording(create_app(engine, "scripted-oss"), args.out)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        args.out.with_suffix(".replies.json").write_text(json.dumps(replies, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

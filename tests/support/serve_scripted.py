"""`oss-mlx serve` on a ScriptedModel: the real command, a scripted engine (for agent CLIs).

    python tests/serve_scripted.py --port 12000 --name scripted-oss \
        --reply '<|channel|>analysis<|message|>...<|end|>...' --reply '...'

Each --reply is one harmony token stream (see scripted.py), served to the requests in order.
With --responsive instead, each request gets a reply chosen from its prompt: a final answer
after a tool result, a call to the first declared function ({"city": "Paris"}) when the user
mentions the weather, else a greeting (tests/interop_clients.py runs PyPI clients against it).
Used to record real client traffic (tests/traffic/) and to run a live Codex session.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: tests/ holds the `support` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.scripted import ScriptedModel, scripted_model_dir  # noqa: E402

import re  # noqa: E402

from oss_mlx.cli import options  # noqa: E402
from oss_mlx.cli import serve as server  # noqa: E402
from oss_mlx.engine import Engine  # noqa: E402
from oss_mlx.harmony import load_encoding  # noqa: E402


ANSWER = ("<|channel|>analysis<|message|>The tool answered.<|end|><|start|>assistant"
          "<|channel|>final<|message|>The weather in Paris is sunny.<|return|>")
GREETING = ("<|channel|>analysis<|message|>A greeting.<|end|><|start|>assistant"
            "<|channel|>final<|message|>Hello from oss-mlx.<|return|>")


def responsive_reply(prompt: str) -> str:
    """The reply to a rendered prompt (see the module docstring)."""
    body = prompt[: prompt.rfind("<|start|>assistant")]
    last = body[body.rfind("<|start|>"):]
    tool = re.search(r"namespace functions \{.*?type (\w+) = ", prompt, re.S)
    if last.startswith("<|start|>functions."):
        return ANSWER
    if tool and "weather" in last.lower():
        return ("<|channel|>analysis<|message|>I should call the tool.<|end|><|start|>assistant"
                f"<|channel|>commentary to=functions.{tool.group(1)} <|constrain|>json"
                '<|message|>{"city": "Paris"}<|call|>')
    return GREETING


class Responsive(Engine):
    """An engine over a ScriptedModel that queues `responsive_reply(prompt)` per request."""

    def stream(self, conversation, params=None, cancel=None, key=None, progress=None):
        self.model.push(responsive_reply(self.encoding.decode(conversation)))
        yield from super().stream(conversation, params, cancel, key, progress)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    server.add_arguments(parser)
    parser.add_argument("--reply", action="append", default=[], help="a scripted reply")
    parser.add_argument("--responsive", action="store_true",
                        help="choose each reply from the prompt")
    args = parser.parse_args(argv)
    args.max_concurrency = 1  # a ScriptedModel replays one request at a time (no batching)
    args.model = str(scripted_model_dir(Path(tempfile.mkdtemp(prefix="oss-mlx-scripted-"))))
    args.name = args.name or "scripted-oss"

    def engine(folder: str) -> Engine:
        encoding = load_encoding(folder)
        kind = Responsive if args.responsive else Engine
        # The prompt cache options as `serve` resolved them (--cache-dir, its default, ...).
        return kind(ScriptedModel(*args.reply, encoding=encoding, max_context=131072), encoding,
                    **options.load_options(args).engine_kwargs())

    return server.main(args, engine_factory=engine)


if __name__ == "__main__":
    sys.exit(main())

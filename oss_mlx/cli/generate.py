"""`oss-mlx generate`: one prompt in, the answer out (scriptable, offline).

    oss-mlx generate --prompt "Why is the sky blue?" --reasoning low      # gpt-oss-20b
    echo "2+2?" | oss-mlx generate --model ./gpt-oss-20b-mlx --prompt - --json
    oss-mlx generate --demo --prompt "Hi"                                 # no download

What the user reads (the final answer, a commentary preamble) goes to stdout as it is
generated; the reasoning to stderr with --show-reasoning; notes (a tool call, a turn cut short)
to stderr. --json prints one object {analysis, final, tool_calls, stop_reason, stats} instead.
"""

from __future__ import annotations

import json
import os
import sys

from oss_mlx.cli import options, tools as cli_tools
from oss_mlx.defaults import DEMO_MAX_TOKENS


def add_arguments(p):
    options.add_model(p)
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the user message; '-' reads it from stdin")
    options.add_conversation(p)
    options.add_sampling(p, f"up to the context limit; {DEMO_MAX_TOKENS} with --demo")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--show-reasoning", action="store_true", help="print the reasoning to stderr")
    p.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    cli_tools.add_arguments(p)
    options.add_loading(p)


def _read_prompt(prompt: str) -> str:
    from oss_mlx.errors import OssMlxError

    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise OssMlxError("empty prompt")
    return text


_NOTES = {
    "length": "stopped at --max-tokens",
    "context": "stopped: the model's context is full",
    "cancelled": "stopped by Ctrl-C",
    "malformed": "stopped: the model's output broke the harmony format",
}


def main(args, load_engine=None) -> int:
    """`load_engine(folder)` builds the engine (default: the memory check, then Engine.load);
    tests pass their own."""
    # Never reach for the network: the model folder has everything.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from contextlib import ExitStack

    from oss_mlx.cli.models import choose
    from oss_mlx.engine.types import SamplingParams
    from oss_mlx.harmony import build_conversation, user_message

    prompt = _read_prompt(args.prompt)
    tools = cli_tools.from_args(args)  # --tools, --browse: checked before the model loads
    for note in tools.notes:
        print(f"oss-mlx: note: {note}", file=sys.stderr)
    with ExitStack() as stack:
        chosen = choose(args, stack)
        if load_engine is None:
            from oss_mlx.engine.loading import load_engine as load

            engine = load(str(chosen.folder), options.load_options(args))
        else:
            engine = load_engine(chosen.folder)
        conv = build_conversation([user_message(prompt)], reasoning=args.reasoning,
                                  developer_instructions=args.system)
        max_tokens = args.max_tokens or (DEMO_MAX_TOKENS if chosen.demo else None)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=max_tokens)
        box = cli_tools.GenerateTools(tools, engine.encoding, args.json, args.show_reasoning)
        stack.callback(box.close)
        completion, shown = _stream(engine, conv, params, args, box)
    return _report(engine, completion, shown, args, box.outputs if box.box else None)


def _report(engine, completion, shown: bool, args, tool_outputs=None) -> int:
    if args.json:
        out = completion.to_dict()
        if tool_outputs is not None:  # --tools: each built-in call, its output and error
            out["tool_outputs"] = tool_outputs
        print(json.dumps(out, ensure_ascii=False))
        return 130 if completion.stop_reason == "cancelled" else 0
    for call in completion.tool_calls:
        print(f"oss-mlx: tool call {call['recipient']} {call['arguments']}", file=sys.stderr)
    if not shown and not completion.tool_calls and completion.tokens:
        # Random weights do this: tokens, but no harmony message with an answer in it.
        raw = " ".join(engine.encoding.decode(completion.tokens).split())
        print(f"oss-mlx: note: the model wrote {len(completion.tokens)} tokens but no harmony "
              f"message with an answer (random weights?): {raw[:200]!r}", file=sys.stderr)
    if completion.stop_reason in _NOTES:
        print(f"oss-mlx: {_NOTES[completion.stop_reason]}", file=sys.stderr)
    if args.stats or completion.stop_reason == "cancelled":
        _print_stats(completion.stats)
    return 130 if completion.stop_reason == "cancelled" else 0


def _stream(engine, conv, params, args, tools=None):
    """Run the turn, what the user reads to stdout as it comes (harmony.section_of, the rule
    chat and the server route by too); the first Ctrl-C stops it (the engine returns what was
    made, with its stats), a second one interrupts outright."""
    import signal
    import threading

    from oss_mlx.harmony import section_of

    cancel = threading.Event()
    progress = Progress(sys.stderr) if sys.stderr.isatty() or args.stats else None

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    completion, in_reasoning, shown, last = None, False, False, ""
    try:
        for ev in (tools.events(engine, conv, params, cancel, progress) if tools is not None
                   else engine.stream(conv, params, cancel=cancel, progress=progress)):
            if progress is not None:
                progress.clear()
            if ev.type == "done":
                completion = ev.completion
                continue
            if args.json or ev.type != "delta":
                continue
            section = section_of(ev.channel, ev.recipient)
            if section == "reasoning" and args.show_reasoning:
                sys.stderr.write(ev.text)
                sys.stderr.flush()
                in_reasoning = True
            elif section == "answer":
                if in_reasoning:
                    sys.stderr.write("\n")
                    in_reasoning = False
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                shown, last = shown or bool(ev.text), (ev.text or last)
    finally:
        signal.signal(signal.SIGINT, previous)
        if progress is not None:
            progress.clear()
    if not args.json:
        if shown and not last.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        if in_reasoning:
            sys.stderr.write("\n")
    return completion, shown


class Progress:
    """A long prompt's prefill on stderr, once it has run LongPrefill.AFTER_S: on a terminal one
    line rewritten in place (cleared when the answer starts), else (--stats) a line at each
    tenth of the prompt and at its end."""

    def __init__(self, stream):
        from oss_mlx.cli.output import LongPrefill

        self.stream, self.tty = stream, stream.isatty()
        self.shown = False
        self.tenth = 0
        self.long = LongPrefill()

    def __call__(self, read: int, total: int, tps: float):
        if not self.long.due():
            return
        text = f"oss-mlx: {self.long.text(read, total, tps)}"
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
        elif read * 10 // max(total, 1) > self.tenth or read >= total - 1:
            self.tenth = read * 10 // max(total, 1)
            self.stream.write(text + "\n")
        else:
            return
        self.shown = True
        self.stream.flush()

    def clear(self):
        """The prompt is read; the next prefill (after a built-in tool's call) starts afresh."""
        if self.shown and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.shown, self.tenth = False, 0
        self.long.reset()


def _print_stats(s) -> None:
    print(
        f"oss-mlx: prompt {s.prompt_tokens} tokens ({s.cached_tokens} cached, "
        f"{s.prefilled_tokens} read at {s.prefill_tps:.1f} tok/s), generated "
        f"{s.generated_tokens} tokens ({s.decode_tps:.1f} tok/s), ttft {s.ttft_s:.3f} s, "
        f"peak memory {s.peak_memory_bytes / 2**30:.2f} GiB",
        file=sys.stderr,
    )

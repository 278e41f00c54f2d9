"""`oss-mlx generate`: one prompt in, the final answer out (scriptable, offline).

    oss-mlx generate --model gpt-oss-20b --prompt "Why is the sky blue?" --reasoning low
    echo "2+2?" | oss-mlx generate --model ./gpt-oss-20b-mlx --prompt - --json

The final answer goes to stdout as it is generated; the reasoning (analysis channel) to stderr
with --show-reasoning; notes (a tool call, a turn cut short) to stderr. --json prints one object
{analysis, final, tool_calls, stop_reason, stats} instead.
"""

from __future__ import annotations

import json
import os
import sys

from . import memory
from .config import EFFORTS


def add_arguments(p):
    p.add_argument("--model", required=True, help="converted model folder or model-store name")
    p.add_argument("--prompt", required=True, help="the user message; '-' reads it from stdin")
    p.add_argument("--reasoning", choices=EFFORTS, default="medium",
                   help="reasoning effort (default: medium, harmony's default)")
    p.add_argument("--system", default=None,
                   help="model identity line of the system message (default: harmony's)")
    p.add_argument("--developer", default=None, help="developer instructions")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens to generate, reasoning included (default: up to the context limit)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable output")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--show-reasoning", action="store_true", help="print the reasoning to stderr")
    p.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    memory.add_memory_arguments(p)
    memory.add_decode_arguments(p)


def _read_prompt(prompt: str) -> str:
    from .errors import OssMlxError

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
    """`load_engine(model)` builds the engine (default Engine.load); tests pass their own."""
    # Never reach for the network: the model folder has everything.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .cli import check_sampling
    from .engine import SamplingParams
    from .harmony import build_conversation, user_message

    check_sampling(args)
    prompt = _read_prompt(args.prompt)
    engine = load_engine(args.model) if load_engine else memory.load_engine(args.model, args)
    conv = build_conversation(
        [user_message(prompt)], reasoning=args.reasoning, system=args.system,
        developer_instructions=args.developer,
    )
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens)
    completion, shown = _stream(engine, conv, params, args)
    if args.json:
        print(json.dumps(completion.to_dict(), ensure_ascii=False))
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


def _stream(engine, conv, params, args):
    """Run the turn, the answer to stdout as it comes; the first Ctrl-C stops it (the engine
    returns what was made, with its stats), a second one interrupts outright."""
    import signal
    import threading

    from .harmony import is_tool_call

    cancel = threading.Event()

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    completion, in_reasoning, shown = None, False, False
    try:
        for ev in engine.stream(conv, params, cancel=cancel):
            if ev.type == "done":
                completion = ev.completion
                continue
            if args.json or ev.type != "delta":
                continue
            if ev.channel == "analysis":
                if args.show_reasoning:
                    sys.stderr.write(ev.text)
                    sys.stderr.flush()
                    in_reasoning = True
            elif ev.channel in ("final", None) and not is_tool_call(ev.recipient):
                if in_reasoning:
                    sys.stderr.write("\n")
                    in_reasoning = False
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                shown = shown or bool(ev.text)
    finally:
        signal.signal(signal.SIGINT, previous)
    if not args.json:
        if completion.final and not completion.final.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        if in_reasoning:
            sys.stderr.write("\n")
    return completion, shown


def _print_stats(s) -> None:
    print(
        f"oss-mlx: prompt {s.prompt_tokens} tokens ({s.prefill_tps:.1f} tok/s), generated "
        f"{s.generated_tokens} tokens ({s.decode_tps:.1f} tok/s), ttft {s.ttft_s:.3f} s, "
        f"peak memory {s.peak_memory_bytes / 2**30:.2f} GiB",
        file=sys.stderr,
    )

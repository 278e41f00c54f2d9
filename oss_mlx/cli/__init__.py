"""`oss-mlx`: a thin dispatcher over one module per command.

Each command module defines `add_arguments(parser)` and `main(args) -> int` and keeps its
heavy imports (mlx, fastapi, ...) inside `main`, so that `oss-mlx --help` stays fast. The
options several commands share are defined once, in options.py.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from oss_mlx.errors import OssMlxError

# command -> (module, one-line help)
COMMANDS = {
    "chat": ("oss_mlx.cli.chat", "interactive terminal chat"),
    "generate": ("oss_mlx.cli.generate", "one-shot generation from a prompt (scriptable)"),
    "serve": ("oss_mlx.cli.serve", "OpenAI-compatible local HTTP server"),
    "convert": ("oss_mlx.convert.convert", "convert an upstream checkpoint into an MLX model folder"),
    "list": ("oss_mlx.cli.list", "list the converted models in the local model store"),
    "rm": ("oss_mlx.cli.rm", "remove a model from the local model store"),
    "bench": ("oss_mlx.cli.bench", "measure prefill/decode tokens/s and memory"),
    "eval": ("oss_mlx.cli.eval", "measure tool calling on this machine (BFCL, a long agent loop)"),
    "doctor": ("oss_mlx.cli.doctor", "check the machine and the model store; what fits in memory"),
    "synth": ("oss_mlx.convert.synth", "write a random-weight gpt-oss checkpoint in an upstream layout"),
}

EPILOG = """examples:
  oss-mlx chat --demo                       try it now: a tiny random model, no download
  oss-mlx convert openai/gpt-oss-20b        download and convert the real model once
  oss-mlx chat                              chat with gpt-oss-20b
  oss-mlx generate --prompt "Why is the sky blue?" --reasoning low
  oss-mlx serve                             http://127.0.0.1:8000/v1 for your agents

`oss-mlx COMMAND --help` shows a command's options."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default (unless the text already does, or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in`: a default of 0 (== False) is a default to show.
        if ("default" in text or not action.option_strings or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser, and each command's own parser (to report its errors with its own
    usage)."""
    from oss_mlx import __version__

    parser = argparse.ArgumentParser(
        prog="oss-mlx", description="Run OpenAI's gpt-oss natively on MLX, offline.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"oss-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {}
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
        commands[name] = p
    return parser, commands


def parse(argv: list[str] | None):
    """The parsed arguments; an unknown option is reported with its own command's usage."""
    parser, commands = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        (commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return parser, args


def main(argv: list[str] | None = None, load_engine=None) -> int:
    """`load_engine(model)`: how generate and chat build their engine (default: the memory
    check and Engine.load); tests pass one that replays scripted harmony streams."""
    try:
        return _main(argv, load_engine)
    except KeyboardInterrupt:  # also while the heavy modules are still importing
        print("oss-mlx: interrupted", file=sys.stderr)
        return 130


def _main(argv, load_engine) -> int:
    parser, args = parse(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        if load_engine is not None:
            return int(args._main(args, load_engine=load_engine) or 0)
        return int(args._main(args) or 0)
    except OssMlxError as e:
        print(f"oss-mlx: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `oss-mlx generate ... | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, never a traceback
        if os.environ.get("OSS_MLX_DEBUG"):
            raise
        print(f"oss-mlx: error: {type(e).__name__}: {e} (set OSS_MLX_DEBUG=1 for details)",
              file=sys.stderr)
        return 1

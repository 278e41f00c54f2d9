"""`oss-mlx` command line: a thin dispatcher over one module per command.

Each command module defines `add_arguments(parser)` and `main(args) -> int`, and keeps its
heavy imports (mlx, fastapi, ...) inside `main` so that `oss-mlx --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import OssMlxError

# command -> (module, one-line help)
COMMANDS = {
    "synth": ("oss_mlx.convert.synth", "write a random-weight gpt-oss checkpoint in an upstream layout"),
    "convert": ("oss_mlx.convert.convert", "convert an upstream checkpoint into an MLX model folder"),
    "list": ("oss_mlx.store", "list the converted models in the local model store"),
    "generate": ("oss_mlx.generate", "one-shot generation from a prompt"),
    "chat": ("oss_mlx.chat", "interactive terminal chat"),
    "bench": ("oss_mlx.bench", "measure prefill/decode tokens/s and memory"),
    "serve": ("oss_mlx.server", "OpenAI-compatible local HTTP server"),
}


def check_sampling(args) -> None:
    """The one rule for the sampling options that generate and chat share: --max-tokens, when
    given, is at least 1 (0 is refused, never read as "the default"); temperature >= 0; top-p in
    (0, 1]."""
    if args.max_tokens is not None and args.max_tokens < 1:
        raise OssMlxError("--max-tokens must be at least 1 (leave it out for the default)")
    if args.temperature < 0 or not (0 < args.top_p <= 1):
        raise OssMlxError("--temperature must be >= 0 and --top-p in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="oss-mlx", description="Run gpt-oss natively on MLX.")
    parser.add_argument("--version", action="version", version=f"oss-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None, load_engine=None) -> int:
    """`load_engine(model)`: how generate and chat build their engine (default Engine.load);
    tests pass one that replays scripted harmony streams (tests/scripted.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("oss-mlx: interrupted", file=sys.stderr)
        return 130
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


if __name__ == "__main__":
    sys.exit(main())

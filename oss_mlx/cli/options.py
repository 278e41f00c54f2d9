"""The command line's options, each defined once: every command that takes an option adds it
with the function here, so its name, placeholder, default, help and check are the same
everywhere. Checks run with `check(args)` before anything is loaded.

Nothing here imports MLX: `oss-mlx --help` stays fast.
"""

from __future__ import annotations

import argparse

from oss_mlx.defaults import (
    DEFAULT_MODEL,
    DEMO_NAME,
    DISK_CACHE_SIZE,
    EFFORTS,
    KV_BITS,
    check_seed,
    parse_size,
)
from oss_mlx.errors import OssMlxError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _seed(text: str) -> int | None:
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    except OssMlxError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--seed ")) from None


def size(text: str) -> str:
    try:
        parse_size(text)
    except OssMlxError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return text


def _unit(text: str, low: float, high: float, low_open: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (low < value if low_open else low <= value) or value > high:
        raise argparse.ArgumentTypeError(f"{value:g} is outside {'(' if low_open else '['}"
                                         f"{low:g}, {high:g}]")
    return value


# ---- which model --------------------------------------------------------------------------


def add_model(parser, demo: bool = True) -> None:
    """--model M (default gpt-oss-20b from the store) and, for the commands that run one,
    --demo (a tiny random-weight model made on the spot, served as DEMO_NAME)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", "-m", metavar="MODEL", default=None,
                       help="a store name, a converted model folder or a Hub id already "
                            f"converted (default: {DEFAULT_MODEL})")
    if demo:
        which.add_argument("--demo", action="store_true",
                           help=f"use a tiny random-weight model made on the spot, named "
                                f"{DEMO_NAME!r} (no download; its output is noise): try "
                                "everything before converting a real model")


# ---- the conversation -------------------------------------------------------------------------


def add_reasoning(parser) -> None:
    """--reasoning: the effort of the harmony system message."""
    parser.add_argument("--reasoning", choices=EFFORTS, default="medium", metavar="EFFORT",
                        help=f"reasoning effort: {', '.join(EFFORTS)} (default: medium)")


def add_conversation(parser) -> None:
    """--reasoning and --system: the harmony system and developer messages."""
    add_reasoning(parser)
    parser.add_argument("--system", "--developer", dest="system", metavar="TEXT", default=None,
                        help="instructions for the model (the harmony developer message)")


def add_sampling(parser, max_tokens_default: str | int, temperature: float = 1.0,
                 seed: int | None = None) -> None:
    """--max-tokens, --temperature, --top-p and --seed. `max_tokens_default`: what no
    --max-tokens means for this command (a number is the default itself); `temperature` and
    `seed`: this command's defaults (eval scores greedily)."""
    number = isinstance(max_tokens_default, int)
    parser.add_argument("--max-tokens", metavar="N", type=positive_int,
                        default=max_tokens_default if number else None,
                        help=f"most tokens per answer, reasoning included (default: "
                             f"{max_tokens_default})")
    why = "OpenAI's advice" if temperature == 1.0 else "greedy, for scores that repeat"
    parser.add_argument("--temperature", metavar="T", type=lambda t: _unit(t, 0, 2),
                        default=temperature, help=f"sampling temperature in [0, 2], 0 = greedy "
                                                  f"(default: {temperature:g}, {why})")
    parser.add_argument("--top-p", metavar="P", type=lambda t: _unit(t, 0, 1, low_open=True),
                        default=1.0, help="nucleus sampling, in (0, 1] (default: 1.0 = off)")
    parser.add_argument("--seed", metavar="S", type=_seed, default=seed,
                        help="random seed, 0..2**64-1, for repeatable output (default: "
                             f"{'random' if seed is None else seed})")


# ---- loading ----------------------------------------------------------------------------------


def add_memory(parser, max_context: str = "the model's, 131072",
               kv_note: str = "") -> None:
    """--max-context, --kv-bits and --force: the memory plan's options. `max_context`: what no
    --max-context means for this command; `kv_note`: what --kv-bits implies there."""
    parser.add_argument("--max-context", type=positive_int, default=None, metavar="N",
                        help=f"longest context to plan for and allow (default: {max_context})")
    parser.add_argument("--kv-bits", type=int, choices=list(KV_BITS), default=None,
                        metavar="BITS", help="quantize the full-attention layers' KV cache to "
                                             f"8 or 4 bits{kv_note} (default: off)")
    parser.add_argument("--force", action="store_true",
                        help="load even when the memory plan says the model does not fit")


def add_loading(parser, cache: bool = False) -> None:
    """--max-context, --kv-bits, --force and --no-compile for the commands that load a model;
    with `cache`, the prompt cache's --cache-memory, --cache-dir and --cache-disk."""
    add_memory(parser)
    parser.add_argument("--no-compile", action="store_true",
                        help="decode on the plain forward instead of the compiled step")
    if cache:
        parser.add_argument("--cache-memory", default=None, metavar="SIZE", type=size,
                            help="memory for the prompt cache of many conversations, e.g. 8GB "
                                 "(default: an eighth of this machine's memory)")
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--cache-dir", default=None, metavar="DIR",
                           help="keep the prompt cache on disk in DIR: entries evicted from "
                                "memory, and all of it at shutdown; a later hit restores them, "
                                "also after a restart (default: "
                                "$OSS_MLX_HOME/prompt-cache/MODEL, a folder per model)")
        where.add_argument("--no-cache-dir", action="store_true",
                           help="keep the prompt cache in memory only")
        parser.add_argument("--cache-disk", default=DISK_CACHE_SIZE, metavar="SIZE", type=size,
                            help=f"most disk space the prompt cache may take, per model "
                                 f"(default: {DISK_CACHE_SIZE})")


def load_options(args):
    """The engine's LoadOptions from add_loading's flags."""
    from oss_mlx.engine.loading import LoadOptions

    memory = getattr(args, "cache_memory", None)
    disk = getattr(args, "cache_disk", None)
    return LoadOptions(max_context=args.max_context, kv_bits=args.kv_bits, force=args.force,
                       compiled=not args.no_compile,
                       cache_memory=parse_size(memory) if memory is not None else None,
                       cache_dir=getattr(args, "cache_dir", None),
                       cache_disk=parse_size(disk) if disk is not None else None)

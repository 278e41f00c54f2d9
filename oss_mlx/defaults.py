"""Every default and allowed value that more than one place needs, and the checks of values
that the command line and the server share (a seed, a size).

A module that needs one of these imports it from here; none writes the literal again.
"""

from __future__ import annotations

import re

from oss_mlx.errors import OssMlxError

# ---- models and commands --------------------------------------------------------------------

DEFAULT_MODEL = "gpt-oss-20b"  # chat, generate, serve without --model
DEMO_NAME = "tiny-random"  # what --demo serves and answers as
DEMO_MAX_TOKENS = 256  # a demo answer's budget: random weights rarely stop by themselves
EFFORTS = ("low", "medium", "high")  # the harmony system message's (docs/harmony.md §5.3)
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes a command line may name

# ---- the engine -----------------------------------------------------------------------------

PREFILL_CHUNK = 512  # tokens per prefill chunk (the engine's and Model.prefill's)
MAX_SNAPSHOTS = 96  # sliding-window snapshots kept per prompt-cache entry
DISK_CACHE_SIZE = "16GB"  # --cache-disk
MAX_BODY = "32MB"  # serve --max-body: the largest request body (a 131k-token prompt is ~1 MB)
KV_BITS = (8, 4)  # --kv-bits: the quantized KV cache (oss_mlx/model/kv_quant.py)
KV_GROUP_SIZE = 64  # = gpt-oss's head_dim: one scale and one bias per head vector
MOE_SPLITS = ("tp", "ep")  # how a launch splits the experts (oss_mlx/model/shard.py)
MOE_SPLIT = "tp"

# ---- values ---------------------------------------------------------------------------------

SEED_MAX = 2**64 - 1  # a seed is a 64-bit unsigned integer (numpy's and MLX's range)


def check_seed(seed: int | None, where: str = "--seed") -> int | None:
    """The one rule for a seed: None or 0..2**64-1; -1 means random (as no seed), as clients
    that mean "random" send it; anything else is refused in one line."""
    if seed is None or seed == -1:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise OssMlxError(f"{where} must be between 0 and 2**64-1 (or -1 for random), "
                          f"got {seed!r}")
    return seed


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?)B?\s*", re.IGNORECASE)


def parse_size(text, where: str = "size") -> int:
    """Bytes from "512MB", "8G", "12.5 GB", "16GiB" or a plain byte count. K, M, G, T are powers
    of 1000 with or without a B (as oss-mlx prints sizes); KiB, MiB, GiB, TiB powers of 1024."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise OssMlxError(f"{where}: {text!r} is not a size (write e.g. 512MB, 8GB or 16GiB)")
    number, unit, binary = m.groups()
    if binary and not unit:
        raise OssMlxError(f"{where}: {text!r} is not a size (write e.g. 512MB, 8GB or 16GiB)")
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))

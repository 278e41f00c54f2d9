"""Loading an engine the way every command does: the memory check first, then the model, then
the KV format and context limit the plan was made for; under mlx.launch, every rank its share
(oss_mlx/engine/distributed.py).

    engine = load_engine("gpt-oss-20b", LoadOptions(max_context=32768, kv_bits=8))
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from oss_mlx.errors import OssMlxError


@dataclass
class LoadOptions:
    """What a command asks of the model it loads (cli/options.py builds it from the flags)."""

    max_context: int | None = None  # the context planned for and allowed (None: the model's)
    kv_bits: int | None = None  # quantized KV cache on the full-attention layers (8 or 4)
    force: bool = False  # load even when the memory plan says it does not fit
    compiled: bool = True  # decode single requests on the compiled step (False: --no-compile)
    dtype: str | None = None  # compute dtype (None: OSS_MLX_DTYPE, else the model's default)
    cache_memory: int | None = None  # prompt cache budget in bytes (None: an eighth of RAM)
    cache_dir: object = None  # keep evicted prompt-cache entries here: a folder, or a
    # disk_cache.PerModel root (a folder per model under it); None: in memory only
    cache_disk: int | None = None  # most bytes cache_dir may take

    def engine_kwargs(self) -> dict:
        return {"compiled": self.compiled, "cache_memory": self.cache_memory,
                "cache_dir": self.cache_dir, "cache_disk": self.cache_disk}


def apply(model, options: LoadOptions) -> None:
    """After loading: the KV format and the context limit the plan was made for."""
    model.kv_bits = options.kv_bits
    if options.max_context:
        model.max_context = int(options.max_context)


def load_engine(model: str, options: LoadOptions | None = None):
    """The one way chat, generate and serve load their engine: the memory plan checked before
    loading (a one-line refusal unless `force`), then Engine.load, then `apply`. Under
    mlx.launch every rank checks and loads its own share (distributed.launch_engine)."""
    from oss_mlx.engine import distributed
    from oss_mlx.engine.engine import Engine
    from oss_mlx.engine.memory import check_fits
    from oss_mlx.store import resolve_model

    options = options or LoadOptions()
    dtype = options.dtype or os.environ.get("OSS_MLX_DTYPE") or None  # e.g. float32 to compare
    try:
        folder = resolve_model(model)
    except OssMlxError:
        folder = None  # Engine.load says why, in its own words

    def check(rank: int = 0, size: int = 1, moe: str | None = None):
        if folder is not None:
            kw = {"moe": moe} if moe else {}
            check_fits(folder, options.max_context, options.kv_bits, options.force,
                       rank=rank, size=size, **kw)

    group = distributed.init() if distributed.launched() else None
    if group is not None and group.size() > 1:
        return distributed.launch_engine(model, group, dtype, check,
                                         lambda m: apply(m, options), options.engine_kwargs())
    check()
    engine = Engine.load(model, dtype=dtype, **options.engine_kwargs())
    apply(engine.model, options)
    return engine

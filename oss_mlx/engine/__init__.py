"""The engine: one request at a time (engine.py) or many in one batched step (batch.py,
scheduler.py), over a prompt cache of many conversations (prompt_cache.py, disk_cache.py);
the memory plan made before loading (memory.py, machine.py, loading.py); one model over the
ranks of an mlx.launch (distributed.py).

    from oss_mlx.engine import Engine, SamplingParams

The names below are imported when first used, so a module that needs only a small piece (the
command line's options) does not load MLX.
"""

import importlib

_EXPORTS = {
    "Engine": "oss_mlx.engine.engine",
    "SamplingParams": "oss_mlx.engine.types",
    "Stats": "oss_mlx.engine.types",
    "Completion": "oss_mlx.engine.types",
    "Event": "oss_mlx.engine.types",
    "STOP_REASONS": "oss_mlx.engine.types",
    "LoadOptions": "oss_mlx.engine.loading",
    "load_engine": "oss_mlx.engine.loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

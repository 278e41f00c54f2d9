"""MLX streams belong to the thread that made them: the helpers for threads that run MLX work."""

from __future__ import annotations

import sys
import threading


def release_streams():
    """Free the MLX streams of this thread before it ends. MLX no longer cleans up at exit by
    itself: a thread that ran MLX work and exits without this can abort the process at
    shutdown ("terminate called without an active exception", exit 134)."""
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].clear_streams()


def in_own_thread(fn):
    """fn() in a new thread, waited for: MLX streams are per thread and `mx.clear_streams()`
    (release_streams) leaves a thread unable to run any MLX op, so work that may come
    after it (the exit hook) gets fresh ones, released again when it is done."""

    def run():
        try:
            fn()
        finally:
            release_streams()

    t = threading.Thread(target=run, name="oss-mlx-stop")
    t.start()
    t.join()

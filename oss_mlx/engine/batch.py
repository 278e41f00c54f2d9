"""Continuous batching: several requests decode in one step. There is one request loop for a
request alone and for many (oss_mlx/engine/loop.py, docs/engine.md "The request loop"); a
`Batcher` is that loop with room for many rows, driven by hand:

    batcher = Batcher(engine)
    batcher.add(job)            # job.conversation: prompt tokens; job.params, job.cancel,
                                # job.key, job.put(item): see oss_mlx.engine.loop
    while batcher.busy:
        finished = batcher.step()   # the jobs whose done event was just put
"""

from __future__ import annotations

from oss_mlx.engine.loop import Loop


class Batcher(Loop):
    def __init__(self, engine, max_rows: int = 64):
        super().__init__(engine, max_rows)

"""The server's generation queue: one worker thread between the HTTP coroutines and the engine.

    scheduler = Scheduler(engine, max_concurrency=4)   # inside a running event loop
    job = scheduler.submit(prompt_tokens, SamplingParams(...), key=None)
    async for ev in events(job):                          # the engine's Events; leaving cancels
        ...
    scheduler.close()

Requests wait in a FIFO queue. With max_concurrency 1 the worker runs them one at a time through
Engine.stream. With more, up to max_concurrency requests are in flight at once in an
oss_mlx.batch.Batcher: they decode together in one batched model step, a newcomer's prefill is
interleaved chunk by chunk, and the rest wait their turn in arrival order. Either way a job's
events travel from the worker to the request's event loop through an asyncio queue (streaming
never blocks the loop), and a client that goes away sets the job's cancel event: a queued job is
never run, a running one stops before its next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from oss_mlx.engine.threads import release_streams

_END = object()
log = logging.getLogger("oss_mlx.server")


@dataclass(eq=False)  # hashed by identity: the scheduler keeps a set of running jobs
class Job:
    conversation: Any  # prompt tokens (or anything Engine.stream takes, when serial)
    params: Any
    loop: asyncio.AbstractEventLoop
    key: Optional[str] = None  # prompt-cache hint (prompt_cache_key, user)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, item):
        # Called from the worker thread: hand the item to the request's event loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancel.set()


class Scheduler:
    """A worker thread that runs queued jobs through the engine, first come first served."""

    def __init__(self, engine, max_concurrency: int = 1):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        self.engine = engine
        self.max_concurrency = max_concurrency
        self._running: set[Job] = set()
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="oss-mlx-engine", daemon=True)
        self._thread.start()

    def submit(self, conversation, params, key: str | None = None) -> Job:
        job = Job(conversation, params, asyncio.get_running_loop(), key)
        self._jobs.put(job)
        return job

    def cancel_all(self):
        """Cancel the running jobs and every queued one; they end at their next token."""
        for job in list(self._jobs.queue):
            if job is not None:
                job.cancel.set()
        for job in list(self._running):
            job.cancel.set()

    def close(self):
        """Stop after cancelling the running jobs and every queued one."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.put(_END)
        for job in list(self._running):
            job.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _next(self, block: bool):
        """The next queued job that is still wanted; None on close; False when none waits."""
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return False
            if job is None or not job.cancel.is_set():
                return job
            job.put(_END)  # the client left while waiting its turn

    def _run(self):
        try:
            self._run_serial() if self.max_concurrency == 1 else self._run_batched()
        finally:
            release_streams()

    def _run_serial(self):
        while (job := self._next(block=True)) is not None:
            self._running.add(job)
            try:
                for ev in self.engine.stream(job.conversation, job.params, cancel=job.cancel):
                    job.put(ev)
            except Exception as e:  # noqa: BLE001 - reported to that request, the server lives on
                job.put(e)
            finally:
                self._running.discard(job)
            job.put(_END)

    def _admit(self, batcher, block: bool) -> bool:
        """Move queued jobs into the batcher while it has room; False once close() was called."""
        while len(batcher) < self.max_concurrency:
            job = self._next(block=block and not batcher.busy)
            if job is False:
                return True
            if job is None:
                return False
            try:
                batcher.add(job)
            except Exception as e:  # noqa: BLE001 - e.g. a prompt too long: that request only
                job.put(e)
                job.put(_END)
                continue
            self._running.add(job)
        return True

    def _run_batched(self):
        from mlx_lm.generate import generation_stream, wired_limit

        from oss_mlx.engine.batch import Batcher

        batcher = Batcher(self.engine)
        open_ = True
        with wired_limit(self.engine.model, [generation_stream]):
            while open_ or batcher.busy:
                if open_:
                    open_ = self._admit(batcher, block=True)
                if not open_:
                    for job in self._running:
                        job.cancel.set()
                if not batcher.busy:
                    continue
                try:
                    finished = batcher.step()
                except Exception as e:  # noqa: BLE001 - the requests in flight fail, not the server
                    log.error("batched step failed: %s: %s", type(e).__name__, e)
                    finished = batcher.abort(e)
                for job in finished:
                    self._running.discard(job)
                    job.put(_END)


async def events(job: Job):
    """The engine events of `job`; leaving early (client gone, stop string) cancels it."""
    try:
        while (ev := await job.events.get()) is not _END:
            if isinstance(ev, Exception):
                raise ev
            yield ev
    finally:
        job.cancel.set()

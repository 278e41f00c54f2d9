"""The server's generation queue: one worker thread between the HTTP coroutines and the engine.

    scheduler = Scheduler(engine, max_concurrency=4)   # inside a running event loop
    job = scheduler.submit(prompt_tokens, SamplingParams(...), key=None)
    async for ev in events(job):                          # the engine's Events; leaving cancels
        ...
    scheduler.close()

Requests wait in a FIFO queue. The worker runs them through the engine's request loop
(oss_mlx/engine/loop.py, the same loop `Engine.stream` runs a lone request through): up to
max_concurrency requests are in flight at once and decode together in one step (the compiled
step when the model has one), a newcomer's prefill is interleaved chunk by chunk, and the rest
wait their turn in arrival order. With max_concurrency 1 they run one at a time, each through
`Engine.stream` (the same loop with one row; an engine that wraps `stream` sees every request). A job's events
travel from the worker to the request's event loop through an asyncio queue (streaming never
blocks the loop), and a client that goes away sets the job's cancel event: a queued job is never
run, a running one stops before its next token (or its next prefill chunk).
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
            self._run_serial() if self.max_concurrency == 1 else self._run_loop()
        finally:
            release_streams()

    def _run_serial(self):
        """One at a time: each job through `engine.stream` (the same loop, with one row), so
        an engine that wraps `stream` (a tool runner, the tests' doubles) sees every request."""
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

    def _run_loop(self):
        from mlx_lm.generate import generation_stream, wired_limit

        loop = self.engine.make_loop(self.max_concurrency)
        with wired_limit(self.engine.model, [generation_stream]):
            while (job := self._next(block=True)) is not None:
                with self.engine._lock:  # the model is this loop's until it is idle
                    if not self._serve(loop, job):
                        break

    def _serve(self, loop, first: Job) -> bool:
        """Run the loop from `first` until it is idle, admitting queued jobs while it has
        room; False once close() was called (the jobs in flight are cancelled and finish)."""
        open_ = self._admit(loop, first)
        while loop.busy:
            while open_ and len(loop) < self.max_concurrency:
                job = self._next(block=False)
                if job is False:
                    break
                open_ = self._admit(loop, job)
            if not open_:
                for job in self._running:
                    job.cancel.set()
            try:
                finished = loop.step()
            except Exception as e:  # noqa: BLE001 - the requests in flight fail, not the server
                log.error("step failed: %s: %s", type(e).__name__, e)
                finished = loop.abort(e)
            for job in finished:
                self._running.discard(job)
                job.put(_END)
        return open_

    def _admit(self, loop, job) -> bool:
        """Add a job to the loop; False when it is close()'s None."""
        if job is None:
            return False
        try:
            loop.add(job)
        except Exception as e:  # noqa: BLE001 - e.g. a prompt too long: that request only
            job.put(e)
            job.put(_END)
            return True
        self._running.add(job)
        return True


async def events(job: Job):
    """The engine events of `job`; leaving early (client gone, stop string) cancels it."""
    try:
        while (ev := await job.events.get()) is not _END:
            if isinstance(ev, Exception):
                raise ev
            yield ev
    finally:
        job.cancel.set()

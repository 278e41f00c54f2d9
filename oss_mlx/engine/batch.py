"""Continuous batching: several requests decode in one batched model step.

    from oss_mlx.engine.batch import Batcher

    batcher = Batcher(engine)
    batcher.add(job)            # job.conversation: prompt tokens; job.params: SamplingParams;
                                # job.cancel: threading.Event; job.key: prompt-cache hint or None;
                                # job.put(item): receives the engine's Events (delta/message/done)
    while batcher.busy:
        finished = batcher.step()   # the jobs whose done event was just put

A request's life: `engine.acquire` hands it a private B=1 cache holding the longest cached
prefix of its prompt; `engine.prefill_steps` feeds the rest but the last token, one chunk per
`step()`, between batched decode steps, so running streams keep flowing; then its B=1 caches are
merged into the batch caches (mlx-lm's BatchKVCache / BatchRotatingKVCache: left-padded rows, a
per-row offset for RoPE, masks that give each row exactly the keys it sees alone, sinks and
sliding window included) and its last prompt token is fed in the next batched step, which samples
its first token. Each row is an oss_mlx.engine.request.Request, as in Engine.stream: its own sampler (a
per-row key, so a seed gives the same tokens whatever else runs), logits processors, harmony
parser (consumers see the same events), token limit, figures and cancel event. When a row ends, its
B=1 cache is extracted from the batch and handed back, without a final stop token, with
`engine.release(prompt + completion)` (release undoes the stop token it was fed last).

Steps are pipelined as in Engine.stream: the next step is queued before this one's tokens are
read, so every sampled token is fed once (a finished row's last token included, then dropped).
Fair order: requests are admitted and prefilled first come first served, one prefill chunk per
step, and every decoding row advances one token per step.

Single-threaded: one thread (the server's scheduler) calls add / step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream

from oss_mlx.engine.request import Request
from oss_mlx.engine.types import Event


def _key(job) -> Optional[str]:
    """The prompt-cache hint of a request: the job's, else its SamplingParams' (cache_key)."""
    return getattr(job, "key", None) or getattr(job.params, "cache_key", None)


@dataclass
class _Row:
    """One request in flight: prefilling (cache, steps set) or decoding (in the batch)."""

    job: Any
    req: Request
    cache: Optional[list] = None  # the private B=1 caches while prefilling
    # The list `acquire` gave, once its layers are in the batch: it may carry the prompt cache's
    # state for this request (e.g. snapshots), so the row's extracted layers go back into it.
    held: Optional[list] = None
    steps: Any = None  # engine.prefill_steps iterator
    fresh: bool = True  # its input in the batch is the last prompt token, nothing to emit yet

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt

    @property
    def history(self) -> list[int]:
        return self.req.prompt + self.req.generated


class Batcher:
    """The rows of one engine's model, decoding together; see the module docstring."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        self._prefilling: deque[_Row] = deque()
        self._rows: list[_Row] = []  # decoding, in batch order
        self._caches: Optional[list] = None  # one batched cache per layer
        self._y = None  # next input token of each row [B]
        self._steps = 0

    @property
    def busy(self) -> bool:
        return bool(self._prefilling or self._rows)

    def __len__(self) -> int:
        return len(self._prefilling) + len(self._rows)

    # ---- admission and prefill ----

    def add(self, job):
        """Admit a request (its prompt: job.conversation, a list of token ids)."""
        prompt = list(job.conversation)
        cache, start = self.engine.acquire(prompt, _key(job))
        req = Request.start(prompt, job.params, self.engine.encoding, self.engine.max_context,
                            cached=start, cancel=job.cancel)
        row = _Row(job, req, cache=cache)
        row.steps = iter(self.engine.prefill_steps(prompt, cache, start, cancel=job.cancel))
        self._prefilling.append(row)

    def _prefill_one(self) -> list:
        """One prefill chunk of the oldest prefilling request; it joins the batch when done."""
        row = self._prefilling[0]
        if row.job.cancel.is_set() or row.req.limit == 0:
            self._prefilling.popleft()
            self._finish(row, "cancelled" if row.req.limit else row.req.limit_reason, row.cache)
            return [row.job]
        with mx.stream(generation_stream):
            next(row.steps, None)
            if row.cache[0].offset < len(row.prompt) - 1 and not row.job.cancel.is_set():
                return []
            for _ in row.steps:  # let prefill_steps finish its bookkeeping (no more chunks)
                pass
        self._prefilling.popleft()
        if row.job.cancel.is_set():  # prefill_steps stopped early
            self._finish(row, "cancelled", row.cache)
            return [row.job]
        self._join(row)
        return []

    def _join(self, row: _Row):
        """Merge the row's B=1 caches (all its prompt but the last token) into the batch."""
        merged = [type(c).merge([c]) for c in row.cache]
        row.held, row.cache, row.steps = row.cache, None, None
        last = mx.array([row.prompt[-1]], dtype=mx.uint32)
        if self._caches is None:
            self._caches, self._y = merged, last
        else:
            for batch, one in zip(self._caches, merged):
                batch.extend(one)
            self._y = mx.concatenate([self._y.astype(mx.uint32), last])
        self._rows.append(row)

    # ---- decoding ----

    def _sample(self, logits):
        """Tokens [B] for logits [B, V], each row with its own sampler."""
        logits = logits.astype(mx.float32)
        if all(r.req.sampler.plain_greedy for r in self._rows):
            return mx.argmax(logits, axis=-1)
        return mx.concatenate([r.req.sampler(partial(self._history, i), logits[i : i + 1])
                               for i, r in enumerate(self._rows)])

    def _history(self, i: int):
        """Row i's tokens of this turn so far (what SamplingParams.logits_processors see, as in
        Engine.stream), the one this step feeds included (not read yet: pipelined)."""
        row = self._rows[i]
        return row.req.history(None if row.fresh else self._y[i : i + 1])

    def step(self) -> list:
        """One prefill chunk (if a request is prefilling), then one batched decode step.

        Returns the jobs that finished (their done event was put).
        """
        finished = self._prefill_one() if self._prefilling else []
        if not self._rows:
            return finished
        with mx.stream(generation_stream):
            logits = self.model(self._y[:, None], cache=self._caches)[:, -1, :]
            nxt = self._sample(logits)
        mx.async_eval(nxt)  # queued before reading this step's inputs: the device never waits
        tokens = self._y.tolist()
        keep, done = [], []
        for i, (row, tok) in enumerate(zip(self._rows, tokens)):
            reason = None if row.fresh else self._emit(row, tok)
            row.fresh = False
            (keep if reason is None else done).append((i, row, reason))
        for i, row, reason in done:
            self._finish(row, reason, self._extract(i, row))
            finished.append(row.job)
        if done:
            self._keep([i for i, _, _ in keep], nxt)
        else:
            self._y = nxt
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()
        return finished

    def _emit(self, row: _Row, tok: int) -> Optional[str]:
        """Feed one sampled token to the row's request and pass on its events; a stop reason
        when the row ends."""
        reason = row.req.emit(tok)
        for ev in row.req.parser.drain():
            row.job.put(ev)
        return row.req.stop_reason(reason)

    def _extract(self, i: int, row: _Row) -> list:
        """Row i's B=1 caches: its prompt and every token it sampled (the last one included)."""
        row.held[:] = [c.extract(i) for c in self._caches]
        return row.held

    def _keep(self, keep: list[int], nxt):
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._caches, self._y = None, None
            return
        for c in self._caches:
            c.filter(mx.array(keep))
        self._y = nxt[mx.array(keep)]

    def _finish(self, row: _Row, reason: str, cache):
        """Hand back the row's cache, then put its last events and the done event."""
        if cache is not None:
            # The cache holds prompt + completion (one more token fed last is undone).
            tokens = row.history[: cache[0].offset if cache else 0]
            self.engine.release(row.req.kept_tokens(tokens, reason), cache, _key(row.job))
        completion = row.req.finish(reason)
        for ev in row.req.parser.drain():
            row.job.put(ev)
        row.job.put(Event("done", completion=completion))

    def abort(self, error: BaseException) -> list:
        """After a failed step: put `error` to every request in flight, forget them all (their
        caches are in an unknown state and are not given back); returns their jobs."""
        jobs = [r.job for r in list(self._prefilling) + self._rows]
        for job in jobs:
            job.put(error)
        self._prefilling.clear()
        self._rows, self._caches, self._y = [], None, None
        return jobs

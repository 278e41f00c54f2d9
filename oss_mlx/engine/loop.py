"""The one request loop: every request, alone or beside others, from `generate`, `chat` or the
server, runs through `Loop` (docs/engine.md, "The request loop").

    loop = Loop(engine, max_rows=4)
    loop.add(job)       # job.conversation: prompt tokens; job.params: SamplingParams; job.cancel:
                        # an Event (or None); job.key: prompt-cache hint; job.put(item): gets the
                        # Events; optional job.progress(read, total, tok_s), job.t0
    while loop.busy:
        finished = loop.step()   # the jobs whose done event was just put

A request's life: `engine.acquire` hands it a private B=1 cache holding the longest cached prefix
of its prompt; `engine.prefill_steps` feeds the rest but the last token, one chunk per step (its
size from the engine's PrefillPace: the per-step token budget); then the last prompt token's
logits give its first token, and its caches join the decoding rows (engine/rows.py): the model's
compiled step when it has one (rows at their own lengths in one step), else the plain forward.
Each row is a `Request` (engine/request.py): its own sampler (a per-row key: a seed gives the
same tokens alone or in any batch), logits processors, harmony parser, token limit, figures.
When a row ends its B=1 caches go back to the prompt cache, without a final stop token.

Steps are pipelined: the next step is queued before this one's tokens are read, so the device
never waits on Python; a row's token is fed in the step that reads it, except the last one its
limit allows when it is a stop token or the context has no room for it: that one is read before
the step and never fed. Every decision of a step (which rows are
cancelled, how long the prefill chunk is) is taken once, at its start, in a `Plan`: alone the
loop makes its own; in a launch rank 0 makes it and every rank runs it (engine/distributed.py),
so all ranks step alike. Single-threaded: one thread calls add / step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream

from oss_mlx.engine.request import Request
from oss_mlx.engine.types import Event
from oss_mlx.harmony.encoding import END, STOPS


def job_key(job) -> Optional[str]:
    """The prompt-cache hint of a request: the job's, else its SamplingParams' (cache_key)."""
    return getattr(job, "key", None) or getattr(job.params, "cache_key", None)


@dataclass
class Plan:
    """What a step does beyond decoding every row: the rows it cancels (their places among the
    prefilling rows then the decoding ones, the same on every rank of a launch, where a row's
    id is not) and the size of its prefill chunk (0: none)."""

    cancel: list = field(default_factory=list)
    chunk: int = 0


@dataclass
class Row:
    """One request in flight: prefilling (steps set), then decoding (in the store)."""

    id: int
    job: Any
    req: Request
    held: list  # what `acquire` gave (its snapshots); the row's caches go back into it
    steps: Any = None
    start: int = 0  # cached tokens
    pos: int = 0  # tokens in the cache while prefilling
    t_read: float = 0.0

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt

    @property
    def history(self) -> list[int]:
        return self.req.prompt + self.req.generated


class Loop:
    """The rows of one engine's model: prefilling under a per-step budget, decoding together."""

    def __init__(self, engine, max_rows: int = 1, local_cancel: bool = True,
                 leads: bool = False):
        self.engine = engine
        self.max_rows = max_rows
        # Whether prefill may stop early on a row's own cancel event (not in a launch, where
        # only the plan decides), and whether this loop decides for a launch's ranks.
        self.local_cancel, self.leads = local_cancel, leads
        self._prefilling: deque[Row] = deque()
        self._rows: list[Row] = []  # decoding, in the store's order
        self.store = None
        self._y = None  # each decoding row's next input token [B]
        self._ids = 0
        self.steps = 0

    @property
    def busy(self) -> bool:
        return bool(self._prefilling or self._rows)

    def __len__(self) -> int:
        return len(self._prefilling) + len(self._rows)

    @property
    def decoding(self) -> int:
        return len(self._rows)

    # ---- admission ----

    def add(self, job) -> Row:
        """Admit a request (its prompt: job.conversation, token ids); raises OssMlxError when
        it does not fit the context."""
        engine = self.engine
        prompt = list(job.conversation)
        engine._check_fits(prompt)
        cache, start = engine.acquire(prompt, job_key(job))
        req = Request.start(prompt, job.params, engine.encoding, engine.max_context,
                            cached=start, cancel=getattr(job, "cancel", None),
                            t0=getattr(job, "t0", None))
        row = Row(self._ids, job, req, cache, start=start, pos=start, t_read=engine.pace.clock())
        self._ids += 1
        if req.limit > 0:
            if engine._use_compiled(cache):  # the full layers' buffers, on the step's grid
                with mx.stream(generation_stream):
                    engine.model.decoder().presize(cache, len(prompt) + 1)
            cancel = row.req.cancel if self.local_cancel else None
            row.steps = iter(engine.prefill_steps(prompt, cache, start, cancel))
        self._prefilling.append(row)
        return row

    # ---- one step ----

    def plan(self) -> Plan:
        """This step's decisions from the rows' own cancel events and the measured pace."""
        rows = list(self._prefilling) + self._rows
        cancel = [i for i, r in enumerate(rows) if r.req.cancelled]
        pace = self.engine.pace
        chunk = pace.size(bool(self._rows), decide=self.leads) if self._prefilling else 0
        return Plan(cancel, chunk)

    def step(self, plan: Plan | None = None) -> list:
        """One step: the plan's cancellations, one prefill chunk (if a request is prefilling),
        one decode step of every decoding row. Returns the jobs that finished."""
        plan = plan or self.plan()
        finished = self._cancel(plan.cancel)
        if self._prefilling:
            finished += self._prefill(plan.chunk)
        if self._rows:
            finished += self._decode()
        self.steps += 1
        if self.steps % 256 == 0:
            mx.clear_cache()
        return finished

    def _cancel(self, places: list) -> list:
        if not places:
            return []
        rows = list(self._prefilling) + self._rows
        ids = {rows[i].id for i in places}
        finished = []
        for row in [r for r in self._prefilling if r.id in ids]:
            self._prefilling.remove(row)
            self._finish(row, "cancelled", row.held)
            finished.append(row.job)
        out = [i for i, r in enumerate(self._rows) if r.id in ids]
        if out:
            finished += self._leave(out, {i: "cancelled" for i in out})
        return finished

    # ---- prefill ----

    def _prefill(self, chunk: int) -> list:
        """One chunk of the oldest prefilling request; it joins the decoding rows when done."""
        row = self._prefilling[0]
        if row.req.limit == 0:
            self._prefilling.popleft()
            self._finish(row, row.req.limit_reason, row.held)
            return [row.job]
        end = len(row.prompt) - 1
        if row.pos < end:
            self.engine.pace.fixed = chunk or None
            try:
                with mx.stream(generation_stream):
                    done = next(row.steps, None)
            finally:
                self.engine.pace.fixed = None
            if done is None:  # stopped early: its cancel event is set
                self._prefilling.popleft()
                self._finish(row, "cancelled", row.held)
                return [row.job]
            row.pos = row.start + done
            self._progress(row)
            if row.pos < end:
                return []
            for _ in row.steps:  # let prefill_steps finish its bookkeeping (no more chunks)
                pass
        if self._store_for(row).can_join(row.held):
            self._prefilling.popleft()
            self._join(row)
        return []

    def _progress(self, row: Row):
        report = getattr(row.job, "progress", None)
        if report is not None:
            done = row.pos - row.start
            elapsed = self.engine.pace.clock() - row.t_read
            report(row.pos, len(row.prompt), done / max(elapsed, 1e-9))

    def _store_for(self, row: Row):
        from oss_mlx.engine.rows import DecoderRows, PlainRows

        if self.store is None or not self._rows:
            engine = self.engine
            if engine._use_compiled(row.held):
                self.store = DecoderRows(engine.model.decoder(), engine.max_context)
            else:
                self.store = PlainRows(engine.model)
        return self.store

    def _join(self, row: Row):
        """Feed the last prompt token, sample the first one, and join the decoding rows."""
        req = row.req
        req.stats.prefilled_tokens = len(row.prompt) - row.start
        with mx.stream(generation_stream):
            logits = self.engine._last_logits(row.prompt, row.held)
            y = req.sampler(req.history, logits).astype(mx.uint32)
        mx.async_eval(y)
        self.store.join(row.held)
        self._y = y if self._y is None else mx.concatenate([self._y, y])
        self._rows.append(row)

    # ---- decode ----

    def _sample(self, logits):
        """Tokens [B] for logits [B, V], each row with its own sampler."""
        logits = logits.astype(mx.float32)
        if all(r.req.sampler.plain_greedy for r in self._rows):
            return mx.argmax(logits, axis=-1).astype(mx.uint32)
        return mx.concatenate([r.req.sampler(partial(self._history, i), logits[i : i + 1])
                               for i, r in enumerate(self._rows)]).astype(mx.uint32)

    def _history(self, i: int):
        """Row i's tokens of this turn so far (what SamplingParams.logits_processors see), the
        one this step feeds included (not read yet: pipelined)."""
        return self._rows[i].req.history(self._y[i : i + 1])

    def _decode(self) -> list:
        finished = self._last_tokens()
        if not self._rows:
            return finished
        with mx.stream(generation_stream):
            nxt = self._sample(self.store.forward(self._y))
        mx.async_eval(nxt)  # queued before this step's tokens are read
        y, self._y = self._y, nxt
        reasons = self._emit_all(range(len(self._rows)), y)
        for i, row in enumerate(self._rows):
            if i not in reasons and row.req.generated[-1] == END:
                self._snapshot(i, len(row.history))  # a message boundary: a later prompt may branch here
        if reasons:
            finished += self._leave(sorted(reasons), reasons)
        return finished

    def _last_tokens(self) -> list:
        """Rows whose next token is the last their limit allows: it is read before the step.
        A stop token (undone when the cache goes back anyway), or one the context has no room
        for, is never fed: the row ends here. Another is fed like any, after a snapshot (a next
        turn that re-renders the cut message may branch just before it)."""
        last = [i for i, r in enumerate(self._rows) if len(r.req.generated) + 1 >= r.req.limit]
        if not last:
            return []
        toks = self._y.tolist()
        unfed = [i for i in last if toks[i] in STOPS or self._rows[i].req.limit_reason == "context"]
        for i in last:
            if i not in unfed and self._rows[i].req.generated:
                self._snapshot(i, len(self._rows[i].history))
        return self._leave(unfed, self._emit_all(unfed)) if unfed else []

    def _emit_all(self, rows, y=None) -> dict:
        """Read the tokens of `rows` (indices) and feed them to their requests; {index: stop
        reason} of those that end."""
        toks = (self._y if y is None else y).tolist()
        out = {}
        for i in rows:
            row = self._rows[i]
            reason = row.req.emit(int(toks[i]))
            for ev in row.req.parser.drain():
                row.job.put(ev)
            if reason is not None:
                out[i] = reason
        return out

    def _snapshot(self, i: int, pos: int):
        from oss_mlx.engine.prompt_cache import Held

        row = self._rows[i]
        view = Held(self.store.sliding_layers(i))
        view.snapshots = row.held.snapshots
        self.engine.snapshot(view, pos)
        row.held.snapshots = view.snapshots

    def _leave(self, rows: list[int], reasons: dict) -> list:
        """Rows (indices) leave with their reasons: caches back, done events put."""
        for i in rows:
            self._finish(self._rows[i], reasons[i], self.store.extract(i))
        keep = [i for i in range(len(self._rows)) if i not in set(rows)]
        jobs = [self._rows[i].job for i in rows]
        self.store.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        self._y = self._y[mx.array(keep)] if keep else None
        return jobs

    def _finish(self, row: Row, reason: str, cache, done: bool = True):
        """Hand back the row's cache (holding prompt + what was fed), then, with `done`, put its
        last events and the done event."""
        engine = self.engine
        if cache is not None:
            row.held[:] = cache
            tokens = row.history[: cache[0].offset if cache else 0]
            engine.release(row.req.kept_tokens(tokens, reason), row.held, job_key(row.job))
        if row.req.generated:
            engine.history.remember(row.prompt[-2:], row.req.generated, row.req.parser.done)
        if row.steps is not None and row.req.stats.prefilled_tokens == 0:
            row.req.stats.prefilled_tokens = row.pos - row.start  # cut short in prefill
        if not done:
            return
        completion = row.req.finish(reason)
        for ev in row.req.parser.drain():
            row.job.put(ev)
        row.job.put(Event("done", completion=completion))

    # ---- leaving early ----

    def close(self):
        """The consumer left (an abandoned stream): every row's cache goes back holding what
        it was fed, and no more events are put."""
        for row in self._prefilling:
            self._finish(row, "cancelled", row.held, done=False)
        for i, row in enumerate(self._rows):
            self._finish(row, "cancelled", self.store.extract(i), done=False)
        self._forget()

    def abort(self, error: BaseException) -> list:
        """After a failed step: put `error` to every request in flight and forget them all
        (their caches are in an unknown state and are not given back); returns their jobs."""
        jobs = [r.job for r in list(self._prefilling) + self._rows]
        for job in jobs:
            job.put(error)
        self._forget()
        return jobs

    def _forget(self):
        self._prefilling.clear()
        self._rows, self.store, self._y = [], None, None

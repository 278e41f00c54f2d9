"""Running one model across the ranks of an `mlx.launch` (several Macs, or processes on one).

    mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- oss-mlx generate --model M --prompt Hi
    mlx.launch --hostfile hosts.json -- oss-mlx serve --model gpt-oss-120b

Every command that loads a model calls `load_engine(model)`. Outside a launch that is
`Engine.load`. Inside one, every rank loads its share (`oss_mlx.shard`); rank 0 gets a
`LeaderEngine` and goes on to own the terminal or the HTTP server; every other rank stays in
`follow()` and never returns: it runs exactly the requests rank 0 sends it, so all ranks call
the same collectives in the same order and sample the same tokens (same logits, same seed).

The request channel (`Link`, engine/link.py) is mx.distributed itself: rank 0 broadcasts an op
and its JSON payload with `all_sum` (the others add zeros). While rank 0 is idle it sends a ping every few
seconds. Requests run through the request loop (engine/loop.py) on every rank, a batch of
several when `serve` has several in flight: rank 0 decides each step (`LeaderLoop`: the requests
that join, the rows cancelled by a client that left or Ctrl-C, the prefill chunk's size, which
the ranks' own measured rates would not agree on) and sends that `Plan` with the STEP op; every
other rank runs the same step (`follow_loop`), so all ranks call the same collectives in the
same order and sample the same tokens. Rank 0 sends a plan before every step while a request is
prefilling and every `CANCEL_EVERY` steps while they all decode (each costs one round trip);
every rank knows from the loop's own state which steps those are.

Before loading, every rank checks its own share against its machine (memory.check_fits through
`check`) and the ranks agree on the outcome (`agree_fits`), so a rank that does not fit ends
every rank with one line; after loading, `prepare` (the KV format, the context limit) runs on
every rank, so all build the same caches.

Failure (engine/link.py): a lost or silent peer ends every rank with one line naming it.
MLX streams belong to the thread that made them (and `mx.clear_streams()` leaves a
thread with none): the pinger and the exit hook run their collectives on threads of their own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import asdict

from oss_mlx.defaults import MOE_SPLIT
from oss_mlx.engine.link import (CANCEL_EVERY, LOGITS, PING, RESET, STEP, STOP, Link, Watchdog,
                                 fatal, lost, rank_timeout, watch)
from oss_mlx.engine.threads import in_own_thread, release_streams
from oss_mlx.errors import OssMlxError

def launched() -> bool:
    """Whether this process was started by mlx.launch (or MPI) as one rank of several."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def _params_payload(params) -> dict:
    try:
        d = asdict(params)
        json.dumps(d)
    except TypeError as e:
        raise OssMlxError(f"this sampling request cannot run distributed ({e})") from None
    return d


def settle():
    """Wait for the work queued on the generation stream (a decode step queued ahead): a loop
    that goes idle does so on every rank, before the link's next op, which may run on another
    stream, so that every rank runs its collectives in the same order."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)


def decides(loop, since: int) -> bool:
    """Whether rank 0 sends a plan before this step of `loop`, `since` steps after the last
    plan (every rank asks the same question of the same state; a loop's own step count would
    not do, rank 0's loop outlives the others'): while a request prefills or none decodes, and
    every CANCEL_EVERY steps."""
    return bool(loop._prefilling) or not loop._rows or since >= CANCEL_EVERY


class LeaderLoop:
    """Rank 0's request loop: the Loop, its plans decided here and sent to the other ranks
    (see the module docstring). Jobs added wait for the next plan; while it is busy the loop
    holds the link (the pinger and other ops wait)."""

    def __init__(self, engine, link: "Link", max_rows: int = 1):
        from oss_mlx.engine.loop import Loop

        self.loop = Loop(engine, max_rows, local_cancel=False, leads=True)
        self.engine, self.link = engine, link
        self.pending: list = []
        self.held = False
        self.since = 0  # steps since the last plan

    @property
    def busy(self) -> bool:
        return self.loop.busy or bool(self.pending)

    def __len__(self) -> int:
        return len(self.loop) + len(self.pending)

    def add(self, job):
        """Check the request here (a prompt too long, parameters that cannot travel: raised to
        this request only) and queue it for the next plan, with a seed every rank shares."""
        import os as _os
        from dataclasses import replace

        prompt = list(job.conversation)
        self.engine._check_fits(prompt)
        if job.params.seed is None:
            job.params = replace(job.params, seed=int.from_bytes(_os.urandom(7), "little"))
        from oss_mlx.engine.loop import job_key

        payload = {"tokens": prompt, "params": _params_payload(job.params), "key": job_key(job)}
        self.pending.append((job, payload))

    def step(self) -> list:
        from oss_mlx.engine.loop import Plan

        loop = self.loop
        plan = Plan()
        if decides(loop, self.since):
            self.since = 0
            adds, self.pending = self.pending, []
            for job, _ in adds:
                loop.add(job)
            plan = loop.plan()
            if not self.held:
                self.link.lock.acquire()
                self.held = True
            self.link.send(STEP, {"add": [p for _, p in adds], "cancel": plan.cancel,
                                  "chunk": plan.chunk}, behind_decode=True)
        try:
            self.since += 1
            return loop.step(plan)
        finally:
            if not self.busy and self.held:
                settle()
                self.held = False
                self.link.lock.release()

    def abort(self, error: BaseException):
        """A step failed on rank 0: the ranks would no longer agree; end them all."""
        lost(self.link.rank, self.link.size, error)


class _Follower:
    """A request on a rank other than 0: its events go nowhere (rank 0 answers)."""

    cancel = None

    def __init__(self, payload: dict):
        from oss_mlx.engine.types import SamplingParams

        self.conversation = payload["tokens"]
        self.params = SamplingParams(**payload["params"])
        self.key = payload.get("key")

    def put(self, item):
        pass


def follow_loop(engine, link: "Link", payload: dict):
    """Every rank but 0: run rank 0's steps from its first plan until the loop is idle."""
    from oss_mlx.engine.loop import Loop, Plan

    loop = Loop(engine, local_cancel=False)
    while True:
        for add in payload["add"]:
            loop.add(_Follower(add))
        loop.step(Plan(payload["cancel"], payload["chunk"]))
        since = 1
        while loop.busy and not decides(loop, since):
            loop.step(Plan())
            since += 1
        if not loop.busy:
            settle()
            return
        op, payload = link.recv(behind_decode=True)
        if op != STEP:
            fatal(f"rank {link.rank}: rank 0 sent op {op} in the middle of a step; ending "
                  "the session (the ranks would no longer agree)")


class LeaderEngine:
    """Rank 0's engine: the Engine interface, each request run through a LeaderLoop."""

    def __init__(self, engine, link: Link, pinger: bool = True):
        self.engine, self.link = engine, link
        self._closed = threading.Event()  # set by close(): the pinger stops, no more requests
        if pinger:
            threading.Thread(target=self._ping, daemon=True, name="oss-mlx-ping").start()

    def __getattr__(self, name):  # render, encoding, max_context, model, cached_tokens, ...
        return getattr(self.engine, name)

    def _ping(self):
        interval = min(5.0, rank_timeout() / 4)
        try:
            while not self._closed.wait(interval):
                if self.link.lock.acquire(blocking=False):
                    try:
                        if not self._closed.is_set():
                            self.link.send(PING)
                    finally:
                        self.link.lock.release()
        finally:
            release_streams()

    def make_loop(self, max_rows: int = 1) -> LeaderLoop:
        return LeaderLoop(self.engine, self.link, max_rows)

    def stream(self, conversation, params=None, cancel=None, key=None, progress=None):
        """Engine.stream on every rank: a batch of one through a LeaderLoop."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, wired_limit

        from oss_mlx.engine.engine import StreamJob
        from oss_mlx.engine.types import SamplingParams

        params = params or SamplingParams()
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], int):
            prompt = list(conversation)
        else:
            prompt = self.engine.render(conversation)
        job = StreamJob(prompt, params, cancel, key or params.cache_key, progress, None)
        loop = self.make_loop(1)
        loop.add(job)  # raises OssMlxError here, before any rank starts
        mx.reset_peak_memory()
        with self.engine._lock, wired_limit(self.engine.model, [generation_stream]):
            try:
                while loop.busy:
                    loop.step()
                    yield from job.take()
            except GeneratorExit:
                # The consumer left: the other ranks are still generating. Cancel it in the
                # next plan, run the steps to there with every rank, then return.
                gone = threading.Event()
                gone.set()
                for row in loop.loop._rows + list(loop.loop._prefilling):
                    row.req.cancel = gone
                while loop.busy:
                    loop.step()
                raise
            except KeyboardInterrupt:
                fatal("rank 0: interrupted; ending the session on every rank")
            except OssMlxError:
                raise
            except BaseException as e:  # noqa: BLE001 - the ranks would disagree from here on
                lost(self.link.rank, self.link.size, e)

    def complete(self, conversation, params=None, cancel=None, key=None, progress=None):
        for ev in self.stream(conversation, params, cancel, key, progress):
            if ev.type == "done":
                return ev.completion
        raise RuntimeError("stream ended without a done event")  # pragma: no cover

    def logits(self, prompt):
        with self.link.lock:
            self.link.send(LOGITS, {"tokens": list(prompt)})
            return self.engine.logits(prompt)

    def reset_cache(self):
        with self.link.lock:
            self.link.send(RESET)
            self.engine.reset_cache()

    def close(self):
        """Let the followers end (they exit 0). Runs at exit (atexit), when the calling thread
        may have released its MLX streams already (serve does, before it returns): the STOP is
        sent from a thread of its own, which a lost peer ends like any other collective."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self.link.lock:
            in_own_thread(lambda: self.link.send(STOP))


def follow(engine, link: Link):
    """Every rank but 0: run rank 0's requests until it says STOP."""
    while True:
        op, payload = link.recv()
        try:
            if op == STOP:
                return
            if op == STEP:
                follow_loop(engine, link, payload)
            elif op == LOGITS:
                engine.logits(payload["tokens"])
            elif op == RESET:
                engine.reset_cache()
        except OssMlxError:
            pass  # rank 0 met the same error and reported it
        except Exception as e:  # noqa: BLE001
            lost(link.rank, link.size, e)


# ---- start-up ------------------------------------------------------------------------------


def init():
    """The launch's group (its size may be 1)."""
    import mlx.core as mx

    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile) and not open(hostfile).read().strip():
        os.environ.pop("MLX_HOSTFILE")  # `mlx.launch -n 1` writes an empty one: one rank alone
        return mx.distributed.init()
    try:
        return mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise OssMlxError(f"cannot join the distributed launch: {e}") from None


def load_sharded(model, dtype=None, group=None, moe: str | None = None):
    """(Engine over this rank's share of `model`, its Sharding)."""
    from oss_mlx.engine.engine import Engine
    from oss_mlx.harmony.encoding import load_encoding
    from oss_mlx.model import default_dtype, load
    from oss_mlx.model.shard import Sharding
    from oss_mlx.store import resolve_model

    group = group or init()
    folder = resolve_model(model)
    encoding = load_encoding(folder)
    sharding = Sharding(group, moe=moe or os.environ.get("OSS_MLX_MOE", MOE_SPLIT))
    m = load(folder, dtype=dtype or default_dtype(), shard=sharding)
    engine = Engine(m, encoding)
    engine.pace.shared = True  # every rank cuts the chunks rank 0 decides (engine/pace.py)
    return engine, sharding


def agree_fits(group, check, moe: str):
    """Every rank runs `check(rank, size, moe)` (memory.check_fits on its share) and all learn
    which ranks refused: a rank that does not fit ends with its own one-line refusal, every
    other rank with one line naming it, before anyone loads (never a hang in a collective)."""
    import mlx.core as mx

    rank, size = group.rank(), group.size()
    refusal = None
    try:
        check(rank, size, moe)
    except OssMlxError as e:
        refusal = e
    mine = mx.array([int(r == rank and refusal is not None) for r in range(size)], dtype=mx.int32)
    refused = [r for r, f in enumerate(mx.distributed.all_sum(mine, group=group).tolist()) if f]
    if refusal is not None:
        raise refusal
    if refused:
        who = " and ".join(f"rank {r}" for r in refused)
        whose = "its" if len(refused) == 1 else "their"
        raise OssMlxError(f"rank {rank}: {who} cannot hold {whose} share of the model (see its "
                          "error); ending the session")


def same_cache_budget(prompt_cache, group, requested=None):
    """The prompt cache evicts by bytes, and every rank must keep the same entries (a rank that
    resumed from a longer prefix would prefill fewer chunks, and the ranks' collectives would
    part). Its entries are KV caches, the same size on every rank (equal shares of the KV
    heads), so one budget for all does it: --cache-memory, else the smallest rank's default
    (an eighth of each Mac's memory)."""
    import mlx.core as mx

    if requested is not None:
        prompt_cache.memory_bytes = int(requested)
    mine = mx.array([prompt_cache.memory_bytes >> 20], dtype=mx.int32)  # MiB
    prompt_cache.memory_bytes = min(mx.distributed.all_gather(mine, group=group).tolist()) << 20


def launch_engine(model, group, dtype, check, prepare, engine_kwargs: dict):
    """This rank's engine in a launch of several ranks (loading.load_engine calls it): every
    rank checks its share (`check(rank, size, moe)`, see `agree_fits`), loads it, and runs
    `prepare(model)` (the KV format and context limit); rank 0 gets a LeaderEngine back, every
    other rank follows it and exits. Of `engine_kwargs` only the prompt cache's budget applies
    (one for all ranks, `same_cache_budget`)."""
    rank, size = group.rank(), group.size()
    moe = os.environ.get("OSS_MLX_MOE", MOE_SPLIT)
    agree_fits(group, check, moe)
    if rank != 0:
        # The terminal's Ctrl-C reaches every process of the launch; only rank 0 acts on it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine, sharding = load_sharded(model, dtype, group, moe)
    same_cache_budget(engine.prompt_cache, group, engine_kwargs.get("cache_memory"))
    prepare(engine.model)  # identically on every rank: the same caches, the same limits
    watchdog = Watchdog(rank, size, rank_timeout())
    sharding.comm.tick = watchdog.tick
    link = Link(group, watchdog)
    # Everyone loaded: the first ping doubles as the barrier, then the watchdogs start.
    if rank == 0:
        link.send(PING)
    else:
        link.recv()
    watchdog.start()
    watch(watchdog)
    if rank != 0:
        follow(engine, link)
        sys.stdout.flush()
        os._exit(0)  # never back into rank 0's command (its server, its terminal)
    leader = LeaderEngine(engine, link)
    import atexit

    atexit.register(leader.close)
    return leader

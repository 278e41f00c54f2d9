"""How rank 0 talks to the other ranks of a launch, and how a rank ends (docs/distributed.md).

The request channel (`Link`) is mx.distributed itself: rank 0 broadcasts an op and its JSON
payload with `all_sum` (the others add zeros). A rank whose peer died gets "[ring] connection to
a peer was lost" from MLX and ends at once (`lost`); a rank that stopped answering (suspended,
unplugged) is caught by each rank's `Watchdog`: no collective built and no request received for
`OSS_MLX_RANK_TIMEOUT` seconds (default 60) ends that rank. A collective already waiting when its
peer died may never return (MLX 0.32's ring); mlx.launch then SIGTERMs the live ranks, and a
serving rank told to stop (`ending`) gives its collectives ENDING_GRACE seconds. Either way the
message is one line naming the ranks concerned (`fatal`), and the process exits non-zero, which
makes mlx.launch stop the remaining ranks.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from oss_mlx.errors import OssMlxError

PING, STEP, LOGITS, RESET, STOP = 1, 2, 3, 4, 5
CANCEL_EVERY = 4  # decode steps between two plans (each costs one round trip)
# Seconds a rank asked to stop (SIGTERM: mlx.launch ends the others when a rank fails) waits for
# its collectives to progress before it ends: under uvicorn's 2 s graceful shutdown, so the
# last line is ours.
ENDING_GRACE = 1.5
_watchdog = None  # this process's Watchdog, once it is a rank of a launch (`watch`)


def rank_timeout() -> float:
    try:
        return max(float(os.environ.get("OSS_MLX_RANK_TIMEOUT", "60")), 1.0)
    except ValueError:
        raise OssMlxError("OSS_MLX_RANK_TIMEOUT must be a number of seconds") from None


def peers(rank: int, size: int) -> str:
    """The ranks a ring neighbour's failure can be: "rank 1", or "rank 3 or rank 1"."""
    left, right = (rank - 1) % size, (rank + 1) % size
    return f"rank {left}" if left == right else f"rank {left} or rank {right}"


def fatal(message: str):
    """End this rank now with one line (never a traceback, never a hang)."""
    try:
        sys.stderr.write(f"oss-mlx: error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(1)


def lost(rank: int, size: int, error: BaseException):
    text = str(error)
    if "peer" in text or "[ring]" in text or "connection" in text:
        fatal(f"rank {rank}: lost the connection to {peers(rank, size)} (it ended or cannot be "
              f"reached); ending the session")
    fatal(f"rank {rank}: {type(error).__name__}: {text}; ending the session (the ranks would "
          f"no longer agree)")


class Watchdog:
    """Ends this rank when nothing has progressed for `timeout` seconds: progress is a
    collective built (`tick`, from the sharded layers and the Link)."""

    def __init__(self, rank: int, size: int, timeout: float):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="oss-mlx-watchdog")

    def start(self):
        self.tick()
        self._thread.start()
        return self

    def tick(self):
        self.last = time.monotonic()

    def hurry(self, grace: float):
        """This rank is ending: from now on `grace` seconds without progress end it. (A ring
        collective in flight when a peer dies can wait forever in MLX 0.32 instead of
        raising; the launch then SIGTERMs this rank, which is how it learns of it.)"""
        self.tick()
        self.timeout = min(self.timeout, grace)

    def _watch(self):
        while True:
            time.sleep(min(0.5, self.timeout / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                fatal(f"rank {self.rank}: no answer from {peers(self.rank, self.size)} for "
                      f"{idle:.0f} s (stopped or unreachable); ending the session")


def watch(watchdog: Watchdog):
    """This process is a rank of a launch, watched by `watchdog` (started)."""
    global _watchdog
    _watchdog = watchdog


def ending():
    """Called when this process is told to stop (SIGTERM; serve's app.StoppingServer): a rank
    of a launch ends on its own once its collectives make no progress for ENDING_GRACE
    seconds (its peers no longer answer). Ctrl-C does not call it: a long prefill chunk may
    well run that long, and the session then ends gracefully."""
    if _watchdog is not None:
        _watchdog.hurry(ENDING_GRACE)


class Link:
    """Rank 0's requests to the other ranks, over mx.distributed collectives only."""

    def __init__(self, group, watchdog: Watchdog | None = None):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.watchdog = watchdog
        self.lock = threading.Lock()  # one conversation with the ranks at a time (rank 0)
        self._local = threading.local()

    def _stream(self, behind_decode: bool):
        """The engine's generation stream for the cancel agreement (it must follow the decode
        step already queued there); else a stream of this thread's own (MLX streams belong to
        the thread that made them: the pinger and the exit hook are other threads), used only
        while nothing else is queued."""
        import mlx.core as mx

        if behind_decode:
            from mlx_lm.generate import generation_stream

            return generation_stream
        if getattr(self._local, "stream", None) is None:
            self._local.stream = mx.new_stream(mx.default_device())
        return self._local.stream

    def _all_sum(self, array, behind_decode: bool = False):
        """all_sum of `array`, evaluated now (a lost peer ends this rank)."""
        import mlx.core as mx

        try:
            with mx.stream(self._stream(behind_decode)):
                out = mx.distributed.all_sum(array, group=self.group)
                mx.eval(out)
        except Exception as e:  # noqa: BLE001 - a lost peer: end every rank, one line
            lost(self.rank, self.size, e)
        if self.watchdog is not None:
            self.watchdog.tick()
        return out

    def send(self, op: int, payload=None, behind_decode: bool = False):
        """Rank 0: broadcast an op and its JSON payload (every other rank is in `recv`).
        `behind_decode`: between the steps of a loop, after the decode step queued last."""
        import mlx.core as mx
        import numpy as np

        data = json.dumps(payload).encode() if payload is not None else b""
        self._all_sum(mx.array([op, len(data)], dtype=mx.int32), behind_decode)
        if data:
            self._all_sum(mx.array(np.frombuffer(data, dtype=np.uint8)), behind_decode)

    def recv(self, behind_decode: bool = False):
        """Every rank but 0: the next (op, payload) from rank 0."""
        import mlx.core as mx

        op, n = self._all_sum(mx.zeros((2,), dtype=mx.int32), behind_decode).tolist()
        payload = None
        if n:
            data = self._all_sum(mx.zeros((n,), dtype=mx.uint8), behind_decode)
            payload = json.loads(bytes(memoryview(data)))
        return op, payload

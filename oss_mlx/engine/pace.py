"""How many prompt tokens the next prefill chunk takes: sized from the measured prefill rate, so
that a chunk lasts about `ALONE_S` when nothing else runs (a cancel, Ctrl-C or a client that
left, acts between chunks: within about a second on any backend, where a fixed 512-token chunk
ran 25 s on a CPU) and about `BUSY_S` while other rows decode (they advance one token per step,
so a newcomer's prefill holds them up by at most that much per token, and its own time to first
token is its prefill time plus one decode step per chunk).

    pace = PrefillPace(most=512)
    n = pace.size(busy=False)          # a size on the grid: 16, 32, 64, ..., most
    pace.measure(k, seconds, n)        # after the chunk (k <= n tokens) ran, evaluated

Sizes lie on a grid (powers of two from `LEAST` up to `most`, the engine's --prefill-chunk,
which the memory plan counts), so prefill graphs come in a few shapes. The first chunk of an
engine is the smallest; each later one follows the last measured rate, growing at most 4x a
chunk (a small chunk underrates what a larger one reaches: weights are read once a chunk).
`fixed`: the size the loop's plan chose for the chunk under way (on a launch's ranks, rank 0's
choice), used instead while set. `shared` (a model split across the ranks of a launch): every
rank must cut the same chunks, so only rank 0's loop, deciding for all (`decide`), follows the
rate; any other prefill takes the largest size.
"""

from __future__ import annotations

import time

LEAST = 16
ALONE_S = 0.5  # a chunk's target duration when no row decodes: the cancellation latency
BUSY_S = 0.1  # ... while rows decode: the most a newcomer's chunk delays their next token
GROWTH = 4


def grid(most: int) -> list[int]:
    """The chunk sizes: powers of two from min(LEAST, most) up to `most`, and `most`."""
    least = min(LEAST, most)
    sizes, n = [least], least
    while n * 2 < most:
        n *= 2
        sizes.append(n)
    return sorted(set(sizes) | {most})


class PrefillPace:
    def __init__(self, most: int, clock=time.perf_counter):
        self.sizes = grid(most)
        self.clock = clock
        self.rate = None  # tokens/s of the last chunk measured
        self.last = self.sizes[0]  # the size of the last chunk measured
        self.fixed = None
        self.shared = False

    @property
    def most(self) -> int:
        return self.sizes[-1]

    def size(self, busy: bool = False, decide: bool = False) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.shared and not decide:
            return self.most
        if self.rate is None:
            return self.sizes[0]
        want = min(self.rate * (BUSY_S if busy else ALONE_S), self.last * GROWTH)
        fit = [s for s in self.sizes if s <= want]
        return fit[-1] if fit else self.sizes[0]

    def measure(self, tokens: int, seconds: float, asked: int | None = None):
        """A chunk of `tokens` took `seconds` (wall time, its work evaluated). A chunk cut much
        shorter than the `asked` size (by a message boundary, the prompt's end) is mostly fixed
        cost: it does not say what the asked size runs at, and is not counted."""
        if tokens <= 0 or (asked is not None and 2 * tokens < asked):
            return
        self.rate = tokens / max(seconds, 1e-6)
        self.last = tokens

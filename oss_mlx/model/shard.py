"""gpt-oss split across the ranks of an mx.distributed group (tensor parallelism).

    from oss_mlx.model import load
    from oss_mlx.model.shard import Sharding

    sharding = Sharding(mx.distributed.init())       # this rank of the launch
    model = load(folder, shard=sharding)             # this rank's share only
    logits = model(tokens, cache)                     # the full [B, T, V] logits on every rank

What each rank holds (`Share`, the table `_RULES`):
- attention: its 1/n of the query heads and of the KV heads (GQA groups stay whole), the sinks
  of its query heads, the output projection's matching input columns; the partial outputs are
  summed with `all_sum` and the output bias is added once (on rank 0).
- experts, tensor-parallel (default, `moe="tp"`): every expert, with 1/n of its intermediate
  rows (gate and up alike, in whole mxfp4 groups) and the matching input columns of `down`; the
  partial expert outputs are summed with one `all_sum`, the down bias counted on rank 0 only.
  `moe="ep"` (expert-parallel) gives each rank 1/n of the experts whole instead; both send the
  same bytes per token (one [T, H] all_sum per layer), see docs/distributed.md for the choice.
- the unembedding: 1/n of the vocabulary rows (padded to equal shares); the logits are
  gathered once with `all_gather`.
- everything else (embedding, norms, router, residual stream) identical on every rank, so every
  rank computes the same logits and, with the same seed, samples the same token.

Collectives carry float32 (the residual stream's dtype), so a bf16 run adds no rounding of its
own at the sums. `Sharding.read` reads each safetensors file through a memory map, only the
rows and columns this rank keeps, and counts the bytes it requested (`bytes_read`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from oss_mlx.checkpoint.layout import leaf
from oss_mlx.checkpoint.safetensors import read_header
from oss_mlx.config import ModelConfig
from oss_mlx.defaults import MOE_SPLIT, MOE_SPLITS
from oss_mlx.errors import OssMlxError
from oss_mlx.model.gpt_oss import Experts, Model

EXPERT_GROUP = 32  # mxfp4 group size: the experts' intermediate rows split in whole groups


def share(total: int, parts: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """[start, stop) of rank's share of `total` elements, cut in whole `unit`s as evenly as
    possible (the first ranks take one unit more when they do not divide)."""
    units = total // unit
    base, extra = divmod(units, parts)
    start = rank * base + min(rank, extra)
    return start * unit, (start + base + (rank < extra)) * unit


# ---- communication -------------------------------------------------------------------------


@dataclass
class Comm:
    """The collectives of the sharded layers, counted as the graph is built.

    payload_bytes: bytes handed to collectives (per rank) since `reset`, of which
    gather_bytes went to all_gather; calls: how many collectives.
    enabled=False turns every collective into the identity (wrong numbers, same compute): the
    benchmark's way to time a token without its communication. `tick` is called on each
    collective built (the watchdog's sign of progress).
    """

    group: object
    enabled: bool = True
    payload_bytes: int = 0
    gather_bytes: int = 0
    calls: int = 0
    tick: object = None

    @property
    def size(self) -> int:
        return self.group.size()

    def reset(self):
        self.payload_bytes, self.gather_bytes, self.calls = 0, 0, 0

    def _count(self, x):
        self.payload_bytes += x.nbytes
        self.calls += 1
        if self.tick is not None:
            self.tick()

    def all_sum(self, x):
        self._count(x)
        return mx.distributed.all_sum(x, group=self.group) if self.enabled else x

    def all_gather(self, x):
        """[n * x.shape[0], ...]: every rank's x, in rank order."""
        self._count(x)
        self.gather_bytes += x.nbytes
        if not self.enabled:
            return mx.concatenate([x] * self.size)
        return mx.distributed.all_gather(x, group=self.group)

    def wire_bytes(self) -> float:
        """Bytes each rank sends on a ring for the collectives counted since `reset`: an
        all_sum is a reduce-scatter and an all-gather, 2 (n-1)/n of its payload; an all_gather
        forwards the n-1 other ranks' parts, (n-1) times its payload."""
        n = self.size
        summed = self.payload_bytes - self.gather_bytes
        return 2 * (n - 1) / n * summed + (n - 1) * self.gather_bytes


# ---- the sharded layers ----------------------------------------------------------------------


class SummedLinear(nn.Module):
    """A linear layer whose input features are split across ranks: each rank's partial product
    is summed by all_sum (the layer's bias exists on rank 0 only)."""

    def __init__(self, inner, comm: Comm):
        super().__init__()
        self.inner = inner
        self.comm = comm

    def __call__(self, x):
        return self.comm.all_sum(self.inner(x).astype(mx.float32))


class SummedExperts(nn.Module):
    """Tensor-parallel experts: this rank's slice of every expert's intermediate rows; the
    partial outputs (already weighted by the router) are summed across ranks."""

    def __init__(self, inner: Experts, comm: Comm):
        super().__init__()
        self.inner = inner
        self.comm = comm

    def __call__(self, t, x, indices, weights):
        # The inner experts add their output to the residual they are given: give them zeros,
        # sum the partial outputs, and add the residual once.
        return x + self.comm.all_sum(self.inner(t, mx.zeros_like(x), indices, weights))


class LocalExperts(nn.Module):
    """Expert-parallel experts: this rank holds experts [first, first + count) whole; a routed
    expert held elsewhere gets weight 0 here (shapes stay static, no host round trip)."""

    def __init__(self, inner: Experts, first: int, count: int, comm: Comm):
        super().__init__()
        self.inner = inner
        self.first, self.count = first, count
        self.comm = comm

    def __call__(self, t, x, indices, weights):
        local = indices - self.first
        mine = (local >= 0) & (local < self.count)
        y = self.inner(t, mx.zeros_like(x), mx.where(mine, local, 0), mx.where(mine, weights, 0))
        return x + self.comm.all_sum(y)


class GatheredUnembedding(nn.Module):
    """This rank's vocabulary rows of the unembedding; the logits of all ranks are gathered
    once into the full [B, T, V]."""

    def __init__(self, inner, vocab_size: int, comm: Comm):
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.comm = comm

    def __call__(self, x):
        part = self.inner(x)  # [B, T, V / n]
        every = self.comm.all_gather(part[None])  # [n, B, T, V / n]
        B, T = part.shape[:2]
        logits = mx.moveaxis(every, 0, 2).reshape(B, T, -1)
        return logits[..., : self.vocab_size]


# ---- who holds what ---------------------------------------------------------------------------


@dataclass
class Share:
    """The index ranges one rank holds, from the full config."""

    config: ModelConfig
    rank: int
    size: int
    moe: str = MOE_SPLIT

    def __post_init__(self):
        c, n = self.config, self.size
        if self.moe not in MOE_SPLITS:
            raise OssMlxError(f"unknown MoE sharding {self.moe!r} ({' or '.join(MOE_SPLITS)})")
        if c.num_attention_heads % n or c.num_key_value_heads % n:
            raise OssMlxError(
                f"{n} ranks do not divide the model's {c.num_attention_heads} query and "
                f"{c.num_key_value_heads} key/value heads; use a divisor of "
                f"{math.gcd(c.num_attention_heads, c.num_key_value_heads)} ranks"
            )
        if self.moe == "tp" and c.intermediate_size // EXPERT_GROUP < n:
            raise OssMlxError(f"{n} ranks exceed the experts' {c.intermediate_size // EXPERT_GROUP} groups")
        if self.moe == "ep" and c.num_experts < n:
            raise OssMlxError(f"{n} ranks exceed the model's {c.num_experts} experts")

    @property
    def q_heads(self):
        a = self.config.num_attention_heads // self.size
        return self.rank * a, (self.rank + 1) * a

    @property
    def kv_heads(self):
        b = self.config.num_key_value_heads // self.size
        return self.rank * b, (self.rank + 1) * b

    @property
    def intermediate(self):
        return share(self.config.intermediate_size, self.size, self.rank, EXPERT_GROUP)

    @property
    def experts(self):
        return share(self.config.num_experts, self.size, self.rank)

    @property
    def vocab_rows(self) -> int:
        return -(-self.config.vocab_size // self.size)  # padded share: all_gather wants equal

    @property
    def vocab(self):
        V, r = self.config.vocab_size, self.vocab_rows
        return min(self.rank * r, V), min((self.rank + 1) * r, V)

    def local_config(self) -> ModelConfig:
        c = self.config
        q0, q1 = self.q_heads
        k0, k1 = self.kv_heads
        i0, i1 = self.intermediate if self.moe == "tp" else (0, c.intermediate_size)
        return replace(c, num_attention_heads=q1 - q0, num_key_value_heads=k1 - k0,
                       intermediate_size=i1 - i0)


# Per-tensor rule, by name without "layers.N." and without the parameter's leaf: which axis is
# split and the ranges kept, in logical elements of that axis (`Share` -> [(start, stop), ...]);
# "input" axes are converted to stored columns (packed weights, scales) by their shape ratio.
def _qkv_rows(p: Share):
    D, c = p.config.head_dim, p.config
    (q0, q1), (k0, k1) = p.q_heads, p.kv_heads
    nq, nkv = c.num_attention_heads, c.num_key_value_heads
    return [(q0 * D, q1 * D), ((nq + k0) * D, (nq + k1) * D), ((nq + nkv + k0) * D, (nq + nkv + k1) * D)]


def _q_cols(p: Share):
    D = p.config.head_dim
    q0, q1 = p.q_heads
    return [(q0 * D, q1 * D)]


def _gate_up_rows(p: Share):
    I = p.config.intermediate_size
    i0, i1 = p.intermediate
    return [(i0, i1), (I + i0, I + i1)]  # gate rows, then the same up rows


_RULES = {
    # module: {moe: (axis, ranges, logical size of the axis)}; None = every rank the whole
    "attention.qkv": {"*": (0, _qkv_rows, None)},
    "attention.sinks": {"*": (0, lambda p: [p.q_heads], None)},
    "attention.out": {"*": (-1, _q_cols, lambda c: c.num_attention_heads * c.head_dim)},
    "mlp.experts.gate_up": {"tp": (1, _gate_up_rows, None), "ep": (0, lambda p: [p.experts], None)},
    "mlp.experts.down": {"tp": (-1, lambda p: [p.intermediate], lambda c: c.intermediate_size),
                         "ep": (0, lambda p: [p.experts], None)},
    "unembedding": {"*": (0, lambda p: [p.vocab], None)},
}
# Biases of a layer whose input is split are added once: rank 0 reads them, the others hold
# zeros (else they would be summed n times).
_ONCE = {"attention.out.bias": "*", "mlp.experts.down.bias": "tp"}


def _module_of(name: str) -> tuple[str, str]:
    """("attention.qkv", "weight") for "layers.3.attention.qkv.weight"; sinks are a leaf."""
    module, _, param = leaf(name).rpartition(".")
    if param == "sinks":
        return leaf(name), ""
    return module, param


_NP_DTYPES = {"BF16": (np.uint16, mx.bfloat16), "F16": (np.float16, None), "F32": (np.float32, None),
              "U8": (np.uint8, None), "U16": (np.uint16, None), "U32": (np.uint32, None),
              "I8": (np.int8, None), "I32": (np.int32, None), "I64": (np.int64, None)}


@dataclass
class Cut:
    """What one rank keeps of one stored tensor: the whole (axis None), zeros of its shape (a
    bias added once, by rank 0), or `ranges` [(start, stop), ...] of `axis` in stored elements,
    concatenated, then padded with zero rows to `rows` (the unembedding's equal shares)."""

    axis: int | None = None
    ranges: list = field(default_factory=list)
    zeros: bool = False
    rows: int | None = None

    def shape(self, shape: tuple) -> tuple:
        """The shape this rank holds, for a stored tensor of `shape`."""
        if self.axis is None:
            return tuple(shape)
        out = list(shape)
        out[self.axis] = sum(b - a for a, b in self.ranges)
        if self.rows is not None:
            out[0] = max(out[0], self.rows)
        return tuple(out)


def cut_of(plan: Share, name: str, shape: tuple) -> Cut:
    """The rule (`_RULES`, `_ONCE`) for one stored tensor on `plan`'s rank, from its name and
    stored shape only: the loader and the memory plan (`local_tensors`) both use it."""
    module, leaf = _module_of(name)
    full = f"{module}.{leaf}" if leaf else module
    if plan.rank != 0 and _ONCE.get(full) in ("*", plan.moe):
        return Cut(zeros=True)
    rule = _RULES.get(module)
    rule = rule and (rule.get("*") or rule.get(plan.moe))
    if rule is None:
        return Cut()
    axis, ranges, logical = rule
    axis %= len(shape)
    if leaf == "bias" and axis == len(shape) - 1 and logical is not None:
        return Cut()  # a bias has no input axis: only output-split ones are cut
    ratio = shape[axis] / logical(plan.config) if logical else 1
    kept = []
    for a, b in ranges(plan):
        lo, hi = a * ratio, b * ratio
        if lo != int(lo) or hi != int(hi):
            raise OssMlxError(f"{name}: cannot split {tuple(shape)} at [{a}, {b}) of axis {axis}")
        kept.append((int(lo), int(hi)))
    return Cut(axis, kept, rows=plan.vocab_rows if module == "unembedding" else None)


def local_tensors(plan: Share, tensors) -> list[tuple[str, str, tuple]]:
    """(name, stored dtype, shape this rank holds) for the (name, dtype, stored shape) of a
    converted folder (oss_mlx.memory.folder_tensors): a rank's share, from the headers only."""
    return [(name, dtype, cut_of(plan, name, shape).shape(shape)) for name, dtype, shape in tensors]


# ---- loading -------------------------------------------------------------------------------


@dataclass
class Sharding:
    """This rank's part of a model: passed to `oss_mlx.model.load(..., shard=)`, which calls
    `model` (build this rank's modules), `read` (its slices of each weight file) and `finish`
    (wire the collectives)."""

    group: object
    moe: str = MOE_SPLIT
    share: Share = None
    comm: Comm = None
    bytes_read: int = 0  # bytes of tensor data this rank requested from the files
    load_s: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def __post_init__(self):
        self.comm = Comm(self.group)

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def model(self, config: ModelConfig, **kwargs) -> Model:
        self._t0 = time.perf_counter()
        self.share = Share(config, self.rank, self.size, self.moe)
        model = Model(self.share.local_config(), **kwargs)
        model.config = config
        q = {k: kwargs[k] for k in ("group_size", "bits", "mode") if k in kwargs}
        for layer in model.layers:
            if self.moe == "ep":
                first, last = self.share.experts
                layer.mlp.experts = Experts(replace(config, num_experts=last - first), **q)
        model.unembedding = nn.Linear(config.hidden_size, self.share.vocab_rows, bias=False)
        return model

    def _slice(self, name: str, mm: np.ndarray):
        """(this rank's part of one stored tensor (a numpy memmap), the bytes it requested
        from the file)."""
        cut = cut_of(self.share, name, mm.shape)
        if cut.zeros:
            return np.zeros(mm.shape, mm.dtype), 0  # added once, by rank 0
        if cut.axis is None:
            return mm, mm.nbytes
        parts = []
        for lo, hi in cut.ranges:
            index = [slice(None)] * mm.ndim
            index[cut.axis] = slice(lo, hi)
            parts.append(mm[tuple(index)])
        requested = sum(p.nbytes for p in parts)
        if len(parts) > 1:
            out = np.concatenate(parts, axis=cut.axis)
        else:
            out = np.ascontiguousarray(parts[0])
        if cut.rows is not None and out.shape[0] < cut.rows:
            pad = np.zeros((cut.rows - out.shape[0],) + out.shape[1:], out.dtype)
            out = np.concatenate([out, pad])
        return out, requested

    def read(self, path) -> dict:
        """This rank's tensors of one safetensors file: read through a memory map, only the
        slices it keeps (whole tensors for what every rank holds)."""
        path = Path(path)
        out = {}
        for name, info in read_header(path).items():  # checked against the file's size
            np_dtype, mx_dtype = _NP_DTYPES.get(info.dtype, (None, None))
            if np_dtype is None:
                raise OssMlxError(f"{path}: tensor {name} has unsupported dtype {info.dtype}")
            try:
                mm = np.memmap(path, dtype=np_dtype, mode="r", offset=info.offset,
                               shape=info.shape)
            except (OSError, ValueError) as e:
                raise OssMlxError(f"{path}: truncated or unreadable tensor {name} ({e})") from None
            part, requested = self._slice(name, mm)
            self.bytes_read += requested
            arr = mx.array(part)  # a copy of just the slice; the map is dropped with `mm`
            out[name] = arr.view(mx_dtype) if mx_dtype is not None else arr
            del mm, part
        return out

    def finish(self, model: Model) -> Model:
        comm = self.comm
        for layer in model.layers:
            layer.attention.out = SummedLinear(layer.attention.out, comm)
            if self.moe == "ep":
                first, last = self.share.experts
                layer.mlp.experts = LocalExperts(layer.mlp.experts, first, last - first, comm)
            else:
                layer.mlp.experts = SummedExperts(layer.mlp.experts, comm)
        model.unembedding = GatheredUnembedding(model.unembedding, self.share.config.vocab_size, comm)
        model.sharding = self
        self.load_s = time.perf_counter() - self._t0
        return model

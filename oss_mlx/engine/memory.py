"""The memory plan: what a model needs at a context, before loading it, and whether it fits.

    plan = plan_for_folder(model_dir, context=131072, kv_bits=None, dtype="bfloat16")
    plan.weights, plan.kv, plan.working, plan.total        # bytes
    limit = machine_limit()                                # what this machine allows
    check_fits(model_dir, args)                            # one-line refusal unless --force

Inputs, each from one place:
- weights: every tensor of the converted folder from its safetensors header (no load), at the
  dtype the loader gives it (model.Precision.weight: norms/router float32, embedding as stored,
  expert biases in the experts' dtype, the rest in the compute dtype); or, without a folder, from the layout table (convert/layout.py) and the
  converter's dense quantization (`plan_for_config`, for models not on disk and the table in
  docs/memory.md);
- KV cache at `context`: full-attention layers hold every position (allocated in steps of 256,
  as mlx-lm's caches grow), in the model dtype or `kv_bits` (kv_element_bytes); sliding
  layers hold at most window + one prefill chunk, in the model dtype;
- working buffers of the worst prefill chunk (the last one, against the whole context): the
  per-token activations (formula `_token_bytes`, scaled by WORK_FACTOR measured once on a real
  prefill chunk, see below), the attention scores where the backend materialises them (the CPU
  fallback of mx.fast.scaled_dot_product_attention keeps scores and probabilities, float32,
  [heads, chunk, context]; Metal's fused kernel does not), one full layer's cache while it grows
  (the old and the new buffer are both alive), the dequantized keys/values of one layer on the
  quantized-KV prefill path, and the last position's float32 logits.

Under mlx.launch each rank plans its own share (`plan_for_rank`): the tensors as that rank holds
them (oss_mlx.shard.local_tensors, from the headers) and the KV cache and buffers of its local
config (its share of the heads and expert rows); `check_fits(..., rank=, size=)` refuses naming
the rank.

What the machine allows (`machine_limit`): on macOS the GPU's working set, Metal's
recommendedMaxWorkingSetSize (mx.device_info), or the iogpu wired limit when the user has set
`sysctl iogpu.wired_limit_mb`; elsewhere the available RAM (MemAvailable). OSS_MLX_MEMORY_LIMIT
(bytes, or "12GB") overrides both, for tests and for users who want a margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from oss_mlx.checkpoint import layout as L
from oss_mlx.checkpoint.safetensors import ITEMSIZE, read_header, shard_files
from oss_mlx.config import PRESETS, ModelConfig, read_model_folder
from oss_mlx.defaults import DTYPES, KV_GROUP_SIZE, MOE_SPLIT, PREFILL_CHUNK
from oss_mlx.engine import machine
from oss_mlx.engine.machine import Limit, machine_limit
from oss_mlx.errors import OssMlxError

GB = 1e9
KV_STEP = 256  # mlx-lm's KVCache / QuantizedKVCache allocate in steps of 256 positions
# Measured peak working memory of a prefill chunk / `_token_bytes` formula (same chunk),
# on MLX's CPU backend: see tests/engine/test_memory.py (tiny and 20b-shaped) and docs/memory.md.
WORK_FACTOR = 1.0
DTYPE_BYTES = dict(zip(DTYPES, (4, 2, 2)))


@dataclass
class MemoryPlan:
    context: int
    kv_bits: int | None
    dtype: str
    dense: str  # "bf16" or "8-bit" / "4-bit" affine dense weights
    weights: int
    kv: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.working

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


# ---- weights -----------------------------------------------------------------------------


def _loaded_itemsize(name: str, stored: str, dtype: str, backend: str) -> int:
    """Bytes per element once loaded: the model's own precision rule (model.Precision.weight:
    norms/router float32, embedding as stored, expert biases in the experts' dtype, which is
    float32 on the CPU backend)."""
    import mlx.core as mx

    from oss_mlx.model.gpt_oss import Precision

    size = ITEMSIZE[stored]
    if stored not in ("BF16", "F16", "F32"):
        return size  # packed weights and e8m0 scales
    dense = getattr(mx, dtype)
    loaded = Precision(dense, mx.float32 if backend == "cpu" else dense).weight(name)
    return size if loaded is None else loaded.size


def _tensor_bytes(tensors, dtype: str, backend: str | None = None) -> int:
    """tensors: (name, stored dtype, shape) triples."""
    backend = backend or machine.backend()
    return sum(math.prod(shape) * _loaded_itemsize(name, stored, dtype, backend)
               for name, stored, shape in tensors)


def folder_tensors(model_dir: Path) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of every tensor in a converted folder, from the headers only."""
    shards, _ = shard_files(Path(model_dir), "model*.safetensors")
    return [(t.name, t.dtype, t.shape) for f in shards for t in read_header(f).values()]


def config_tensors(cfg: ModelConfig, dense_bits: int = 16) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of the tensors `oss-mlx convert --dense-bits N` writes for `cfg`,
    from the layout table: experts repacked byte for byte (U8 blocks -> U32 words), the dense
    modules quantized (packed weight + scales + biases per group) when N < 16."""
    q = L.dense_quantization(dense_bits)
    modules = {f"{m}.weight" for m in q["modules"]} if q else set()
    out = []
    for ours, _, _, dtype, shape in L.entries(cfg):
        if dtype == "U8" and ours.endswith(".weight"):  # mxfp4 blocks [E, out, in/32, 16]
            out.append((ours, "U32", shape[:2] + (shape[2] * 4,)))
        elif L.leaf(ours) in modules:
            rows, cols = shape
            stem, g = ours[: -len(".weight")], q["group_size"]
            out += [(ours, "U32", (rows, cols * q["bits"] // 32)),
                    (f"{stem}.scales", "BF16", (rows, cols // g)),
                    (f"{stem}.biases", "BF16", (rows, cols // g))]
        else:
            out.append((ours, dtype, shape))
    return out


# ---- KV cache and working buffers ----------------------------------------------------------


def _layers(cfg: ModelConfig) -> tuple[int, int]:
    """(sliding layers, full-attention layers)."""
    n_sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    return n_sliding, cfg.num_hidden_layers - n_sliding


def kv_element_bytes(bits: int | None, dtype_size: int = 2, group_size: int = KV_GROUP_SIZE) -> float:
    """Bytes per cached K or V element: dtype_size in full precision; else the packed bits plus
    one scale and one bias (of dtype_size bytes each) per group (mlx-lm's QuantizedKVCache)."""
    if not bits:
        return float(dtype_size)
    return bits / 8 + 2 * dtype_size / group_size


def _kv_row_bytes(cfg: ModelConfig, bits, dtype_bytes: int) -> float:
    """K and V bytes of one position in one layer."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * kv_element_bytes(bits, dtype_bytes)


def kv_bytes(cfg: ModelConfig, context: int, kv_bits=None, dtype_bytes: int = 2,
             chunk: int = PREFILL_CHUNK) -> int:
    n_sliding, n_full = _layers(cfg)
    full = n_full * math.ceil(context / KV_STEP) * KV_STEP * _kv_row_bytes(cfg, kv_bits, dtype_bytes)
    window = min(context, cfg.sliding_window + chunk)
    return int(full + n_sliding * window * _kv_row_bytes(cfg, None, dtype_bytes))


def _token_bytes(cfg: ModelConfig, dtype_bytes: int, expert_bytes: int) -> int:
    """Activation bytes per token of a prefill chunk, summed over the buffers alive at once in
    one block: float32 residual (x and x + attention), the norm output, qkv and its roped copy,
    the attention output and its transpose, the out projection; the MLP's norm output in the
    experts' dtype, the router logits, and per selected expert the sorted input, gate_up, the
    SwiGLU output, down and its unsorted copy (float32 accumulations)."""
    H, D, I, k = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.experts_per_token
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    attn = dtype_bytes * (H + (n_q + 2 * n_kv) * D + (n_q + n_kv) * D + 2 * n_q * D + H)
    mlp = expert_bytes * H + 4 * cfg.num_experts + k * (expert_bytes * H + 4 * (2 * I + I + 2 * H))
    return 2 * 4 * H + attn + mlp


def working_bytes(cfg: ModelConfig, context: int, kv_bits=None, dtype_bytes: int = 2,
                  chunk: int = PREFILL_CHUNK, backend: str | None = None) -> int:
    """Transient bytes of the last prefill chunk against `context` cached positions."""
    backend = backend or machine.backend()
    T = min(chunk, context)
    expert_bytes = 4 if backend == "cpu" else dtype_bytes  # model.Model: float32 experts on CPU
    act = WORK_FACTOR * T * _token_bytes(cfg, dtype_bytes, expert_bytes)
    scores = 2 * cfg.num_attention_heads * T * context * 4 if backend == "cpu" else 0
    _, n_full = _layers(cfg)
    growing = math.ceil(context / KV_STEP) * KV_STEP * _kv_row_bytes(cfg, kv_bits, dtype_bytes)
    dequantized = context * _kv_row_bytes(cfg, None, dtype_bytes) if kv_bits else 0
    logits = cfg.vocab_size * 4
    return int(act + scores + (growing if n_full else 0) + dequantized + logits)


# ---- plans ---------------------------------------------------------------------------------


def _plan(cfg, tensors, dense: str, context, kv_bits, dtype, chunk, backend) -> MemoryPlan:
    if dtype not in DTYPE_BYTES:
        raise OssMlxError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    db = DTYPE_BYTES[dtype]
    return MemoryPlan(context=context, kv_bits=kv_bits, dtype=dtype, dense=dense,
                      weights=_tensor_bytes(tensors, dtype, backend) + 4 * cfg.head_dim // 2,  # + RoPE
                      kv=kv_bytes(cfg, context, kv_bits, db, chunk),
                      working=working_bytes(cfg, context, kv_bits, db, chunk, backend))


def plan_for_folder(model_dir, context: int | None = None, kv_bits=None, dtype: str = "bfloat16",
                    chunk: int = PREFILL_CHUNK, backend: str | None = None) -> MemoryPlan:
    folder = read_model_folder(model_dir)
    return _plan(folder.config, folder_tensors(folder.path), folder.dense_label,
                 context or folder.config.max_context, kv_bits, dtype, chunk, backend)


def _rank_plan(cfg, tensors, dense: str, context, kv_bits, dtype, chunk, backend,
               rank: int, size: int, moe: str = MOE_SPLIT) -> MemoryPlan:
    """One rank's plan under mlx.launch: weights = the arrays its sharded load holds
    (oss_mlx.shard.local_tensors: its slices, the zeros of the biases rank 0 adds, the padded
    unembedding rows), KV and buffers from its local config (its share of the heads and of
    the experts' rows); the gathered logits stay full width."""
    from oss_mlx.model.shard import Share, local_tensors

    share = Share(cfg, rank, size, moe)
    return _plan(share.local_config(), local_tensors(share, tensors), dense, context, kv_bits,
                 dtype, chunk, backend)


def plan_for_rank(model_dir, rank: int, size: int, moe: str = MOE_SPLIT, context: int | None = None,
                  kv_bits=None, dtype: str = "bfloat16", chunk: int = PREFILL_CHUNK,
                  backend: str | None = None) -> MemoryPlan:
    """`plan_for_folder` for rank `rank` of `size` (its share only)."""
    folder = read_model_folder(model_dir)
    return _rank_plan(folder.config, folder_tensors(folder.path), folder.dense_label,
                      context or folder.config.max_context, kv_bits, dtype, chunk, backend,
                      rank, size, moe)


def plan_for_config(cfg: ModelConfig, context: int | None = None, kv_bits=None,
                    dense_bits: int = 16, dtype: str = "bfloat16", chunk: int = PREFILL_CHUNK,
                    backend: str | None = None) -> MemoryPlan:
    dense = "bf16" if dense_bits == 16 else f"{dense_bits}-bit"
    return _plan(cfg, config_tensors(cfg, dense_bits), dense, context or cfg.max_context,
                 kv_bits, dtype, chunk, backend)


def max_context_that_fits(fits, high: int, low: int = 1024) -> int | None:
    """The largest multiple of 1024 in [low, high] for which fits(context) holds, or None."""
    if not fits(low):
        return None
    lo, hi = low // 1024, high // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * 1024) else (lo, mid - 1)
    return lo * 1024


# ---- what the machine allows -----------------------------------------------------------------


# ---- the check before loading ----------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def advice(cfg: ModelConfig, plan: MemoryPlan, limit: Limit, tensors=None, total=None) -> list[str]:
    """What would fit instead, best first: a shorter context, 8-bit KV, 8-bit dense weights,
    and on macOS the command that raises the wired limit (and its risk). `total(context,
    kv_bits)`: the planner to ask (one rank's share under a launch, which gets no dense-weight
    advice: that would need a re-converted folder's headers); default the whole model's."""
    dtype, kv_bits = plan.dtype, plan.kv_bits
    tensors = tensors or config_tensors(cfg, 16 if plan.dense == "bf16" else int(plan.dense[0]))
    out = []
    whole = total is None

    if whole:
        def total(context, bits, ts=tensors):
            return _plan(cfg, ts, plan.dense, context, bits, dtype, PREFILL_CHUNK, None).total

    n = max_context_that_fits(lambda c: total(c, kv_bits) <= limit.bytes, plan.context)
    if n:
        out.append(f"--max-context {n}")
    if not kv_bits:
        if total(plan.context, 8) <= limit.bytes:
            out.append(f"--kv-bits 8 ({_gb(total(plan.context, 8))})")
        else:
            m = max_context_that_fits(lambda c: total(c, 8) <= limit.bytes, plan.context)
            if m and m > (n or 0):
                out.append(f"--kv-bits 8 --max-context {m}")
    if whole and plan.dense == "bf16":
        q8 = config_tensors(cfg, 8)
        t8 = total(plan.context, kv_bits, q8)
        if t8 <= limit.bytes:
            out.append(f"8-bit dense weights ({_gb(t8)}: oss-mlx convert SRC --dense-bits 8)")
    if limit.macos and plan.total < limit.total_ram - 4 * GB:
        mb = math.ceil((plan.total + 1 * GB) / 2**20)
        out.append(f"raise the GPU wired limit: sudo sysctl iogpu.wired_limit_mb={mb} (leaves "
                   f"{_gb(limit.total_ram - mb * 2**20)} to macOS and other apps, which then "
                   "swap or freeze if they need more; resets at reboot)")
    return out


def refusal(name: str, plan: MemoryPlan, limit: Limit, options: list[str]) -> str:
    head = (f"{name} at {plan.context:,} tokens needs {_gb(plan.total)} (weights "
            f"{_gb(plan.weights)}, KV {_gb(plan.kv)}, buffers {_gb(plan.working)}); this machine "
            f"allows {_gb(limit.bytes)} ({limit.source}): {_gb(plan.total - limit.bytes)} short")
    tail = "; would fit: " + "; or ".join(options) if options else "; nothing smaller fits"
    return head + tail + "; --force loads it anyway (it may swap)"


def check_fits(model_dir, max_context: int | None = None, kv_bits: int | None = None,
               force: bool = False, dtype: str = "bfloat16", rank: int = 0, size: int = 1,
               moe: str = MOE_SPLIT) -> MemoryPlan:
    """Before loading: the plan for this context and KV format; raises one line of advice when
    it does not fit this machine, unless `force`. Returns the plan. With `size` > 1: rank
    `rank`'s share of an mlx.launch (each rank checks its own machine; ranks that share one
    machine are checked one by one, not summed)."""
    folder = read_model_folder(model_dir)
    cfg = folder.config
    context = max_context or cfg.max_context
    if not 1 <= context <= cfg.max_context:
        raise OssMlxError(f"a context of {context:,} tokens is outside the model's "
                          f"1..{cfg.max_context:,} (--max-context)")
    tensors = folder_tensors(folder.path)
    dense = folder.dense_label

    def planned(c, bits) -> MemoryPlan:  # the whole model's plan, or this rank's share of it
        if size > 1:
            return _rank_plan(cfg, tensors, dense, c, bits, dtype, PREFILL_CHUNK, None, rank,
                              size, moe)
        return _plan(cfg, tensors, dense, c, bits, dtype, PREFILL_CHUNK, None)

    plan = planned(context, kv_bits)
    # advice() asks a launched rank's planner; for the whole model it plans itself (and also
    # offers 8-bit dense weights)
    total = (lambda c, bits: planned(c, bits).total) if size > 1 else None
    limit = machine_limit()
    if plan.total > limit.bytes and not force:
        name = Path(model_dir).name
        if size > 1:
            name = f"rank {rank}: its share (1/{size}) of {name}"
        raise OssMlxError(refusal(name, plan, limit, advice(cfg, plan, limit, tensors, total)))
    return plan


# ---- what fits on which Mac (docs/memory.md, `oss-mlx doctor --macs`) ----------------------

MAC_GB = (16, 24, 32, 36, 48, 64, 96, 128)
# (dense bits, KV bits), cheapest last: the first that fits is the table's answer.
OPTIONS = ((16, None), (16, 8), (8, 8), (4, 8), (4, 4))


def default_gpu_limit(ram_gib: int) -> int:
    """macOS's default GPU working set (recommendedMaxWorkingSetSize) for a Mac with this much
    memory: about 2/3 of it up to 32 GB and 3/4 above (reported values: 16 GB -> 10.7 GiB,
    64 GB -> 48 GiB); `sysctl iogpu.wired_limit_mb` raises it."""
    return int(ram_gib * 2**30 * (2 / 3 if ram_gib <= 32 else 3 / 4))


def raised_gpu_limit(ram_gib: int, headroom_gib: int = 4) -> int:
    """The GPU limit after `sudo sysctl iogpu.wired_limit_mb=...` leaving `headroom_gib` to
    macOS and other apps."""
    return (ram_gib - headroom_gib) * 2**30


def mac_table(contexts=(8192, 32768, 131072), macs=MAC_GB, limit_of=default_gpu_limit) -> str:
    """Markdown: for each Mac size, model and context, the first of OPTIONS that fits under
    `limit_of(GB)` (default: the default GPU working set; Metal backend figures), with its
    total in GB."""
    plans = {(m, c, o): plan_for_config(PRESETS[m], c, o[1], o[0], backend="gpu")
             for m in ("20b", "120b") for c in contexts for o in OPTIONS}
    label = lambda o: ("bf16" if o[0] == 16 else f"q{o[0]}") + ("" if o[1] is None else f" kv{o[1]}")  # noqa: E731
    head = [f"{m} {c // 1024}k" for m in ("20b", "120b") for c in contexts]
    lines = ["| Mac (GPU limit) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for gb in macs:
        limit = limit_of(gb)
        cells = []
        for m in ("20b", "120b"):
            for c in contexts:
                ok = next((o for o in OPTIONS if plans[m, c, o].total <= limit), None)
                cells.append(f"{label(ok)} ({plans[m, c, ok].total / GB:.1f})" if ok else "no")
        lines.append(f"| {gb} GB ({limit / GB:.1f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)

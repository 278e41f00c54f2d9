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
  README.md);
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
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import OssMlxError

GB = 1e9
KV_STEP = 256  # mlx-lm's KVCache / QuantizedKVCache allocate in steps of 256 positions
PREFILL_CHUNK = 512  # the engine's and Model.prefill's default chunk
# Measured peak working memory of a prefill chunk / `_token_bytes` formula (same chunk),
# on MLX's CPU backend: see tests/test_memory.py (tiny and 20b-shaped) and the README.
WORK_FACTOR = 1.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LIMIT_ENV = "OSS_MLX_MEMORY_LIMIT"
KV_BITS = (8, 4)  # --kv-bits: the quantized KV cache of oss_mlx.kv_quant
KV_GROUP_SIZE = 64  # = gpt-oss's head_dim: one scale and one bias per head vector


@dataclass
class Plan:
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


@dataclass
class Limit:
    bytes: int
    source: str  # what the figure is ("GPU working set", "iogpu wired limit", "available RAM")
    macos: bool
    total_ram: int
    recommended: int | None = None  # Metal's recommendedMaxWorkingSetSize
    wired_limit_mb: int | None = None  # sysctl iogpu.wired_limit_mb (0: the default)


# ---- weights -----------------------------------------------------------------------------


def _loaded_itemsize(name: str, stored: str, dtype: str, backend: str) -> int:
    """Bytes per element once loaded: the model's own precision rule (model.Precision.weight:
    norms/router float32, embedding as stored, expert biases in the experts' dtype, which is
    float32 on the CPU backend)."""
    import mlx.core as mx

    from .convert import stio
    from .model import Precision

    size = stio.ITEMSIZE[stored]
    if stored not in ("BF16", "F16", "F32"):
        return size  # packed weights and e8m0 scales
    dense = getattr(mx, dtype)
    loaded = Precision(dense, mx.float32 if backend == "cpu" else dense).weight(name)
    return size if loaded is None else loaded.size


def _tensor_bytes(tensors, dtype: str, backend: str | None = None) -> int:
    """tensors: (name, stored dtype, shape) triples."""
    backend = backend or _backend()
    return sum(math.prod(shape) * _loaded_itemsize(name, stored, dtype, backend)
               for name, stored, shape in tensors)


def folder_tensors(model_dir: Path) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of every tensor in a converted folder, from the headers only."""
    from .convert import stio

    shards = sorted(Path(model_dir).glob("model*.safetensors"))
    if not shards:
        raise OssMlxError(f"{model_dir}: no model*.safetensors files")
    return [(t.name, t.dtype, t.shape) for f in shards for t in stio.read_header(f).values()]


def config_tensors(cfg: ModelConfig, dense_bits: int = 16) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of the tensors `oss-mlx convert --dense-bits N` writes for `cfg`,
    from the layout table: experts repacked byte for byte (U8 blocks -> U32 words), the dense
    modules quantized (packed weight + scales + biases per group) when N < 16."""
    from .convert import convert as C
    from .convert import layout as L

    q = C.dense_quantization(dense_bits)
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
    backend = backend or _backend()
    T = min(chunk, context)
    expert_bytes = 4 if backend == "cpu" else dtype_bytes  # model.Model: float32 experts on CPU
    act = WORK_FACTOR * T * _token_bytes(cfg, dtype_bytes, expert_bytes)
    scores = 2 * cfg.num_attention_heads * T * context * 4 if backend == "cpu" else 0
    _, n_full = _layers(cfg)
    growing = math.ceil(context / KV_STEP) * KV_STEP * _kv_row_bytes(cfg, kv_bits, dtype_bytes)
    dequantized = context * _kv_row_bytes(cfg, None, dtype_bytes) if kv_bits else 0
    logits = cfg.vocab_size * 4
    return int(act + scores + (growing if n_full else 0) + dequantized + logits)


def _backend() -> str:
    import mlx.core as mx

    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu"


# ---- plans ---------------------------------------------------------------------------------


def _plan(cfg, tensors, dense: str, context, kv_bits, dtype, chunk, backend) -> Plan:
    if dtype not in DTYPE_BYTES:
        raise OssMlxError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    db = DTYPE_BYTES[dtype]
    return Plan(context=context, kv_bits=kv_bits, dtype=dtype, dense=dense,
                weights=_tensor_bytes(tensors, dtype, backend) + 4 * cfg.head_dim // 2,  # + RoPE
                kv=kv_bytes(cfg, context, kv_bits, db, chunk),
                working=working_bytes(cfg, context, kv_bits, db, chunk, backend))


def read_folder(model_dir) -> tuple[ModelConfig, dict]:
    """(config, config.json) of a converted folder, with a one-line error otherwise."""
    from .store import read_model_config

    meta = read_model_config(Path(model_dir))
    if meta is None or "model" not in meta:
        raise OssMlxError(f"{model_dir}: not an oss-mlx model folder (run `oss-mlx convert` first)")
    return ModelConfig.from_dict(meta["model"]), meta


def dense_label(meta: dict) -> str:
    dense = (meta.get("quantization") or {}).get("dense")
    return f"{dense['bits']}-bit" if dense else "bf16"


def plan_for_folder(model_dir, context: int | None = None, kv_bits=None, dtype: str = "bfloat16",
                    chunk: int = PREFILL_CHUNK, backend: str | None = None) -> Plan:
    cfg, meta = read_folder(model_dir)
    return _plan(cfg, folder_tensors(Path(model_dir)), dense_label(meta),
                 context or cfg.max_context, kv_bits, dtype, chunk, backend)


def _rank_plan(cfg, tensors, dense: str, context, kv_bits, dtype, chunk, backend,
               rank: int, size: int, moe: str = "tp") -> Plan:
    """One rank's plan under mlx.launch: weights = the arrays its sharded load holds
    (oss_mlx.shard.local_tensors: its slices, the zeros of the biases rank 0 adds, the padded
    unembedding rows), KV and buffers from its local config (its share of the heads and of
    the experts' rows); the gathered logits stay full width."""
    from .shard import Plan as Share
    from .shard import local_tensors

    share = Share(cfg, rank, size, moe)
    return _plan(share.local_config(), local_tensors(share, tensors), dense, context, kv_bits,
                 dtype, chunk, backend)


def plan_for_rank(model_dir, rank: int, size: int, moe: str = "tp", context: int | None = None,
                  kv_bits=None, dtype: str = "bfloat16", chunk: int = PREFILL_CHUNK,
                  backend: str | None = None) -> Plan:
    """`plan_for_folder` for rank `rank` of `size` (its share only)."""
    cfg, meta = read_folder(model_dir)
    return _rank_plan(cfg, folder_tensors(Path(model_dir)), dense_label(meta),
                      context or cfg.max_context, kv_bits, dtype, chunk, backend, rank, size, moe)


def plan_for_config(cfg: ModelConfig, context: int | None = None, kv_bits=None,
                    dense_bits: int = 16, dtype: str = "bfloat16", chunk: int = PREFILL_CHUNK,
                    backend: str | None = None) -> Plan:
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


def parse_bytes(s: str) -> int:
    """'12GB', '12.5 GB', '800MB', '12GiB' or a plain byte count."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B?)\s*", s.upper())
    if not m:
        raise OssMlxError(f"{LIMIT_ENV}={s!r}: expected bytes or a size such as 12GB")
    base = 1024 if m.group(3) == "IB" else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _sysctl(name: str) -> str | None:
    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _meminfo() -> dict[str, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in
            (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def machine_limit() -> Limit:
    """The bytes a model may use here without the machine swapping (see the module docstring)."""
    macos = sys.platform == "darwin"
    info = {}
    if macos:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    mem = _meminfo()
    total = int(info.get("memory_size") or mem.get("MemTotal") or os.sysconf("SC_PAGE_SIZE")
                * os.sysconf("SC_PHYS_PAGES"))
    env = os.environ.get(LIMIT_ENV)
    if env:
        return Limit(parse_bytes(env), f"{LIMIT_ENV}", macos, total)
    if macos:
        rec = int(info.get("max_recommended_working_set_size") or 0) or None
        wired = _sysctl("iogpu.wired_limit_mb")
        wired = int(wired) if wired and wired.isdigit() else None
        if wired:
            return Limit(wired << 20, "iogpu wired limit", True, total, rec, wired)
        return Limit(rec or int(total * 2 / 3), "GPU working set", True, total, rec, wired)
    return Limit(mem.get("MemAvailable", total), "available RAM", False, total)


# ---- the check before loading ----------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def advice(cfg: ModelConfig, plan: Plan, limit: Limit, tensors=None, total=None) -> list[str]:
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


def refusal(name: str, plan: Plan, limit: Limit, options: list[str]) -> str:
    head = (f"{name} at {plan.context:,} tokens needs {_gb(plan.total)} (weights "
            f"{_gb(plan.weights)}, KV {_gb(plan.kv)}, buffers {_gb(plan.working)}); this machine "
            f"allows {_gb(limit.bytes)} ({limit.source}): {_gb(plan.total - limit.bytes)} short")
    tail = "; would fit: " + "; or ".join(options) if options else "; nothing smaller fits"
    return head + tail + "; --force loads it anyway (it may swap)"


def add_memory_arguments(parser) -> None:
    """--max-context, --kv-bits and --force for the commands that load a model."""
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="longest context to plan and allow (default: the model's 131072)")
    parser.add_argument("--kv-bits", type=int, choices=list(KV_BITS), default=None,
                        help="quantize the full-attention layers' KV cache to 8 or 4 bits "
                             "(with the attention sinks; sliding layers stay full precision)")
    parser.add_argument("--force", action="store_true",
                        help="load even when the memory plan says the model does not fit")


def add_decode_arguments(parser) -> None:
    """--no-compile, for the commands that generate through the engine (generate, chat, serve);
    load_engine reads it."""
    parser.add_argument("--no-compile", action="store_true",
                        help="decode on the plain (uncompiled) forward instead of the compiled "
                             "single-token step, e.g. to compare the two")


def check_fits(model_dir, args, dtype: str = "bfloat16", rank: int = 0, size: int = 1,
               moe: str = "tp") -> Plan:
    """Before loading: the plan for `args` (max_context, kv_bits); raises one line of advice
    when it does not fit this machine, unless args.force. Returns the plan. With `size` > 1:
    rank `rank`'s share of an mlx.launch (each rank checks its own machine; ranks that share
    one machine are checked one by one, not summed)."""
    cfg, meta = read_folder(model_dir)
    context = getattr(args, "max_context", None) or cfg.max_context
    if not 1 <= context <= cfg.max_context:
        raise OssMlxError(f"a context of {context:,} tokens is outside the model's 1..{cfg.max_context:,} "
                          "(--max-context)")
    tensors = folder_tensors(Path(model_dir))
    kv_bits, dense = getattr(args, "kv_bits", None), dense_label(meta)
    def planned(c, bits) -> Plan:  # the whole model's plan, or this rank's share of it
        if size > 1:
            return _rank_plan(cfg, tensors, dense, c, bits, dtype, PREFILL_CHUNK, None, rank,
                              size, moe)
        return _plan(cfg, tensors, dense, c, bits, dtype, PREFILL_CHUNK, None)

    plan = planned(context, kv_bits)
    # advice() asks a launched rank's planner; for the whole model it plans itself (and also
    # offers 8-bit dense weights)
    total = (lambda c, bits: planned(c, bits).total) if size > 1 else None
    limit = machine_limit()
    if plan.total > limit.bytes and not getattr(args, "force", False):
        name = Path(model_dir).name
        if size > 1:
            name = f"rank {rank}: its share (1/{size}) of {name}"
        raise OssMlxError(refusal(name, plan, limit, advice(cfg, plan, limit, tensors, total)))
    return plan


def apply(model, args) -> None:
    """After loading: the KV format and the context limit the plan was made for."""
    model.kv_bits = getattr(args, "kv_bits", None)
    if getattr(args, "max_context", None):
        model.max_context = int(args.max_context)


# ---- measuring (tests, benchmarks/memory.py) -----------------------------------------------


def measure(model_dir, context: int, kv_bits=None, chunk: int = PREFILL_CHUNK,
            dtype: str = "bfloat16", decode_steps: int = 2, seed: int = 0) -> dict:
    """Load the model, prefill `context` random tokens in `chunk`s into a `kv_bits` cache,
    decode a few steps; MLX's peak memory over all of it, against the plan's figures."""
    import gc

    import mlx.core as mx
    import numpy as np

    from .model import load

    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load(model_dir, dtype=dtype)
    weights = mx.get_active_memory() - base
    cache = model.make_cache(kv_bits=kv_bits)
    n = context - decode_steps
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, model.config.vocab_size, (1, n)), dtype=mx.int32)
    y = mx.argmax(model.prefill(tokens, cache, chunk_size=chunk), axis=-1)
    for _ in range(decode_steps):
        y = mx.argmax(model(y[:, None], cache)[:, -1], axis=-1)
        mx.eval(y)
    kv = sum(c.nbytes for c in cache)
    peak = mx.get_peak_memory() - base
    del model, cache
    gc.collect()
    mx.clear_cache()
    return {"peak": peak, "weights": weights, "kv": kv, "working": peak - weights - kv}


def load_engine(model: str, args, **engine_kwargs):
    """Engine.load after the memory check, with args' KV format, context limit and
    --no-compile applied: the one call chat / generate / serve make instead of Engine.load.
    Under mlx.launch every rank checks its own share before loading
    (oss_mlx.distributed.load_engine) and builds its caches in the same format (its own KV
    heads quantized with --kv-bits)."""
    from . import distributed
    from .store import resolve_model

    engine_kwargs = {"compiled": not getattr(args, "no_compile", False), **engine_kwargs}
    try:
        folder = resolve_model(model)
    except OssMlxError:
        folder = None  # Engine.load says why, in its own words

    def check(rank: int = 0, size: int = 1, moe: str = "tp"):
        if folder is not None:
            check_fits(folder, args, rank=rank, size=size, moe=moe)

    return distributed.load_engine(model, check=check, prepare=lambda m: apply(m, args),
                                   **engine_kwargs)


# ---- what fits on which Mac (README, `oss-mlx doctor --macs`) -------------------------------

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
    from .convert.synth import PRESETS

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

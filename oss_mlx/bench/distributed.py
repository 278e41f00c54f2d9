"""`oss-mlx bench` inside an mlx.launch: tokens/s and the time per token spent communicating.

    mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- oss-mlx bench --model M \\
        --prompt-tokens 512 --gen-tokens 32 [--json FILE]

Every rank runs the same timing in lockstep (no leader/follower protocol: the same graphs in the
same order): a fresh cache, the prompt prefilled in chunks, then greedy decoding with the
engine's pipelining. It is timed twice: with the collectives, then with every collective
replaced by the identity (`Comm.enabled = False`: the same compute, wrong numbers); the
difference is the time communication costs. Bytes per token are counted from the collectives
the sharded layers build (payload per rank) and converted to bytes each rank sends on a ring.
Rank 0 prints the report; memory is gathered from every rank: MLX active and peak memory and RSS
after load and after the run, with that rank's memory plan; run with `-n 1` for the single
process's figures (the report also carries the single-process plan).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from oss_mlx.errors import OssMlxError


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _timed_run(model, prompt, gen: int, chunk: int, comm):
    """(prefill s, decode s, payload bytes, bytes sent, collectives; the last three per
    decoded token)."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    cache = model.make_cache()
    t0 = time.perf_counter()
    with mx.stream(generation_stream):
        y = mx.argmax(model.prefill(prompt, cache, chunk), axis=-1)
    mx.eval(y)
    t1 = time.perf_counter()
    comm.reset()

    def step(y):
        with mx.stream(generation_stream):
            return mx.argmax(model(y[:, None], cache)[:, -1], axis=-1)

    for _ in range(gen):  # queue the next step before reading this token, as the engine does
        nxt = step(y)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, comm.payload_bytes / gen, comm.wire_bytes() / gen, comm.calls / gen


def _latency(group, hidden: int, reps: int = 50) -> float:
    """Seconds for one [1, hidden] float32 all_sum, evaluated alone (the per-collective floor)."""
    import mlx.core as mx

    x = mx.ones((1, hidden))
    for _ in range(5):
        mx.eval(mx.distributed.all_sum(x, group=group))
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(mx.distributed.all_sum(x, group=group))
    return (time.perf_counter() - t) / reps


MEMORY_FIELDS = ("weights_bytes", "peak_bytes", "rss_bytes", "bytes_read",
                 "active_after_load_bytes", "peak_after_load_bytes", "rss_after_load_bytes",
                 "plan_weights_bytes", "plan_kv_bytes", "plan_total_bytes")


def _plans(model_arg, model, sharding, context: int):
    """(this rank's memory plan, the single process's) at `context` tokens, in the dtype the
    model was loaded in."""
    from oss_mlx.engine import memory
    from oss_mlx.store import resolve_model

    folder = resolve_model(model_arg)
    dtype = str(model.dtype).rsplit(".", 1)[-1]
    single = memory.plan_for_folder(folder, context, dtype=dtype)
    if sharding.size == 1:
        return single, single
    return memory.plan_for_rank(folder, sharding.rank, sharding.size, sharding.moe, context,
                                dtype=dtype), single


def measure_rank(args) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from oss_mlx.engine.distributed import init, load_sharded

    if not args.model:
        raise OssMlxError("a distributed bench needs --model (a converted folder or store name)")
    prompt_len = int(str(args.prompt_tokens).split(",")[0])
    gen = int(args.gen_tokens)
    dtype = None if args.dtype == "auto" else args.dtype
    group = init()
    rank, size = group.rank(), group.size()
    t = time.perf_counter()
    engine, sharding = load_sharded(args.model, dtype, group)
    model, comm = engine.model, sharding.comm
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t
    loaded = [mx.get_active_memory(), mx.get_peak_memory(), _rss()]  # after load, measured
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    plan, single = _plans(args.model, model, sharding, prompt_len + gen)
    V = model.config.vocab_size
    prompt = mx.array(np.random.default_rng(args.seed).integers(0, V, (1, prompt_len)))
    _timed_run(model, prompt[:, :32], 4, args.chunk_size, comm)  # warm-up
    mx.reset_peak_memory()
    with_comm = _timed_run(model, prompt, gen, args.chunk_size, comm)
    peak = mx.get_peak_memory()
    comm.enabled = False
    without = _timed_run(model, prompt, gen, args.chunk_size, comm)
    comm.enabled = True
    latency = _latency(group, model.config.hidden_size) if size > 1 else 0.0
    kib = [weights, peak, _rss(), sharding.bytes_read, *loaded, plan.weights, plan.kv, plan.total]
    mem = mx.array([b >> 10 for b in kib] + [int(load_s * 1000)], dtype=mx.int32)  # KiB, ms
    every = np.array(mx.distributed.all_gather(mem[None], group=group)).tolist() if size > 1 \
        else [np.array(mem).tolist()]
    (pf, dec, payload, wire, calls), (pf0, dec0, *_) = with_comm, without
    return {
        "ranks": size, "rank": rank, "model": str(args.model), "moe": sharding.moe,
        "prompt_tokens": prompt_len, "gen_tokens": gen,
        "prefill_tps": prompt_len / pf, "decode_tps": gen / dec,
        "prefill_tps_no_comm": prompt_len / pf0, "decode_tps_no_comm": gen / dec0,
        "comm_s_per_decoded_token": max(dec - dec0, 0.0) / gen,
        "comm_s_per_prefilled_token": max(pf - pf0, 0.0) / prompt_len,
        "collectives_per_decoded_token": calls,
        "payload_bytes_per_decoded_token": payload,
        "wire_bytes_per_decoded_token": wire,
        "all_sum_latency_s": latency,
        # Memory per rank, KiB-rounded: measured after load (MLX active / peak, RSS) and after
        # the timed run (peak, RSS), against that rank's plan (memory.plan_for_rank at
        # prompt + gen tokens); with 1 rank these are the single-process figures.
        "per_rank": [dict(zip(MEMORY_FIELDS, (b << 10 for b in m[:-1])), rank=r,
                          load_s=m[-1] / 1000) for r, m in enumerate(every)],
        "single_process_plan": single.to_dict(),
    }


def main(args) -> int:
    report = measure_rank(args)
    if report["rank"] != 0:
        return 0
    if getattr(args, "json_path", None):  # first: the report survives a closed stdout
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    r = report
    print(f"oss-mlx bench, {r['ranks']} rank(s), {r['model']} (experts {r['moe']}):")
    print(f"  prefill {r['prompt_tokens']} tokens: {r['prefill_tps']:.1f} tok/s "
          f"({r['prefill_tps_no_comm']:.1f} without communication; "
          f"{r['comm_s_per_prefilled_token'] * 1e3:.2f} ms/token communicating)")
    print(f"  decode {r['gen_tokens']} tokens: {r['decode_tps']:.2f} tok/s "
          f"({r['decode_tps_no_comm']:.2f} without communication; "
          f"{r['comm_s_per_decoded_token'] * 1e3:.2f} ms/token communicating)")
    print(f"  per decoded token: {r['collectives_per_decoded_token']:.0f} collectives, "
          f"{r['payload_bytes_per_decoded_token'] / 1e3:.1f} kB payload, "
          f"{r['wire_bytes_per_decoded_token'] / 1e3:.1f} kB sent per rank; one all_sum "
          f"{r['all_sum_latency_s'] * 1e6:.0f} us")
    single = r["single_process_plan"]
    print(f"  memory per rank (one process would plan {_size(single['weights'])} weights, "
          f"{_size(single['total'])} in all at {r['prompt_tokens'] + r['gen_tokens']} tokens):")
    for m in r["per_rank"]:
        print(f"  rank {m['rank']}: after load MLX active {_size(m['active_after_load_bytes'])}, "
              f"peak {_size(m['peak_after_load_bytes'])}, RSS {_size(m['rss_after_load_bytes'])}; "
              f"after the run peak {_size(m['peak_bytes'])}, RSS {_size(m['rss_bytes'])}; weights "
              f"{_size(m['weights_bytes'])} (plan {_size(m['plan_weights_bytes'])}, total "
              f"{_size(m['plan_total_bytes'])}); read {_size(m['bytes_read'])}, loaded in "
              f"{m['load_s']:.1f} s")
    return 0


def comm_only(preset: str = "120b", layers: int = 36, prompt: int = 128, reps: int = 20) -> dict:
    """The collectives of one decoded token and of one prefill chunk of a preset's shapes, run
    alone (no weights): the loopback cost of the communication, apart from any compute.

        mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- python -m oss_mlx.bench.distributed 120b
    """
    import mlx.core as mx

    from oss_mlx.config import PRESETS
    from oss_mlx.engine.distributed import init

    cfg, group = PRESETS[preset], init()
    n = group.size()
    H, V = cfg.hidden_size, cfg.vocab_size

    def token(T: int, logits: bool):
        outs = []
        x = mx.ones((1, T, H))
        for _ in range(2 * layers):  # attention and experts of each layer, one after the other
            x = mx.distributed.all_sum(x, group=group) * (1.0 / n)
        outs.append(x)
        if logits:
            outs.append(mx.distributed.all_gather(mx.ones((1, 1, 1, -(-V // n)), dtype=mx.bfloat16),
                                                  group=group))
        mx.eval(outs)

    def timed(T, logits):
        token(T, logits)
        t = time.perf_counter()
        for _ in range(reps):
            token(T, logits)
        return (time.perf_counter() - t) / reps

    return {"preset": preset, "layers": layers, "ranks": n,
            "decode_comm_s_per_token": timed(1, True),
            "prefill_comm_s_per_chunk": timed(prompt, False), "chunk_tokens": prompt}


if __name__ == "__main__":
    import sys

    r = comm_only(*(sys.argv[1:2] or ["120b"]))
    if r and __import__("mlx.core", fromlist=["distributed"]).distributed.init().rank() == 0:
        print(json.dumps(r))

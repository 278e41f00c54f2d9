"""`oss-mlx bench`: prefill and decode tokens/s, time to first token and peak memory, beside
mlx-lm on the same checkpoint (oss_mlx/bench/: the harness, the roofline, the report, the
serving benchmark, the plot)."""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass
from pathlib import Path

from oss_mlx.bench.checkpoints import SYNTH_PRESETS
from oss_mlx.cli import options
from oss_mlx.defaults import DTYPES, PREFILL_CHUNK
from oss_mlx.errors import OssMlxError



def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="MODEL",
                     help="a store name or a converted model folder")
    src.add_argument("--synth", choices=SYNTH_PRESETS, metavar="PRESET",
                     help="a random-weight model with real dimensions, built once and kept: "
                          "20b, 120b, or narrow (the 20b's layers and experts at width 128 with "
                          "a 4,096-token vocabulary: decode bound by kernel count)")
    p.add_argument("--layers", type=options.positive_int, metavar="N",
                   help="with --synth: keep only the first N layers (default: all)")
    p.add_argument("--source", metavar="DIR",
                   help="the upstream Hugging Face checkpoint, for --compare mlx-lm (default: "
                        "the source named in the model's manifest)")
    p.add_argument("--prompt-tokens", default="128,4096,32768", metavar="N,...",
                   help="comma-separated prompt lengths")
    p.add_argument("--gen-tokens", type=options.positive_int, default=128, metavar="N",
                   help="tokens generated per run")
    p.add_argument("--repeat", type=options.positive_int, default=3, metavar="N",
                   help="timed runs per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed runs per runtime and length")
    p.add_argument("--chunk-size", type=options.positive_int, default=PREFILL_CHUNK, metavar="N",
                   help="prefill chunk, the same for every runtime")
    p.add_argument("--compare", choices=["mlx-lm"], help="also time mlx-lm on the same checkpoint")
    p.add_argument("--mlx-lm-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="mlx-lm's dtype: auto (as stored) or its float parameters cast to this")
    p.add_argument("--dtype", default="auto", metavar="DTYPE,...",
                   help=f"oss-mlx compute dtype: auto or {', '.join(DTYPES)}; several "
                        "comma-separated (e.g. auto,float32) time each")
    p.add_argument("--mlx-lm-dense-bits", type=int, default=16, choices=[16, 8],
                   help="8: quantize mlx-lm's dense matrices 8-bit group 64 (to compare with a "
                        "--dense-bits 8 model of ours)")
    p.add_argument("--decode", default="compiled", choices=["compiled", "plain", "both"],
                   help="oss-mlx decode path: the compiled step, the plain forward, or both")
    p.add_argument("--ops", action="store_true",
                   help="also count the kernels one decode token launches, per layer and in "
                        "total, for each runtime")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write all results here")
    p.add_argument("--plot", metavar="PNG",
                   help="draw decode tokens/s against context into PNG (needs the bench extra)")
    p.add_argument("--from", dest="from_json", nargs="+", metavar="JSON",
                   help="with --plot: draw these saved `--json` results instead of running")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the synthetic weights and prompts")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where --synth keeps its checkpoints (default: $OSS_MLX_HOME/bench)")
    options.add_memory(p, max_context="the longest run", kv_note=" (decodes on the plain path)")
    p.add_argument("--serve", metavar="N,...",
                   help="the serving benchmark instead: N concurrent streaming clients over "
                        "loopback HTTP for each N (e.g. 1,2,4,8), --gen-tokens each, the first "
                        "request --prompt-tokens long")
    p.add_argument("--serve-requests", type=options.positive_int, default=3, metavar="N",
                   help="with --serve: requests per client, each continuing its conversation")
    p.add_argument("--serve-concurrency", type=options.positive_int, default=None, metavar="N",
                   help="with --serve: the server's --max-concurrency (default: the largest N)")


def positive_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v <= 0 for v in vals):
        raise OssMlxError(f"{what} must be positive integers separated by commas, got {text!r}")
    return vals


@dataclass
class Target:
    """What to time: the model (a store name or folder), its folder when known, the upstream
    checkpoint mlx-lm reads, and a name for the report."""

    ref: object
    folder: Path | None
    source: Path | None
    name: str


def _check(args) -> list[str]:
    """Every check that needs nothing loaded; returns the dtypes to time."""
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or any(d not in ("auto",) + DTYPES for d in dtypes):
        raise OssMlxError(f"--dtype must be auto or {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.layers is not None and not args.synth:
        raise OssMlxError("--layers needs --synth")
    if args.from_json and not args.plot:
        raise OssMlxError("--from needs --plot PNG")
    if args.plot:
        from oss_mlx.bench.plot import require_matplotlib

        require_matplotlib()
    positive_ints(args.prompt_tokens, "--prompt-tokens")
    if args.serve:
        positive_ints(args.serve, "--serve")
    return dtypes


def _target(args, log) -> Target:
    from oss_mlx.bench.checkpoints import cache_root, source_of, synth_checkpoint
    from oss_mlx.store import resolve_model

    if args.synth:
        log(f"building (or reusing) the synthetic {args.synth} checkpoint ...")
        source, folder = synth_checkpoint(args.synth, args.layers, args.seed,
                                          cache_root(args.cache_dir))
        name = f"synth-{args.synth}" + (f"-L{args.layers}" if args.layers else "")
        return Target(folder, folder, source, name)
    if not args.model:
        raise OssMlxError("say what to benchmark: --model M or --synth 20b|120b|narrow")
    folder = resolve_model(args.model)
    source = Path(args.source) if args.source else source_of(folder)
    if args.compare == "mlx-lm":
        if source is None:
            raise OssMlxError("--compare mlx-lm needs the upstream checkpoint the model came "
                              "from: pass --source DIR (a Hugging Face layout folder)")
        if not (source / "config.json").is_file() or not _hf_layout(source):
            raise OssMlxError(f"--compare mlx-lm reads the Hugging Face layout, and {source} is "
                              "not one (an original/ folder?): pass --source DIR with the "
                              "repository's root folder")
    return Target(args.model, folder, source, str(args.model))


def _hf_layout(folder: Path) -> bool:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "gpt_oss"
    except (OSError, ValueError, AttributeError):
        return False


def main(args) -> int:
    from oss_mlx.engine.distributed import launched

    if launched():  # one rank of an mlx.launch: tok/s and communication time per token
        from oss_mlx.bench.distributed import main as distributed_main

        return distributed_main(args)
    from oss_mlx.cli.output import console

    err = console(stderr=True)
    dtypes = _check(args)

    def log(msg: str) -> None:
        err.print(msg, style="dim", markup=False)

    if args.from_json:
        return _plot(args.plot, args.from_json, log)
    target = _target(args, log)
    if args.serve:
        return _serve(args, target, log)
    report = run(args, target, dtypes, log)
    from oss_mlx.bench.report import render, write_json

    render(report, console())
    if args.json_path:
        write_json(report, Path(args.json_path))
        log(f"wrote {args.json_path}")
    if args.plot:
        from oss_mlx.bench.plot import plot

        plot([report], Path(args.plot))
        log(f"wrote {args.plot}")
    return 0


def _plot(out: str, paths: list[str], log) -> int:
    from oss_mlx.bench.plot import load, plot

    plot(load(paths), Path(out))
    log(f"wrote {out}")
    return 0


def _serve(args, target: Target, log) -> int:
    from oss_mlx.bench import serve as bench_serve
    from oss_mlx.bench.report import write_json
    from oss_mlx.bench.roofline import machine_info
    from oss_mlx.cli.output import console

    report = bench_serve.main(args, target.ref, positive_ints(args.serve, "--serve"), log,
                              console())
    if args.json_path:
        write_json({**report, "machine": machine_info(), "model": str(target.ref)},
                   Path(args.json_path))
    return 0


def _runtimes(args, target: Target, dtypes: list[str], log) -> list:
    from oss_mlx.bench.harness import load_mlx_lm, load_ours, plain_variant
    from oss_mlx.engine.loading import LoadOptions, apply

    runtimes = []
    for d in dtypes:
        log(f"loading oss-mlx ({d}) ...")
        # --kv-bits: the plain path (the compiled step keeps its own full-precision caches)
        plain = args.decode == "plain" or bool(args.kv_bits)
        rt = load_ours(target.ref, d, decode="plain" if plain else "compiled")
        apply(rt.model, LoadOptions(max_context=args.max_context, kv_bits=args.kv_bits))
        runtimes.append(rt)
        if args.decode == "both" and not plain:
            runtimes.append(plain_variant(rt))
    if args.compare == "mlx-lm":
        log("loading mlx-lm ...")
        runtimes.append(load_mlx_lm(target.source, args.mlx_lm_dtype, args.mlx_lm_dense_bits))
    return runtimes


def run(args, target: Target, dtypes: list[str], log) -> dict:
    """Time every runtime at every prompt length; the report `--json` writes."""
    from oss_mlx.bench.harness import DTYPE_POLICY, run_benchmark
    from oss_mlx.bench.roofline import add_roofline, compute_ratios, machine_info
    from oss_mlx.engine.memory import check_fits

    prompt_lengths = positive_ints(args.prompt_tokens, "--prompt-tokens")
    # Plan for the longest run unless told otherwise.
    args.max_context = args.max_context or max(prompt_lengths) + args.gen_tokens
    check_fits(target.folder, args.max_context, args.kv_bits, args.force)
    machine = machine_info()
    runtimes = _runtimes(args, target, dtypes, log)
    cfg = runtimes[0].config
    if max(prompt_lengths) + args.gen_tokens > cfg.max_context:
        raise OssMlxError(f"prompt + generated tokens exceed the model's context of "
                          f"{cfg.max_context}")
    kernels = None
    if args.ops:
        from oss_mlx.bench.opcount import count_in_subprocess

        log("counting the kernels of one decode step (in a subprocess) ...")
        kernels = count_in_subprocess(
            target.folder, dtypes, target.source if args.compare == "mlx-lm" else None,
            decode=args.decode, mlx_lm_dtype=args.mlx_lm_dtype)
    results = run_benchmark(runtimes, prompt_lengths, args.gen_tokens, args.repeat,
                            max(args.warmup, 0), args.chunk_size, seed=args.seed, log=log)
    add_roofline(results, runtimes, machine["bandwidth_gbps"])
    return _report(args, target, dtypes, machine, runtimes, results, kernels, prompt_lengths,
                   DTYPE_POLICY, compute_ratios(results))


def _report(args, target, dtypes, machine, runtimes, results, kernels, prompt_lengths,
            policy, ratios) -> dict:
    from oss_mlx.config import read_model_folder

    cfg = runtimes[0].config
    quant = read_model_folder(target.folder).quantization if target.folder else None
    return {
        "format": "oss-mlx-bench", "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "oss-mlx bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "machine": machine,
        "model": {"name": target.name, "path": str(target.folder or target.ref),
                  "source": str(target.source) if target.source else None,
                  "synth": args.synth, "layers": cfg.num_hidden_layers, "config": cfg.to_dict(),
                  "quantization": quant},
        "settings": {"prompt_tokens": prompt_lengths, "gen_tokens": args.gen_tokens,
                     "repeat": args.repeat, "warmup": max(args.warmup, 0),
                     "chunk_size": args.chunk_size, "seed": args.seed, "dtypes": dtypes,
                     "compare": args.compare, "sampler": "greedy (argmax)",
                     "decode": args.decode, "mlx_lm_dtype": args.mlx_lm_dtype,
                     "mlx_lm_dense_bits": args.mlx_lm_dense_bits},
        "dtype_policy": policy,
        "runtimes": [{"name": rt.name, "label": rt.label, "dtype": rt.dtype,
                      "weights_bytes": rt.weights_bytes, "kv_itemsize": rt.kv_itemsize}
                     for rt in runtimes],
        "results": results,
        "ratios": ratios,
        "kernels": kernels,
    }

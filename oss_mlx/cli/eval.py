"""`oss-mlx eval tools`: how good is tool calling, measured on this machine.

    oss-mlx eval tools --model gpt-oss-20b --categories simple multiple --limit 50
    oss-mlx eval tools --model gpt-oss-20b --no-constrain-tools --json runs.jsonl --resume

Runs BFCL's single-turn categories (data and scoring from the installed bfcl-eval package) and
the long agent loop of our own, through the same engine as `chat` and `serve`; shows a progress
bar with the running score, then a table per category; every case's prompt, output and verdict
go to a JSON Lines file as they finish (results.py), which --resume continues and
plot.plot_accuracy draws.
"""

from __future__ import annotations

import os
from pathlib import Path

from oss_mlx.cli import options
from oss_mlx.errors import OssMlxError

LOOP = "agent_loop"


def add_arguments(p):
    from oss_mlx.eval import agent_loop, bfcl

    p.add_argument("suite", choices=["tools"], help="what to evaluate: tools (tool calling)")
    options.add_model(p)
    p.add_argument("--categories", nargs="+", default=None, metavar="CATEGORY",
                   help=f"BFCL categories and/or {LOOP} (default: "
                        f"{' '.join(bfcl.DEFAULT_CATEGORIES)} {LOOP}); 'simple' means "
                        "simple_python")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="the first N cases of each category (default: all)")
    options.add_reasoning(p)
    p.add_argument("--no-constrain-tools", action="store_true",
                   help="let the model write tool arguments freely instead of constraining them "
                        "to each tool's schema (to compare the two)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="results file, JSON Lines (default: $OSS_MLX_HOME/eval/tools-MODEL.jsonl);"
                        " runs with other settings may share it")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same settings in that file")
    options.add_sampling(p, 4096, temperature=0.0, seed=0)
    p.add_argument("--loop-calls", type=int, default=agent_loop.DEFAULT_CALLS, metavar="N",
                   help=f"calls the agent loop asks for (default: {agent_loop.DEFAULT_CALLS})")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw accuracy per setting of every run in the file (needs the "
                        "bench extra)")
    options.add_loading(p)


def selected_categories(values) -> tuple[list[str], bool]:
    """(BFCL categories in BFCL's names, whether the agent loop runs); OssMlxError for an
    unknown name."""
    from oss_mlx.eval import bfcl

    if not values:
        return list(bfcl.DEFAULT_CATEGORIES), True
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    loop = any(n.replace("-", "_") == LOOP for n in names)
    cats = []
    for n in names:
        if n.replace("-", "_") != LOOP:
            c = bfcl.canonical(n)
            if c not in cats:
                cats.append(c)
    return cats, loop


def settings_from(args, model: str):
    from oss_mlx.eval.settings import Settings

    if args.limit is not None and args.limit < 1:
        raise OssMlxError("--limit must be at least 1")
    if args.max_tokens < 1 or args.loop_calls < 1:
        raise OssMlxError("--max-tokens and --loop-calls must be at least 1")
    if args.temperature < 0:
        raise OssMlxError("--temperature must be >= 0")
    extra = {k: getattr(args, k, None) for k in ("kv_bits", "max_context")}
    return Settings(model=model, reasoning=args.reasoning,
                    constrain=not args.no_constrain_tools, temperature=args.temperature,
                    max_tokens=args.max_tokens, seed=args.seed,
                    extra={k: v for k, v in extra.items() if v is not None})


def default_path(model: str) -> Path:
    from oss_mlx.store import home

    name = model.rstrip("/").split("/")[-1] or "model"
    return home() / "eval" / f"tools-{name}.jsonl"


def main(args, load_engine=None) -> int:
    """`load_engine(folder)` builds the engine (default: the memory-checked loader that
    generate and chat use); tests pass one over a scripted model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline: the model folder has everything
    from contextlib import ExitStack

    from oss_mlx.cli.models import choose
    from oss_mlx.cli.output import console as make_console
    from oss_mlx.eval import bfcl
    from oss_mlx.eval.results import ResultsFile

    categories, loop = selected_categories(args.categories)
    if args.plot:  # said now, not after the whole run
        from oss_mlx.bench.plot import require_matplotlib

        require_matplotlib()
    with ExitStack() as stack:
        chosen = choose(args, stack)
        settings = settings_from(args, chosen.name)
        cases = [c for cat in categories for c in bfcl.load_cases(cat, args.limit)]
        path = Path(args.json).expanduser() if args.json else default_path(chosen.name)
        results = ResultsFile.open(path, settings, args.resume)
        engine = _engine(chosen, args, load_engine)
        console, out = make_console(stderr=True), make_console()
        installed = bfcl.version()
        if cases and installed != bfcl.TESTED_VERSION:
            console.print(f"note: bfcl-eval {installed} is installed; oss-mlx was checked "
                          f"against {bfcl.TESTED_VERSION}: its data or rules may differ")
        try:
            context_full = _run(engine, cases, loop, settings, results, args, console)
        except KeyboardInterrupt:
            console.print(f"interrupted: {len(results.done)} finished results are saved in "
                          f"{path}; run the same command with --resume to go on")
            return 130
    _show(out, console, path, results.key, context_full, args)
    return 0


def _engine(chosen, args, load_engine):
    if load_engine is not None:
        return load_engine(chosen.folder)
    from oss_mlx.engine.loading import load_engine as load

    return load(str(chosen.folder), options.load_options(args))


def _run(engine, cases, loop, settings, results, args, console) -> int:
    """Run what is not finished yet; returns how many cases did not fit the context."""
    from oss_mlx.eval import agent_loop
    from oss_mlx.eval.report import progress
    from oss_mlx.eval.runner import run_case

    todo = [c for c in cases if c.id not in results.done]
    finished = [results.done[c.id] for c in cases if c.id in results.done]
    context_full = 0
    if cases:
        correct = sum(bool(r.get("valid")) for r in finished)
        with progress(console, len(cases), len(finished), correct) as update:
            for case in todo:
                update(what=case.category)
                record = run_case(engine, case, settings)
                results.append(record)
                context_full += record["context_full"]
                update(record)
    if loop and LOOP not in results.done:
        console.print(f"agent loop: up to {args.loop_calls} consecutive calls...", soft_wrap=True)
        report = agent_loop.run_loop(engine, settings, args.loop_calls)
        results.append(report.to_dict())
    return context_full


def _show(out, console, path, key, context_full, args):
    from oss_mlx.eval.report import loop_text, results_table
    from oss_mlx.eval.results import read_lines, summarize

    run = next(r for r in summarize(read_lines(path)) if r.key == key)
    out.print(results_table(run))
    if run.loop is not None:
        out.print(f"agent loop: {loop_text(run.loop)}", soft_wrap=True)
    if context_full:
        console.print(f"note: {context_full} cases did not fit in the model's context and count "
                      "as misses (raise --max-context, or leave these categories out)",
                      soft_wrap=True)
    console.print(f"results: {path}", soft_wrap=True)
    if args.plot:
        from oss_mlx.bench.plot import plot_accuracy

        console.print(f"plot: {plot_accuracy(path, args.plot)}", soft_wrap=True)

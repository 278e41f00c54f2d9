"""The pictures: decode tokens/s against context length (oss-mlx and mlx-lm, from bench
reports), and tool-calling accuracy per category and setting (from `oss-mlx eval` results).

    oss-mlx bench --synth narrow --compare mlx-lm --plot decode.png       # run, then draw
    oss-mlx bench --plot decode.png --from a.json b.json                  # draw saved results

One line per runtime per report (solid for oss-mlx, dashed for mlx-lm); the x axis is the
prompt length the decode started from (log scale). Needs matplotlib: `pip install
'oss-mlx[bench]'`; `require_matplotlib` says so in one line, before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from oss_mlx.checkpoint.files import atomic_path
from oss_mlx.errors import OssMlxError

NEEDS = "drawing needs matplotlib: pip install 'oss-mlx[bench]'"


def require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise OssMlxError(NEEDS)


def load(paths: list[str]) -> list[dict]:
    reports = []
    for p in paths:
        try:
            report = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise OssMlxError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}") from None
        if not isinstance(report, dict) or report.get("format") != "oss-mlx-bench":
            raise OssMlxError(f"{p} is not a file written by `oss-mlx bench --json`")
        reports.append(report)
    return reports


def series(report: dict) -> dict[str, tuple[list[int], list[float]]]:
    """runtime label -> (prompt lengths, median decode tokens/s), sorted by length."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        out.setdefault(r["runtime"], []).append((r["prompt_tokens"], r["median"]["decode_tps"]))
    return {k: tuple(map(list, zip(*sorted(v)))) for k, v in out.items()}


def plot(reports: list[dict], out: Path, title: str | None = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise OssMlxError(NEEDS) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report in reports:
        m, model = report["machine"], report["model"]
        where = f"{model['name']}, {m['chip']} {m['backend']}" if len(reports) > 1 else ""
        for label, (xs, ys) in series(report).items():
            style = "--" if label.startswith("mlx-lm") else "-"
            ax.plot(xs, ys, style, marker="o", label=f"{label} {where}".strip())
    first = reports[0]
    ax.set_xscale("log", base=2)
    lengths = sorted({r["prompt_tokens"] for rep in reports for r in rep["results"]})
    ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context (prompt tokens) at the start of decode")
    ax.set_ylabel("decode tokens/s (median)")
    m = first["machine"]
    ax.set_title(title or f"{first['model']['name']} on {m['chip']} ({m['backend']}, MLX {m['mlx_version']})",
                 fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:  # never half a picture under its name
        fig.savefig(tmp, dpi=120, format="png")


# ---- oss-mlx eval: accuracy per setting -----------------------------------------------------


def _runs(results) -> list:
    from oss_mlx.eval.results import read_lines, summarize

    if isinstance(results, (str, Path)):
        return summarize(read_lines(results))
    results = list(results)
    if results and isinstance(results[0], dict):
        return summarize(results)
    return results


def plot_accuracy(results, out_png) -> Path:
    """Draw each run's accuracy per BFCL category (one bar per setting) and overall.
    results: a results file, its records, or summaries (results.summarize). Returns out_png."""
    try:
        import matplotlib
    except ImportError:
        raise OssMlxError(NEEDS) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in _runs(results) if r.categories]
    if not runs:
        raise OssMlxError("no BFCL results to plot")
    categories = []
    for run in runs:
        categories += [c for c in run.categories if c not in categories]
    categories.append("all cases")
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(categories) + 2), 4.5 + 0.3 * len(runs)))
    for i, run in enumerate(runs):
        stats = [run.categories.get(c) for c in categories[:-1]] + [run.overall]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(categories))]
        ys = [100 * s.accuracy if s and s.count else 0.0 for s in stats]
        bars = ax.bar(xs, ys, width, label=run.label)
        for bar, s in zip(bars, stats):
            if s and s.count:
                ax.annotate(f"{s.correct}/{s.count}", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("BFCL accuracy per setting (oss-mlx eval tools)")
    # Below the axes: over the bars it would hide the 100% ones.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out

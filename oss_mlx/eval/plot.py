"""Accuracy per category and setting, as a grouped bar chart (matplotlib, optional: the `bench`
extra). It moves to the bench plot module with the layout change."""

from __future__ import annotations

from pathlib import Path

from ..errors import OssMlxError
from .results import RunSummary, read_lines, summarize


def _runs(results) -> list[RunSummary]:
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

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OssMlxError("plotting needs matplotlib: pip install 'oss-mlx[bench]'") from None
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

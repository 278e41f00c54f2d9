"""Decode tokens/s against context length, for oss-mlx and mlx-lm, from `oss-mlx bench --json` files.

    python benchmarks/plot.py benchmarks/results/*.json -o benchmarks/results/decode.png

One line per runtime per file (solid for oss-mlx, dashed for mlx-lm); the x axis is the prompt
length the decode started from (log scale). Needs matplotlib: `pip install 'oss-mlx[bench]'`
(the dev extra has it too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    reports = []
    for p in paths:
        report = json.loads(Path(p).read_text())
        if report.get("format") != "oss-mlx-bench":
            sys.exit(f"plot.py: {p} is not an `oss-mlx bench --json` file")
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
        sys.exit("plot.py: needs matplotlib: pip install 'oss-mlx[bench]' (or pip install matplotlib)")

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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="files written by `oss-mlx bench --json FILE`")
    ap.add_argument("-o", "--out", default="decode.png", help="PNG to write")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    plot(load(args.json), Path(args.out), args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

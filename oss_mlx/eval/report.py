"""What a user sees: a progress bar with the running score, then a table per category."""

from __future__ import annotations

from contextlib import contextmanager

from oss_mlx.eval.results import CategoryStats, RunSummary

COLUMNS = ("category", "accuracy", "correct / count", "tok/s", "wall time")


@contextmanager
def progress(console, total: int, done: int = 0, correct: int = 0):
    """A rich progress bar over `total` cases whose description shows the running score;
    yields update(record) to call after each finished case (resumed cases count from the
    start)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    state = {"done": done, "correct": correct}

    def text() -> str:
        n = state["done"]
        pct = 100 * state["correct"] / n if n else 0.0
        return f"score {state['correct']}/{n} ({pct:.1f}%)"

    bar = Progress(TextColumn("[bold]{task.fields[what]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False)
    with bar:
        task = bar.add_task(text(), total=total, completed=done, what="")

        def update(record: dict | None = None, what: str | None = None):
            if record is not None:
                state["done"] += 1
                state["correct"] += bool(record.get("valid"))
                bar.update(task, advance=1, description=text())
            if what is not None:
                bar.update(task, what=what)

        yield update


def _fmt_time(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _row(name: str, s: CategoryStats) -> list[str]:
    return [name, f"{100 * s.accuracy:.1f}%", f"{s.correct} / {s.count}",
            f"{s.tokens_per_s:.1f}", _fmt_time(s.wall_s)]


def loop_text(loop: dict) -> str:
    """The agent loop's result in words."""
    if loop["end"] == "break":
        return (f"format broke at call {loop['first_break']} ({loop['break']}); "
                f"{loop['calls']} well-formed calls before it")
    if loop["end"] == "completed":
        return f"no break in {loop['calls']} consecutive calls"
    why = {"answered": "the model answered in text", "length": "a turn ran out of max_tokens",
           "context": "the context is full"}[loop["end"]]
    return f"no break; stopped after {loop['calls']} calls: {why}"


def results_table(run: RunSummary):
    """A rich Table: one row per BFCL category, an overall row, and the agent loop (its row
    says where the format first broke, and how many calls of the target were well formed;
    loop_text says it in words)."""
    from rich.table import Table

    table = Table(title=run.label, title_justify="left")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for name, stats in run.categories.items():
        table.add_row(*_row(name, stats))
    if len(run.categories) > 1:
        table.add_section()
        table.add_row(*_row("all cases", run.overall), style="bold")
    if run.loop is not None:
        table.add_section()
        loop = run.loop
        first = f"break at call {loop['first_break']}" if loop["end"] == "break" else "no break"
        table.add_row("agent loop", first, f"{loop['calls']} / {loop['target']} calls",
                      f"{_loop_tps(loop):.1f}", _fmt_time(loop.get("wall_s", 0.0)))
    return table


def _loop_tps(loop: dict) -> float:
    wall = loop.get("wall_s", 0.0)
    return loop.get("generated_tokens", 0) / wall if wall > 0 else 0.0

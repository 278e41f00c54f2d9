"""The results file: JSON Lines, written as the run goes, read back for --resume, tables and
plots.

Each line is one JSON object: a "run" line (the settings of a run; `run` is their key), then
a "case" line per finished BFCL case and a "loop" line for the agent loop, each carrying its
run's key. Several runs (settings) can share one file: that is how accuracy per setting is
compared (oss_mlx/bench/plot.py, plot_accuracy). A line is appended with one write and flushed to disk before the
next case starts, so an interruption loses at most the case in flight; a line cut short by a
crash is dropped when the file is next opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from oss_mlx.errors import OssMlxError


def read_lines(path) -> list[dict]:
    """Every whole record in the file (a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # cut short by a crash
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise OssMlxError(f"{path}:{n} is not a results line (not JSON): is this an "
                                  "`oss-mlx eval` results file?") from None
    return records


def _drop_torn_tail(path: Path):
    """Cut the file after its last newline: what follows is a line a crash cut short."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)


@dataclass
class ResultsFile:
    """One run's view of a results file: what it finished already, and appending to it."""

    path: Path
    key: str
    done: dict = field(default_factory=dict)  # case id -> record (and "agent_loop" -> record)

    @classmethod
    def open(cls, path, settings, resume: bool) -> "ResultsFile":
        """Start or (resume=True) continue the run of `settings` in `path`. Refuses to start
        over on top of earlier results of the same settings: they are kept, never dropped."""
        path = Path(path).expanduser()
        key = settings.key()
        records = read_lines(path)
        mine = [r for r in records if r.get("run") == key]
        finished = [r for r in mine if r.get("kind") in ("case", "loop")]
        if finished and not resume:
            raise OssMlxError(f"{path} already has {len(finished)} results of these settings: "
                              "add --resume to continue that run, or give another --json file")
        header = next((r for r in mine if r.get("kind") == "run"), None)
        if header is not None:
            settings.date = header["settings"].get("date", settings.date)  # keep the run's date
        out = cls(path, key, {_id(r): r for r in finished})
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _drop_torn_tail(path)
        if header is None:
            from oss_mlx.eval import bfcl

            out.append({"kind": "run", "settings": {**settings.identity(), "date": settings.date},
                        "label": settings.label(), "bfcl_version": bfcl.version()})
        return out

    def append(self, record: dict):
        record = {**record, "run": self.key}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        # One write of the whole line; fsync so a finished case survives a power cut too.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if record.get("kind") in ("case", "loop"):
            self.done[_id(record)] = record


def _id(record: dict) -> str:
    return record["id"] if record.get("kind") == "case" else "agent_loop"


# ---- summaries -----------------------------------------------------------------------------


@dataclass
class CategoryStats:
    """A category's figures: accuracy = correct / count; tokens_per_s = generated tokens over
    the wall time of its requests (prefill included: what a user waits for)."""

    correct: int = 0
    count: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def add(self, record: dict):
        self.correct += bool(record.get("valid"))
        self.count += 1
        self.generated_tokens += record.get("generated_tokens", 0)
        self.wall_s += record.get("wall_s", 0.0)


@dataclass
class RunSummary:
    key: str
    label: str
    settings: dict
    categories: dict = field(default_factory=dict)  # BFCL category -> CategoryStats, in order
    loop: dict | None = None

    @property
    def overall(self) -> CategoryStats:
        total = CategoryStats()
        for s in self.categories.values():
            total.correct += s.correct
            total.count += s.count
            total.generated_tokens += s.generated_tokens
            total.wall_s += s.wall_s
        return total


def summarize(records: list[dict]) -> list[RunSummary]:
    """One summary per run in the file, in the order the runs started."""
    runs: dict[str, RunSummary] = {}
    for r in records:
        key = r.get("run")
        if r.get("kind") == "run" and key not in runs:
            runs[key] = RunSummary(key, r.get("label", key), r.get("settings", {}))
        elif key in runs and r.get("kind") == "case":
            runs[key].categories.setdefault(r["category"], CategoryStats()).add(r)
        elif key in runs and r.get("kind") == "loop":
            runs[key].loop = r
    return list(runs.values())

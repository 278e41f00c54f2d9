"""`oss-mlx eval tools` end to end on a scripted engine: the table, the results file, --resume
after an interruption, the plot, and bad input as one clear line."""

from __future__ import annotations

import argparse
import sys

import pytest

pytest.importorskip("bfcl_eval", reason="bfcl-eval is not installed (pip install --no-deps "
                                        "bfcl-eval, see pyproject's eval extra)")

from support.evalkit import (call_reply, correct_calls, good_call, scripted_engine,  # noqa: E402
                     text_reply)

from oss_mlx.engine import Engine  # noqa: E402
from oss_mlx.errors import OssMlxError  # noqa: E402
from oss_mlx.cli import eval as command  # noqa: E402
from oss_mlx.eval import bfcl  # noqa: E402
from oss_mlx.eval.results import read_lines  # noqa: E402


SCRIPTED_DIR = None  # set for each test: the folder the command resolves as the model


@pytest.fixture(autouse=True)
def _scripted_dir(scripted_dir, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SCRIPTED_DIR", scripted_dir)


def parse(*argv):
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    return p.parse_args(["tools", "--model", str(SCRIPTED_DIR), "--reasoning", "low", *argv])


def right_replies(limit: int) -> list[str]:
    """Right answers to the first `limit` simple_python and irrelevance cases, in run order."""
    replies = []
    for case in bfcl.load_cases("simple_python", limit):
        replies += [call_reply(n, a) for n, a in correct_calls(case)]
    replies += [text_reply("None of these tools can do that.")] * limit
    return replies


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table to the terminal width


def test_a_run_shows_the_table_and_writes_every_case(encoding, tmp_path, capsys, wide):
    engine, model = scripted_engine(encoding,
                                    right_replies(2) + [good_call(i) for i in (1, 2, 3, 4)])
    out = tmp_path / "r.jsonl"
    args = parse("--categories", "simple", "irrelevance", "agent_loop", "--limit", "2",
                 "--loop-calls", "4", "--json", str(out), "--plot", str(tmp_path / "acc.png"))
    assert command.main(args, load_engine=lambda m: engine) == 0
    assert not model.queue
    shown = capsys.readouterr()
    for text in ("simple_python", "irrelevance", "100.0%", "2 / 2", "4 / 4", "agent loop",
                 "4 / 4 calls", "agent loop: no break in 4 consecutive calls", "tok/s",
                 "wall time"):
        assert text in shown.out, text
    assert "score 4/4 (100.0%)" in shown.err
    records = read_lines(out)
    assert [r["kind"] for r in records] == ["run", "case", "case", "case", "case", "loop"]
    run = records[0]
    assert run["settings"]["constrain"] is True and run["bfcl_version"] == bfcl.version()
    case = records[1]
    assert case["id"] == "simple_python_0" and case["valid"] and case["prompt"]
    assert case["output"][0].endswith("<|call|>") and case["calls"][0]["name"] == \
        "calculate_triangle_area"
    assert (tmp_path / "acc.png").stat().st_size > 10_000


class Interrupted(Engine):
    """The real engine; Ctrl-C arrives as request number `at` starts."""

    at = 3
    requests = 0

    def stream(self, *args, **kwargs):
        self.requests += 1
        if self.requests == self.at:
            raise KeyboardInterrupt
        return super().stream(*args, **kwargs)


def test_an_interrupted_run_resumes_without_rerunning_finished_cases(encoding, tmp_path, capsys,
                                                                    wide):
    from support.scripted import ScriptedModel

    out = tmp_path / "r.jsonl"
    args = parse("--categories", "simple", "irrelevance", "--limit", "2", "--json", str(out))
    replies = right_replies(2)
    first = Interrupted(ScriptedModel(*replies, encoding=encoding), encoding)
    assert command.main(args, load_engine=lambda m: first) == 130
    assert "run the same command with --resume" in capsys.readouterr().err
    assert [r.get("id") for r in read_lines(out)] == [None, "simple_python_0", "simple_python_1"]

    # Without --resume the finished results are never overwritten.
    with pytest.raises(OssMlxError, match="already has 2 results of these settings: add --resume"):
        command.main(args, load_engine=lambda m: pytest.fail("no engine before the check"))

    # A crash mid-write leaves half a line: it is dropped, the rest is kept.
    with open(out, "a") as f:
        f.write('{"kind": "case", "id": "irrelevance_0", "val')
    engine, model = scripted_engine(encoding, replies[2:])  # only the unfinished cases' replies
    assert command.main(parse("--categories", "simple", "irrelevance", "--limit",
                              "2", "--json", str(out), "--resume"),
                        load_engine=lambda m: engine) == 0
    assert len(model.prompts) == 2 and not model.queue  # two requests: the two new cases
    ids = [r.get("id") for r in read_lines(out)]
    assert ids == [None, "simple_python_0", "simple_python_1", "irrelevance_0", "irrelevance_1"]
    assert "4 / 4" in capsys.readouterr().out


def test_runs_with_other_settings_share_the_file(encoding, tmp_path):
    out = tmp_path / "r.jsonl"
    for flags in ((), ("--no-constrain-tools",)):
        engine, _ = scripted_engine(encoding, right_replies(1))
        args = parse("--categories", "simple,irrelevance", "--limit", "1", "--json", str(out),
                     *flags)
        assert command.main(args, load_engine=lambda m, e=engine: e) == 0
    from oss_mlx.eval.results import summarize

    runs = summarize(read_lines(out))
    name = SCRIPTED_DIR.name  # the model is named after its folder
    assert [r.label for r in runs] == [f"{name}, reasoning low, constrained",
                                       f"{name}, reasoning low, unconstrained"]
    assert [r.overall.count for r in runs] == [2, 2]


def test_cases_that_do_not_fit_the_context_are_misses_with_a_note(encoding, tmp_path, capsys):
    engine, model = scripted_engine(encoding, [], max_context=150)
    args = parse("--categories", "simple", "--limit", "2", "--json", str(tmp_path / "r.jsonl"))
    assert command.main(args, load_engine=lambda m: engine) == 0
    records = read_lines(tmp_path / "r.jsonl")[1:]
    assert [(r["valid"], r["context_full"]) for r in records] == [(False, True)] * 2
    assert model.prompts == []
    err = capsys.readouterr().err
    assert "note: 2 cases did not fit in the model's context" in err


@pytest.mark.parametrize("argv, message", [
    (("--categories", "simple", "nonsense"), "unknown BFCL category 'nonsense': choose from"),
    (("--limit", "0"), "--limit must be at least 1"),
    (("--loop-calls", "0"), "--max-tokens and --loop-calls must be at least 1"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(OssMlxError, match=message) as e:
        command.main(parse(*argv), load_engine=lambda m: pytest.fail("no engine for bad input"))
    assert "\n" not in str(e.value)


def test_a_missing_bfcl_eval_is_one_line_with_the_install_command(monkeypatch):
    for name in [n for n in sys.modules if n == "bfcl_eval" or n.startswith("bfcl_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "bfcl_eval", None)
    bfcl._modules.cache_clear()
    try:
        with pytest.raises(OssMlxError) as e:
            command.main(parse("--categories", "simple"), load_engine=lambda m: None)
    finally:
        bfcl._modules.cache_clear()
    assert "\n" not in str(e.value)
    assert str(e.value).endswith(bfcl.INSTALL_HINT)
    assert "pip install --no-deps bfcl-eval==" in bfcl.INSTALL_HINT


def test_the_agent_loop_alone_needs_no_bfcl(encoding, tmp_path, monkeypatch, capsys, wide):
    monkeypatch.setitem(sys.modules, "bfcl_eval", None)
    engine, _ = scripted_engine(encoding, [good_call(1), text_reply("Done.")])
    args = parse("--categories", "agent_loop", "--json", str(tmp_path / "r.jsonl"))
    assert command.main(args, load_engine=lambda m: engine) == 0
    loop = read_lines(tmp_path / "r.jsonl")[-1]
    assert (loop["kind"], loop["end"], loop["calls"]) == ("loop", "answered", 1)
    shown = capsys.readouterr().out
    assert "no break" in shown and "1 / 32 calls" in shown
    assert "agent loop: no break; stopped after 1 calls: the model answered in text" in shown

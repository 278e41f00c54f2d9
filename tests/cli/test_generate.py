"""`oss-mlx generate`: offline (no network namespace, empty HOME) in a subprocess on the tiny
model, stdin prompts, clear one-line errors; the text output on a scripted stream in-process."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from oss_mlx.cli import generate
from oss_mlx.engine import STOP_REASONS, Engine, SamplingParams
from oss_mlx.harmony import build_conversation, load_encoding, render_prompt, user_message
from support import no_network
from support.scripted import ScriptedModel


def oss_mlx(args, tmp_path, stdin=None, offline=True, **env_extra):
    """Run the CLI like a user with an empty HOME and no OSS_MLX_HOME, without a network.
    TMPDIR stays the test run's: MLX keeps the CPU kernels it compiles under $TMPDIR/mlx, and a
    fresh one costs a child some 25 s of compiling them again."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "TMPDIR": tempfile.gettempdir(), **env_extra}
    prefix = (no_network() or []) if offline else []
    if offline and not prefix:  # no namespaces here: any network attempt fails fast and loudly
        env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return subprocess.run(
        prefix + [sys.executable, "-m", "oss_mlx.cli", "generate", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=300,
    )


@pytest.fixture(scope="module")
def expected(tiny_model):
    """In-process reference for the same greedy request (dates: today, as the CLI uses)."""
    def run(prompt, max_tokens):
        engine = Engine.load(str(tiny_model), dtype=None)
        conv = build_conversation([user_message(prompt)], reasoning="medium")
        return engine.complete(conv, SamplingParams(temperature=0.0, max_tokens=max_tokens)), engine

    return run


@pytest.mark.subprocess
def test_generate_offline_with_empty_home(tiny_model, tmp_path, expected):
    r = oss_mlx(["--model", str(tiny_model), "--prompt", "Hello there", "--max-tokens", "6",
                 "--temperature", "0", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"analysis", "final", "tool_calls", "stop_reason", "stats", "tokens"}
    assert out["stop_reason"] in STOP_REASONS
    ref, engine = expected("Hello there", 6)
    stats = out["stats"]
    assert stats["prompt_tokens"] == ref.stats.prompt_tokens
    assert stats["generated_tokens"] == ref.stats.generated_tokens <= 6
    assert stats["cached_tokens"] == 0 and stats["peak_memory_bytes"] > 0
    # the same greedy turn as in-process (the CLI's default dtype)
    assert {k: out[k] for k in ("analysis", "final", "tool_calls", "stop_reason")} == {
        k: ref.to_dict()[k] for k in ("analysis", "final", "tool_calls", "stop_reason")
    }
    assert out["tokens"] == ref.tokens  # the sampled ids, token for token
    assert not list((tmp_path / "home").iterdir()), "generate wrote into HOME"


@pytest.mark.subprocess
def test_store_name_and_prompt_from_stdin(tiny_model, tmp_path):
    store = tmp_path / "store-home"
    shutil.copytree(tiny_model, store / "models" / "tiny-test")
    text = "A prompt read from standard input, several words long.\n"
    r = oss_mlx(["--model", "tiny-test", "--prompt", "-", "--max-tokens", "2", "--json",
                 "--seed", "1"], tmp_path, stdin=text, OSS_MLX_HOME=str(store))
    assert r.returncode == 0, r.stderr
    enc = load_encoding(tiny_model)
    conv = build_conversation([user_message(text)], date=datetime.date.today().isoformat())
    out = json.loads(r.stdout)
    assert out["stats"]["prompt_tokens"] == len(render_prompt(enc, conv))
    assert out["stats"]["generated_tokens"] == 2


@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["missing", "no-vocab", "empty-prompt"])
def test_clear_one_line_errors(tiny_model, tmp_path, case):
    model, stdin = str(tiny_model), None
    if case == "missing":
        model = str(tmp_path / "nowhere")
    elif case == "no-vocab":
        model = str(tmp_path / "novocab")
        shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.tiktoken"))
    prompt = "-" if case == "empty-prompt" else "hi"
    if case == "empty-prompt":
        stdin = "  \n"
    r = oss_mlx(["--model", model, "--prompt", prompt], tmp_path, stdin=stdin, offline=False)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oss-mlx: error: "), r.stderr
    assert "Traceback" not in r.stderr
    want = {"missing": "nowhere", "no-vocab": "o200k_base.tiktoken", "empty-prompt": "empty prompt"}
    assert want[case] in lines[0]


# ---- text output, on a scripted stream ----


@pytest.fixture
def scripted_cli(encoding, scripted_dir):
    enc = encoding
    model = ScriptedModel(encoding=enc)

    def run(reply, *extra):
        model.push(reply)
        p = argparse.ArgumentParser()
        generate.add_arguments(p)
        args = p.parse_args(["--model", str(scripted_dir), "--prompt", "hi", *extra])
        return generate.main(args, load_engine=lambda folder: Engine(model, enc))

    run.model = model
    return run


REPLY = ("<|channel|>analysis<|message|>Simple arithmetic.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4<|return|>")


def test_final_to_stdout_reasoning_hidden(scripted_cli, capsys):
    assert scripted_cli(REPLY) == 0
    out, err = capsys.readouterr()
    assert out == "2 + 2 = 4\n" and err == ""


def test_show_reasoning_goes_to_stderr(scripted_cli, capsys):
    scripted_cli(REPLY, "--show-reasoning")
    out, err = capsys.readouterr()
    assert out == "2 + 2 = 4\n" and "Simple arithmetic." in err and "<|" not in err


def test_json_output_and_notes(scripted_cli, capsys):
    scripted_cli(REPLY, "--json")
    out = json.loads(capsys.readouterr().out)
    assert (out["analysis"], out["final"], out["stop_reason"]) == ("Simple arithmetic.", "2 + 2 = 4", "stop")
    scripted_cli(REPLY, "--max-tokens", "3")
    assert "stopped at --max-tokens" in capsys.readouterr().err
    scripted_cli('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>')
    out, err = capsys.readouterr()
    assert out == "" and 'tool call functions.f {"a": 1}' in err


def test_no_harmony_message_is_said_on_stderr(scripted_cli, capsys):
    """Random weights write tokens that parse as no harmony message: say so (as chat does)."""
    # A message on a made-up channel, as random weights write: nothing to show as the answer.
    assert scripted_cli("<|channel|>noise noise noise") == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert ("the model wrote 5 tokens but no harmony message with an answer (random weights?): "
            "'<|channel|>noise noise noise") in err, err


def test_ctrl_c_stops_the_answer_and_prints_the_stats(scripted_cli, capsys):
    import signal

    scripted_cli.model.at(5, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C at token 5
    assert scripted_cli("<|channel|>final<|message|>" + "word " * 100 + "<|return|>") == 130
    out, err = capsys.readouterr()
    assert out.startswith("word") and out.count("word") < 100
    assert "oss-mlx: stopped by Ctrl-C" in err
    n = int(re.search(r"generated (\d+) tokens \([\d.]+ tok/s\)", err).group(1))
    assert 5 <= n < 100


@pytest.mark.parametrize("option, value", [("--max-tokens", "0"), ("--max-tokens", "-3"),
                                           ("--seed", "-3"), ("--seed", str(2**64)),
                                           ("--max-context", "0"), ("--top-p", "0"),
                                           ("--temperature", "-1")])
def test_options_are_checked_alike_by_every_command(option, value, capsys):
    """One definition per option: generate, chat and serve refuse the same bad value with the
    same line, before anything loads (a negative seed used to end in MLX's TypeError, and
    --max-context 0 meant the full context)."""
    from oss_mlx.cli import main as cli

    said = set()
    commands = [["generate", "--prompt", "hi"], ["chat"]]
    if option in ("--max-tokens", "--max-context"):  # serve has no sampling options of its own
        commands.append(["serve"])
    for command in commands:
        with pytest.raises(SystemExit) as e:
            cli([*command, "--demo", f"{option}={value}"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith(f"usage: oss-mlx {command[0]} ")  # the command's own usage
        said.add(err[-1].split(": error: ", 1)[1])
    assert len(said) == 1 and option in said.pop()

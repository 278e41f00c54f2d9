"""`oss-mlx chat`: the real REPL driven through a pseudo-terminal (pexpect) and through a pipe.

Two kinds of model:
- the tiny random-weight checkpoint (`tiny_model` fixture, and `--demo`): the whole stack for
  real; its text is noise, so those tests check the session mechanics (footer, cache reuse,
  effort, Ctrl-C, exit codes, no network);
- a ScriptedModel (tests/support/scripted.py) behind the real Engine and harmony parser, for exact
  content: the child runs `python tests/support/scripted.py chat ...`, i.e. oss_mlx.cli.main with an
  engine factory (scripted.engine_from_env) that replays the replies given in its environment
  and logs every prompt it is asked to complete, so a test can check what the model was given.
  Ctrl-C mid-answer is pressed at a known token: the model stops there and says so through a
  FIFO (SCRIPTED_PAUSE), no sleep.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

from support import REPO, SUPPORT, child_env as python_env, no_network  # noqa: E402

PROMPT = ">>> "

THINK1 = "The user asks for a sum. Two plus two."
ANSWER1 = "The answer is **4**."
REPLY1 = (f"<|channel|>analysis<|message|>{THINK1}<|end|>"
          f"<|start|>assistant<|channel|>final<|message|>{ANSWER1}<|return|>")
REPLY2 = ("<|channel|>analysis<|message|>Now three plus three.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>It is 6.<|return|>")
LONG_REPLY = "<|channel|>final<|message|>" + "word " * 3000 + "<|return|>"


# ---- helpers ---------------------------------------------------------------------------------


def child_env(tmp_path, script=None, **extra):
    """The child's environment; with `script`, the REPL's engine replays it (scripted.py)."""
    env = python_env()
    env["OSS_MLX_HOME"] = str(tmp_path / "home")  # readline history and store, per test
    env["TERM"] = "xterm"
    env["HF_HUB_OFFLINE"] = "1"
    for k in ("SCRIPTED_REPLIES", "SCRIPTED_LOG", "SCRIPTED_PAUSE", "SCRIPTED_CONTEXT"):
        env.pop(k, None)
    if script is not None:
        env["SCRIPTED_REPLIES"] = json.dumps(script)
        env["SCRIPTED_LOG"] = str(tmp_path / "prompts.jsonl")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pause_point(tmp_path, index):
    """(env entry, wait): the model stops before token `index` until a signal; `wait()` returns
    once it is there (see scripted.py's SCRIPTED_PAUSE)."""
    fifo = tmp_path / f"paused-{index}"
    os.mkfifo(fifo)

    def wait():
        with open(fifo) as f:
            assert f.readline() == "paused\n"

    return {"SCRIPTED_PAUSE": f"{index}:{fifo}"}, wait


CHAT = [sys.executable, str(SUPPORT / "scripted.py"), "chat"]  # oss_mlx.cli with engine_from_env


def logged_prompts(tmp_path) -> list[str]:
    path = tmp_path / "prompts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def spawn(args, env, timeout=30):
    child = pexpect.spawn(CHAT[0], [*CHAT[1:], *args], cwd=str(REPO),
                          env=env, encoding="utf-8", timeout=timeout, dimensions=(40, 120))
    return child


ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\r")


def plain(text: str) -> str:
    """Terminal output without escape sequences (rich styles each streamed piece)."""
    return ANSI.sub("", text or "")


def command(child, line, expect=None):
    """Send one line at the prompt; return what was printed (plain text) up to the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = plain(child.before)
    if expect is not None:
        assert re.search(expect, out), out
    return out


def stats_numbers(text):
    m = re.search(r"prompt tokens ([\d,]+), cached tokens ([\d,]+), generated tokens ([\d,]+)", text)
    assert m, text
    return tuple(int(g.replace(",", "")) for g in m.groups())


def finish(child, status=0):
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status, child.before
    assert "Traceback" not in (child.before or "")


# ---- through a pseudo-terminal ---------------------------------------------------------------


@pytest.mark.subprocess
def test_tty_scripted_session(scripted_dir, tmp_path):
    """Effort switch, two turns with cache reuse, harmony history, /save + /load, /quit."""
    child = spawn(["--model", str(scripted_dir), "--reasoning", "low"],
                  child_env(tmp_path, [REPLY1, REPLY2]))
    child.expect("reasoning low")
    child.expect_exact(PROMPT)

    command(child, "/effort high", "reasoning effort: high")
    out = command(child, "/prompt")
    assert "Reasoning: high" in out

    out = command(child, "What is 2 + 2?")
    assert "Thinking" in out and THINK1 in out
    assert "The answer is 4." in out  # rendered as markdown: the "**" became bold
    assert re.search(r"\d+ tokens · TTFT [\d.]+ s · [\d.]+ tok/s · context [\d,]+/4,096", out)
    prompt1, cached1, gen1 = stats_numbers(command(child, "/stats"))
    assert cached1 == 0 and gen1 > 0

    out = command(child, "And 3 + 3?")
    assert "It is 6." in out and re.search(r"context [\d,]+/4,096 \(\d+%\) · [\d,]+ cached", out)
    prompt2, cached2, _ = stats_numbers(command(child, "/stats"))
    # The follow-up only prefills what is new: the first prompt came from the cache (the engine
    # may feed its last token again, from a rotating-cache snapshot, hence the - 1).
    assert cached2 >= prompt1 - 1 and prompt2 - cached2 < prompt2 - prompt1 + 2

    # What the engine was given: effort high in the system message; the second prompt carries
    # the first answer but not its reasoning (harmony drops finished analysis).
    first, second = logged_prompts(tmp_path)
    assert "Reasoning: high" in first and "Reasoning: high" in second
    assert ANSWER1 in second and THINK1 not in second

    saved = tmp_path / "conv.json"
    command(child, f"/save {saved}", "saved 2 exchanges")
    data = json.loads(saved.read_text())
    assert data["settings"]["reasoning"] == "high"
    assert [(m["role"], m.get("channel")) for m in data["messages"]] == [
        ("user", None), ("assistant", "analysis"), ("assistant", "final"),
        ("user", None), ("assistant", "analysis"), ("assistant", "final")]
    assert data["messages"][1]["content"] == THINK1  # saved in full, analysis included

    command(child, "/reset", "new conversation")
    command(child, "/effort low")
    assert "What is 2 + 2?" not in command(child, "/prompt")
    command(child, f"/load {saved}", "loaded 2 exchanges")
    out = command(child, "/prompt")
    assert "Reasoning: high" in out and "And 3 + 3?" in out and "It is 6." in out
    assert THINK1 not in out

    command(child, f"/load {tmp_path / 'missing.json'}", "no such file")
    command(child, "/efort low", "did you mean /effort")
    child.sendline("/quit")
    finish(child)


@pytest.mark.subprocess
def test_tty_ctrl_c_stops_answer_and_keeps_session(scripted_dir, tmp_path):
    pause, paused = pause_point(tmp_path, 40)
    child = spawn(["--model", str(scripted_dir), "--max-tokens", "5000"],
                  child_env(tmp_path, [LONG_REPLY, REPLY2], **pause))
    child.expect_exact(PROMPT)
    child.sendline("Say many words.")
    paused()  # the model is at token 40 of 3000
    child.sendintr()  # Ctrl-C mid-generation
    child.expect_exact(PROMPT)
    out = plain(child.before)
    assert "[interrupted by the user]" in out
    assert 40 <= int(re.search(r"(\d+) tokens · TTFT", out).group(1)) < 45  # stopped there

    assert "It is 6." in command(child, "And 3 + 3?")  # the session goes on
    saved = tmp_path / "conv.json"
    command(child, f"/save {saved}", "saved 2 exchanges")
    first_answer = json.loads(saved.read_text())["messages"][1]
    assert first_answer["interrupted"] is True and first_answer["content"].startswith("word word")
    # The model saw the partial answer, marked as interrupted.
    second = logged_prompts(tmp_path)[1]
    assert "word word" in second and "[interrupted by the user]" in second

    child.sendeof()  # Ctrl-D at the prompt leaves cleanly
    finish(child)


@pytest.mark.subprocess
def test_tty_ctrl_c_at_prompt_clears_the_line_and_twice_leaves(scripted_dir, tmp_path):
    """Ctrl-C at the prompt drops the typed line and says how to leave; the session goes on
    (the conversation is kept); Ctrl-C twice in a row leaves, cleanly."""
    child = spawn(["--model", str(scripted_dir)], child_env(tmp_path, [REPLY1]))
    child.expect_exact(PROMPT)
    assert ANSWER1.replace("**", "") in command(child, "What is 2 + 2?")
    child.send("half a line")
    # Wait for the line editor's echo: CPython's readline notices a signal only while it waits
    # for input, and a Ctrl-C that lands while it still handles a burst of keys is seen only at
    # the next key (the terminal drops the rest of the burst). A person never types that fast.
    child.expect_exact("half a line")
    child.sendintr()
    child.expect_exact(PROMPT)
    assert "(Ctrl-C again, Ctrl-D or /quit leaves)" in plain(child.before)
    out = command(child, "/stats", "exchanges: 1")  # still here, with its conversation
    assert "half a line" not in out
    child.sendintr()
    child.expect_exact(PROMPT)
    child.sendintr()  # twice in a row
    finish(child)
    assert len(logged_prompts(tmp_path)) == 1  # the cleared line was never sent


@pytest.mark.subprocess
def test_tty_multiline_paste_and_history(scripted_dir, tmp_path):
    """A trailing backslash continues a message, a paste stays one message, up-arrow recalls."""
    child = spawn(["--model", str(scripted_dir)], child_env(tmp_path, [REPLY1, REPLY2, REPLY2]))
    child.expect_exact(PROMPT)
    child.sendline("first line \\")
    child.expect_exact("... ")
    assert "The answer is 4." in command(child, "second line")
    child.send("pasted one\npasted two\n")  # arrives in one burst, like a paste
    child.expect_exact(PROMPT)
    assert "It is 6." in plain(child.before)
    assert "It is 6." in command(child, "\x1b[A")  # up arrow + Enter: the paste again
    child.sendline("/quit")
    finish(child)
    first, second, third = logged_prompts(tmp_path)
    assert first.endswith("<|start|>user<|message|>first line \nsecond line<|end|><|start|>assistant")
    assert second.endswith("<|start|>user<|message|>pasted one\npasted two<|end|><|start|>assistant")
    assert third.endswith("<|start|>user<|message|>pasted one\npasted two<|end|><|start|>assistant")
    history = (tmp_path / "home" / "chat_history").read_text()
    assert "first line" in history and "pasted two" in history


@pytest.mark.subprocess
@pytest.mark.slow
def test_tty_tiny_model(tiny_model, tmp_path):
    """The real stack on random weights: Ctrl-C mid-answer, a follow-up reusing the cache,
    effort, Ctrl-D. (Greedy random weights never write a stop token, so each answer is cut.)"""
    pause, paused = pause_point(tmp_path, 30)
    child = spawn(["--model", str(tiny_model), "--temperature", "0", "--max-tokens", "100000"],
                  child_env(tmp_path, **pause), timeout=60)
    child.expect("reasoning medium")
    child.expect_exact(PROMPT)
    for question in ("Go on forever", "And again"):
        child.sendline(question)
        paused()  # the model is at this answer's 30th decode step
        child.sendintr()  # Ctrl-C mid-generation
        child.expect_exact(PROMPT)
        out = plain(child.before)
        assert "[interrupted by the user]" in out
        n = int(re.search(r"(\d+) tokens · TTFT [\d.]+ s · [\d.]+ tok/s · context [\d,]+/131,072",
                          out).group(1))
        assert 30 <= n < 35  # it stopped where Ctrl-C was pressed
        if question == "Go on forever":
            prompt1, cached1, _ = stats_numbers(command(child, "/stats", "exchanges: 1"))
            assert cached1 == 0
    prompt2, cached2, _ = stats_numbers(command(child, "/stats", "exchanges: 2"))
    assert cached2 >= prompt1 - 1  # the follow-up reused the first prompt's cache
    command(child, "/effort high", "reasoning effort: high")
    assert "Reasoning: high" in command(child, "/prompt")
    child.sendeof()
    finish(child)


# ---- through a pipe --------------------------------------------------------------------------


def run_pipe(args, stdin, env, timeout=60, netns=False):
    cmd = [*CHAT, *args]
    if netns:
        cmd = [*no_network(), *cmd]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=str(REPO),
                          env=env, timeout=timeout)


@pytest.mark.subprocess
def test_pipe_batch_scripted(scripted_dir, tmp_path):
    """Each line a turn (or a /command); the answers, and only they, on stdout."""
    saved = tmp_path / "conv.json"
    stdin = (f"What is 2 + 2?\n/effort high\n/bogus\nAnd 3 + 3?\n/undo\n"
             f"/system Answer in French.\nAnd 3 + \\\n3?\n/save {saved}\n")
    r = run_pipe(["--model", str(scripted_dir), "--reasoning", "low"], stdin,
                 child_env(tmp_path, [REPLY1, REPLY2, REPLY2]))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ANSWER1}\nIt is 6.\nIt is 6.\n"
    assert THINK1 in r.stderr and "unknown command /bogus" in r.stderr
    assert len(re.findall(r"\d+ tokens · TTFT", r.stderr)) == 3
    first, second, third = logged_prompts(tmp_path)
    assert "Reasoning: low" in first and "Reasoning: high" in second
    assert "# Instructions" not in second and "# Instructions\n\nAnswer in French." in third
    # /undo dropped the second exchange; the third question came in two lines.
    assert third.count("<|start|>user") == 2 and "And 3 + \n3?" in third
    assert len(json.loads(saved.read_text())["messages"]) == 6


@pytest.mark.subprocess
def test_pipe_context_full_is_a_message(scripted_dir, tmp_path):
    """A prompt beyond the context: one clear line, the session goes on, exit 1 at the end."""
    # 68 prompt tokens + 28 generated = 96 of 104: nearly full. Then a question too long for the
    # context, then one that fits but leaves no room for the whole answer.
    env = child_env(tmp_path, [REPLY1, REPLY1], SCRIPTED_CONTEXT=104)
    r = run_pipe(["--model", str(scripted_dir), "--hide-reasoning"], "hi\n" + "long " * 200 + "\nhi\n", env)
    assert "Traceback" not in r.stderr
    assert "context 96/104 (92%)" in r.stderr and "the context is nearly full (92%)" in r.stderr
    assert re.search(r"prompt is \d+ tokens and the model's context is 104", r.stderr)
    assert "the context is full (104 tokens): the answer was cut" in r.stderr
    assert r.returncode == 1
    assert ANSWER1 in r.stdout and THINK1 not in r.stderr  # hidden reasoning stays hidden


@pytest.mark.subprocess
def test_pipe_tool_call_is_shown(scripted_dir, tmp_path):
    call = ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city": "Paris"}<|call|>')
    r = run_pipe(["--model", str(scripted_dir)], "Weather in Paris?\nThanks\n",
                 child_env(tmp_path, [call, REPLY2]))
    assert r.returncode == 0, r.stderr
    assert 'tool call functions.get_weather({"city": "Paris"})' in r.stderr
    assert r.stdout == "It is 6.\n"
    # harmony wants a result after a call: the model is told there are no tools.
    assert ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
            'error: no tools are available in this chat<|end|>') in logged_prompts(tmp_path)[1]


@pytest.mark.subprocess
def test_what_the_model_wrote_is_stored(scripted_dir, tmp_path):
    """An answer with no harmony message (as random weights write) is stored as its raw text,
    so the history never has two user messages in a row; an answer interrupted in its reasoning
    keeps that reasoning in /save (the model is not shown it again)."""
    import signal

    pause, paused = pause_point(tmp_path, 12)
    thinking = "<|channel|>analysis<|message|>" + "think " * 100 + "<|end|>"
    saved = tmp_path / "conv.json"
    proc = subprocess.Popen(
        [*CHAT, "--model", str(scripted_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=str(REPO),
        env=child_env(tmp_path, ["<|end|>noise", thinking, REPLY2], **pause))
    proc.stdin.write(f"First?\nSecond?\n/save {saved}\nThird?\n")
    proc.stdin.close()
    proc.stdin = None  # all written: communicate() below only reads
    paused()  # in the second answer's reasoning, at token 12
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "no harmony message" in err and "[interrupted by the user]" in err
    messages = json.loads(saved.read_text())["messages"]
    assert [(m["role"], m.get("channel")) for m in messages] == [
        ("user", None), ("assistant", "final"), ("user", None), ("assistant", "analysis")]
    assert messages[1]["content"] == "<|end|>noise"  # what the model wrote, as text
    assert messages[3]["content"].startswith("think think") and messages[3]["interrupted"]
    third = logged_prompts(tmp_path)[2]
    assert ("<|start|>user<|message|>First?<|end|><|start|>assistant<|channel|>final<|message|>"
            "<|end|>noise<|end|><|start|>user<|message|>Second?<|end|>"
            "<|start|>assistant<|channel|>final<|message|>[interrupted by the user]<|end|>") in third


@pytest.mark.subprocess
@pytest.mark.slow
def test_demo_without_network(tmp_path):
    """`--demo` in a network namespace with no interface up: synth, convert, load, two turns
    (the second reusing the cache), all with no network."""
    if no_network() is None:
        pytest.skip("cannot create a network namespace here (needs root or user namespaces)")
    r = run_pipe(["--demo", "--max-tokens", "4", "--temperature", "0"], "Hello\nAgain\n/stats\n",
                 child_env(tmp_path), netns=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "Traceback" not in r.stderr
    assert len(re.findall(r"4 tokens · TTFT [\d.]+ s · [\d.]+ tok/s · context", r.stderr)) == 2
    assert stats_numbers(r.stderr)[1] > 0  # cached tokens


@pytest.mark.subprocess
def test_missing_default_model_says_how_to_get_it(tmp_path):
    r = run_pipe([], "hi\n", child_env(tmp_path))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "oss-mlx convert openai/gpt-oss-20b" in r.stderr
    if no_network() is None:
        return
    # At a terminal with no network: no download offer, the same one-line advice.
    prefix = no_network()
    child = pexpect.spawn(prefix[0], [*prefix[1:], sys.executable, "-m", "oss_mlx.cli", "chat"],
                          cwd=str(REPO), env=child_env(tmp_path), encoding="utf-8", timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    out = plain(child.before).strip()
    assert "\n" not in out and "oss-mlx convert openai/gpt-oss-20b" in out


# ---- the conversation file -------------------------------------------------------------------


def test_load_rejects_bad_files_with_one_line(tmp_path):
    from oss_mlx.cli.chat.session import Session, Settings
    from oss_mlx.errors import OssMlxError

    cases = {
        "truncated.json": '{"format": "oss-mlx-chat", "messages": [',
        "other.json": '{"hello": 1}',
        "role.json": json.dumps({"format": "oss-mlx-chat", "messages": [
            {"role": "system", "content": "x"}]}),
        "order.json": json.dumps({"format": "oss-mlx-chat", "messages": [
            {"role": "assistant", "content": "x"}]}),
        "effort.json": json.dumps({"format": "oss-mlx-chat", "settings": {"reasoning": "max"},
                                   "messages": []}),
    }
    s = Session(Settings(reasoning="low"))
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(OssMlxError) as e:
            s.load(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
        assert s.settings.reasoning == "low" and s.turns == []  # all or nothing


def test_save_load_round_trip_keeps_interruptions(tmp_path):
    from oss_mlx.cli.chat.session import Exchange as Turn, Session, Settings
    from oss_mlx.harmony import assistant_message

    s = Session(Settings(reasoning="high", system="Be brief."), date="2026-01-02")
    s.turns = [Turn("q1", [assistant_message("think", "analysis"), assistant_message("a1")]),
               Turn("q2", [assistant_message("partial")], interrupted=True),
               Turn("q3", [], interrupted=True)]
    s.save(tmp_path / "c.json", model="m")
    t = Session(Settings())
    t.load(tmp_path / "c.json")
    assert t.settings == s.settings and t.date == "2026-01-02"
    assert [(x.user, x.interrupted, len(x.messages)) for x in t.turns] == [
        ("q1", False, 2), ("q2", True, 1), ("q3", True, 0)]
    assert t.conversation().to_dict() == s.conversation().to_dict()


def test_default_model_offer_when_online(tmp_path, monkeypatch):
    """Interactive and online: offer to download and convert; yes runs `oss-mlx convert`."""
    import subprocess as sp

    from oss_mlx.cli import models as chat
    from oss_mlx.errors import OssMlxError

    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(chat, "network_reachable", lambda *a, **k: True)
    said = []
    monkeypatch.setattr("builtins.input", lambda prompt="": "n")
    with pytest.raises(OssMlxError, match="oss-mlx convert openai/gpt-oss-20b"):
        chat.default_model(True, said.append)
    assert "not in the local model store" in said[0]

    calls = []

    def fake_convert(cmd):  # what a successful `oss-mlx convert` leaves in the store
        calls.append(cmd[-2:])
        entry = tmp_path / "home" / "models" / "gpt-oss-20b"
        entry.mkdir(parents=True)
        (entry / "config.json").write_text(json.dumps({"format": "oss-mlx", "model": {}}))
        return 0

    monkeypatch.setattr("builtins.input", lambda prompt="": "y")
    monkeypatch.setattr(sp, "call", fake_convert)
    assert chat.default_model(True, said.append) == tmp_path / "home" / "models" / "gpt-oss-20b"
    assert calls == [["convert", "openai/gpt-oss-20b"]]

"""The commands behave alike (issue 20): a path is a path, a bad OSS_MLX_HOME or OUT is one
line, Ctrl-C and unknown flags are reported like the rest, broken store entries are shown with
the reason, `rm` frees what it says, output into a pipe is never folded, every default is in
`--help`.

Every test here goes through the command line (`oss_mlx.cli.main`, or the `oss-mlx` program
in a child process), as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oss_mlx.cli import main
from oss_mlx.errors import OssMlxError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_model(folder: Path, source: Path | None = None) -> Path:
    """A folder the store takes for a converted model (its config.json, one weight file)."""
    folder.mkdir(parents=True)
    cfg = {"model_type": "gpt_oss", "format": "oss-mlx", "format_version": 1,
           "model": {"num_hidden_layers": 2, "num_experts": 32, "experts_per_token": 4},
           "quantization": {"experts": {"mode": "mxfp4", "group_size": 32, "bits": 4},
                            "dense": None},
           "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 5000)
    if source is not None:
        (folder / "manifest.json").write_text(json.dumps({"source_folder": str(source)}))
    return folder


def upstream_folder(folder: Path) -> Path:
    """A folder `oss-mlx convert` would read (a Hugging Face gpt-oss config.json)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("oss-mlx: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def run_cli(args, env=None, **kw) -> subprocess.CompletedProcess:
    """The `oss-mlx` program, as installed, in a child process."""
    return subprocess.run([sys.executable, "-m", "oss_mlx.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, **kw)


# ---- item 6: a path that exists is a path ---------------------------------------------------


def test_an_unconverted_folder_given_as_a_relative_path_is_that_folder(home, tmp_path,
                                                                       monkeypatch):
    """`--model ck/tiny` is the folder ck/tiny (not converted yet), never the store's `tiny`
    taken for a Hub id's name; `../ck/tiny` likewise, and each error names a command that
    works."""
    from oss_mlx.store import resolve_model

    monkeypatch.chdir(tmp_path)
    upstream_folder(tmp_path / "ck" / "tiny")
    fake_model(home / "models" / "tiny", source=tmp_path / "elsewhere" / "tiny")
    (tmp_path / "sub").mkdir()
    assert resolve_model("tiny") == home / "models" / "tiny"  # a bare name is a store name
    for arg, cwd in (("ck/tiny", tmp_path), ("../ck/tiny", tmp_path / "sub"),
                     ("./ck/tiny", tmp_path)):
        monkeypatch.chdir(cwd)
        with pytest.raises(OssMlxError) as e:
            resolve_model(arg)
        assert str(e.value) == (
            f"{arg} is an upstream gpt-oss checkpoint, not a converted model: run `oss-mlx "
            f"convert {arg} -o FOLDER` first (the store's 'tiny' is another model, converted "
            f"from {tmp_path / 'elsewhere' / 'tiny'})")
    monkeypatch.chdir(tmp_path)
    # The store's `tiny` made from this very folder: then that is the advice.
    (home / "models" / "tiny" / "manifest.json").write_text(
        json.dumps({"source_folder": str(tmp_path / "ck" / "tiny")}))
    with pytest.raises(OssMlxError, match=r"^ck/tiny is an upstream gpt-oss checkpoint, not a "
                                          r"converted model; it is converted in the store "
                                          r"already: use --model tiny$"):
        resolve_model("ck/tiny")
    # No `tiny` in the store: convert it, under its own name.
    import shutil

    shutil.rmtree(home / "models" / "tiny")
    with pytest.raises(OssMlxError, match=r"^ck/tiny is an upstream gpt-oss checkpoint, not a "
                                          r"converted model: run `oss-mlx convert ck/tiny` "
                                          r"first \(then --model tiny\)$"):
        resolve_model("ck/tiny")
    # An owner/name that is no folder here is still a Hub id, looked up in the store by name.
    fake_model(home / "models" / "gpt-oss-20b")
    assert resolve_model("openai/gpt-oss-20b") == home / "models" / "gpt-oss-20b"


def test_generate_names_the_unconverted_folder_before_loading(home, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.chdir(tmp_path)
    upstream_folder(tmp_path / "ck" / "tiny")
    fake_model(home / "models" / "tiny")  # would fail to load: it has no real weights
    assert main(["generate", "--model", "ck/tiny", "--prompt", "hi"]) == 1
    err = one_line_error(capsys)
    assert "ck/tiny is an upstream gpt-oss checkpoint, not a converted model: run " \
           "`oss-mlx convert ck/tiny -o FOLDER` first" in err


def test_convert_into_a_store_name_taken_by_another_model(home, tiny_hf, tmp_path, capsys):
    """`oss-mlx convert SRC` whose store name holds a model made from another source says so,
    instead of advising to use that other model."""
    fake_model(home / "models" / tiny_hf.name, source=tmp_path / "other")
    assert main(["convert", str(tiny_hf)]) == 1
    err = one_line_error(capsys)
    assert f"already exists and holds another model (converted from {tmp_path / 'other'}): " \
           "pass -o FOLDER, or --force to replace it" in err


# ---- item 10: bad places, Ctrl-C while importing, unknown flags -----------------------------


@pytest.mark.parametrize("argv", [["list"], ["doctor"], ["rm", "tiny"],
                                  ["convert", "TINY_HF"]])
def test_oss_mlx_home_that_is_a_file_is_one_line(argv, tiny_hf, tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "home-file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("OSS_MLX_HOME", str(not_a_folder))
    argv = [str(tiny_hf) if a == "TINY_HF" else a for a in argv]
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert f"OSS_MLX_HOME ({not_a_folder}) is a file, not a folder" in err, err
    assert not_a_folder.read_text() == "x"


def test_a_store_folder_that_is_a_file_is_one_line(home, capsys):
    home.mkdir()
    (home / "models").write_text("x")
    assert main(["list"]) == 1
    assert f"{home / 'models'} is a file, not a folder" in one_line_error(capsys)


def test_synth_force_replaces_a_checkpoint_never_a_file_or_another_folder(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert main(["synth", str(f), "--force"]) == 1
    assert "is a file; --force replaces a checkpoint folder, not a file" in one_line_error(capsys)
    assert f.read_text() == "keep me"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_text("keep me")
    assert main(["synth", str(other), "--force"]) == 1
    assert "exists and is not a gpt-oss checkpoint; not replacing it" in one_line_error(capsys)
    assert (other / "a.jpg").read_text() == "keep me"
    # A checkpoint (one synth wrote) and an empty folder are replaced.
    ck = tmp_path / "ck"
    assert main(["synth", str(ck), "--layers", "1"]) == 0
    assert main(["synth", str(ck), "--layers", "1", "--seed", "1", "--force"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["synth", str(empty), "--layers", "1", "--force"]) == 0
    assert (empty / "config.json").is_file()


INTERRUPT_AT_IMPORT = """
import sys
class Interrupt:
    # Ctrl-C arriving while the CLI imports numpy (the slow import a user interrupts)
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from oss_mlx.cli import main   # what the `oss-mlx` script does
sys.exit(main())
"""


@pytest.mark.subprocess
def test_ctrl_c_while_importing_is_one_line(tmp_path):
    for argv in (["convert", "x"], ["bench", "--help"]):
        r = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, *argv],
                           capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stderr) == (130, "oss-mlx: interrupted\n"), r.stderr


@pytest.mark.parametrize("argv", [["list"], ["chat"], ["generate", "--prompt", "hi"],
                                  ["serve"], ["bench"], ["doctor"], ["convert", "SRC"],
                                  ["synth", "OUT"], ["rm", "NAME"], ["eval", "tools"]])
def test_an_unknown_flag_shows_the_commands_own_usage(argv, capsys):
    command = argv[0]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: oss-mlx {command} "), err
    assert err.rstrip().endswith(f"oss-mlx {command}: error: unrecognized arguments: "
                                 "--no-such-flag"), err


# ---- item 5: a broken store entry is listed as broken, with the reason ------------------------


TRUNCATED = '{"model_type": "gpt_oss", "format": "oss-mlx", "format_version": 1, "mod'


@pytest.fixture
def broken_store(home):
    fake_model(home / "models" / "gpt-oss-20b")
    broken = fake_model(home / "models" / "broken-20b")
    (broken / "config.json").write_text(TRUNCATED)  # cut off mid-write
    return broken


def test_list_shows_a_broken_model_and_why(broken_store, capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "broken-20b" in line and "BROKEN" in line)
    assert "gpt-oss-20b" not in row
    assert any(line.startswith(f"broken-20b: {broken_store / 'config.json'} is not valid JSON")
               and line.endswith("(oss-mlx rm broken-20b removes it)") for line in lines), lines
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gpt-oss-20b"]["broken"] is None
    assert rows["broken-20b"]["broken"].startswith(f"{broken_store / 'config.json'} is not valid "
                                                   "JSON")


def test_doctor_reports_a_broken_model_and_fails(broken_store, capsys):
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(out) if line.startswith("broken-20b ") and "BROKEN" in line)
    assert out[i + 1].strip().startswith(f"{broken_store / 'config.json'} is not valid JSON")
    assert "oss-mlx rm broken-20b" in out[i + 2]
    assert main(["doctor", "--json"]) == 1
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert not models["broken-20b"]["ok"]
    assert models["broken-20b"]["problems"][0].startswith(f"{broken_store / 'config.json'} is "
                                                          "not valid JSON")


@pytest.mark.parametrize("how", ["name", "path"])
def test_a_broken_model_named_or_given_by_path_says_why(broken_store, how, capsys):
    arg = "broken-20b" if how == "name" else str(broken_store)
    assert main(["generate", "--model", arg, "--prompt", "hi"]) == 1
    err = one_line_error(capsys)
    assert f"model {arg!r} is broken: {broken_store / 'config.json'} is not valid JSON" in err
    assert err.endswith("; re-convert it (oss-mlx convert SRC --force) or remove it "
                        "(oss-mlx rm broken-20b)\n"), err


# ---- item 11: oss-mlx rm -------------------------------------------------------------------


def test_rm_removes_store_models_and_says_what_it_freed(broken_store, home, capsys):
    from oss_mlx.store import folder_size, human_size

    keep = home / "models" / "gpt-oss-20b"
    sizes = {n: folder_size(home / "models" / n) for n in ("gpt-oss-20b", "broken-20b")}
    assert main(["rm", "broken-20b"]) == 0  # a broken one too
    assert capsys.readouterr().out == f"removed broken-20b ({human_size(sizes['broken-20b'])} freed)\n"
    assert not broken_store.exists() and keep.is_dir()
    fake_model(home / "models" / "tiny")
    assert main(["rm", "gpt-oss-20b", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"removed gpt-oss-20b ({human_size(sizes['gpt-oss-20b'])} freed)"
    assert out[1].startswith("removed tiny (") and sorted((home / "models").iterdir()) == []


def test_rm_refuses_what_is_not_a_store_model(home, tmp_path, capsys):
    fake_model(home / "models" / "gpt-oss-20b")
    (home / "models" / "notes").mkdir()
    (home / "models" / "notes" / "a.txt").write_text("keep")
    outside = fake_model(tmp_path / "mine")
    cases = {"gpt-oss-2b": "did you mean gpt-oss-20b?",
             "notes": "is not a model folder; not removing it",
             str(outside): "is not in the local store",
             "../models/gpt-oss-20b": "is not in the local store"}
    for name, why in cases.items():
        assert main(["rm", name]) == 1
        assert why in one_line_error(capsys), name
    assert (home / "models" / "notes" / "a.txt").read_text() == "keep"
    assert outside.is_dir() and (home / "models" / "gpt-oss-20b").is_dir()


# ---- item 8: bench --compare mlx-lm needs the Hugging Face layout, said before loading -------


def test_compare_with_mlx_lm_refuses_an_original_layout_source_before_loading(
        tiny_model_original, capsys):
    assert main(["bench", "--model", str(tiny_model_original), "--compare", "mlx-lm",
                 "--prompt-tokens", "8", "--gen-tokens", "2", "--repeat", "1"]) == 1
    err = one_line_error(capsys)  # nothing logged: no model was loaded
    assert "--compare mlx-lm reads the Hugging Face layout" in err and "--source DIR" in err


# ---- item 1: every documented command runs on a user install (no dev extra) ---------------


WITHOUT = """
import sys
hidden = set(sys.argv[1].split(","))
class Hide:  # as on a plain `pip install .`: the dev extra's packages are not there
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from oss_mlx.cli import main
sys.exit(main(sys.argv[2:]))
"""
DEV_ONLY = "httpx,openai,pytest,pexpect,jsonschema,matplotlib"


@pytest.mark.subprocess
def test_bench_serve_needs_no_extra(tiny_model, tmp_path):
    """`bench --serve` on a user install: its clients are the standard library's http.client;
    its table, piped, is whole lines."""
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "-c", WITHOUT, DEV_ONLY, "bench", "--model",
                        str(tiny_model), "--serve", "1,2", "--gen-tokens", "4", "--prompt-tokens",
                        "16", "--serve-requests", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(row["concurrency"], row["requests"]) for row in rows] == [(1, 2), (2, 4)]
    assert all(row["completion_tokens"] == 4 * row["requests"] for row in rows)
    table = [line for line in r.stdout.splitlines() if line.startswith("│")]
    assert len(table) == 2 and len({line.count("│") for line in table}) == 1, r.stdout


# ---- item 9: piped output is plain, whole lines -----------------------------------------------


@pytest.mark.subprocess
def test_piped_list_is_whole_lines(tmp_path):
    home = tmp_path / ("a-store-whose-path-is-longer-than-eighty-columns-" * 2)
    fake_model(home / "models" / "gpt-oss-20b-with-a-long-name-q8")
    r = run_cli(["list"], env={"OSS_MLX_HOME": str(home), "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"Models in {home / 'models'}"
    row = next(line for line in lines if "gpt-oss-20b-with-a-long-name-q8" in line)
    assert "bfloat16" in row and "32/top-4" in row and "\x1b" not in r.stdout


def test_piped_bench_is_whole_lines_and_says_the_quantization_in_words(tiny_model, capsys):
    assert main(["bench", "--model", str(tiny_model), "--prompt-tokens", "8",
                 "--gen-tokens", "2", "--repeat", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"model: {tiny_model} (4 layers, 8 experts), experts mxfp4, dense bf16" in lines
    row = next(line for line in lines if line.startswith("│ oss-mlx bfloat16"))
    assert row.count("│") == 9 and len(row) > 80  # every column on the one line
    assert any(line.startswith("dtype: oss-mlx") and line.endswith("ours with float32 dense "
                                                                   "weights.") for line in lines)
    assert not any("{" in line for line in lines)  # no Python dict


def test_piped_doctor_is_whole_lines(tmp_path, monkeypatch, capsys):
    home = tmp_path / ("a-store-whose-path-is-longer-than-eighty-columns-" * 4)
    monkeypatch.setenv("OSS_MLX_HOME", str(home))
    fake_model(home / "models" / "gpt-oss-20b")
    main(["doctor"])
    lines = capsys.readouterr().out.splitlines()
    machine = next(line for line in lines if line.startswith("machine "))
    assert " · MLX " in machine and len(machine) > 80
    assert f"store {home / 'models'} · free disk " in "\n".join(lines)
    rows = [line for line in lines if line.startswith("│ gpt-oss-")]
    assert len(rows) == 8 and all(line.count("│") == 7 for line in rows)


# ---- item 12: --help says every default, with the same placeholders everywhere ---------------


def _option_blocks(text: str) -> dict[str, str]:
    """{first option string: its help text} from a command's --help."""
    import re

    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_says_every_default_and_placeholders_agree():
    import argparse

    from oss_mlx.cli import COMMANDS, build_parser

    _, commands = build_parser()
    assert set(commands) == set(COMMANDS)
    placeholders: dict[str, dict[str, list[str]]] = {}
    for name, parser in commands.items():
        blocks = _option_blocks(parser.format_help())
        usage = parser.format_usage()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.nargs != 0 and action.default is not None:
                text = blocks[action.option_strings[0]]
                assert "default" in text, (name, action.option_strings, text)
            if action.nargs != 0:
                flag = action.option_strings[-1]
                import re

                shown = re.search(re.escape(flag) + r" ([^\]|]+?)(?:\]| \||$)", usage)
                placeholders.setdefault(flag, {}).setdefault(
                    shown.group(1).strip() if shown else "?", []).append(name)
    differing = {flag: seen for flag, seen in placeholders.items() if len(seen) > 1}
    assert not differing, differing
    for name in ("bench", "synth"):  # what `narrow` is, where it can be chosen
        text = " ".join(commands[name].format_help().split())
        assert "narrow (the 20b's" in text, name


@pytest.mark.subprocess
def test_top_level_help_has_examples_and_points_at_the_demo():
    r = run_cli(["--help"])
    assert r.returncode == 0
    assert "examples:" in r.stdout and "oss-mlx chat --demo" in r.stdout
    assert "oss-mlx convert openai/gpt-oss-20b" in r.stdout
    r = run_cli([])
    assert r.returncode == 2 and "oss-mlx chat --demo" in r.stdout


# ---- item 3: generate takes --model like chat and serve, and --system means the same ----------


def test_generate_defaults_to_gpt_oss_20b_like_chat_and_serve(home, capsys):
    for argv in (["generate", "--prompt", "hi"], ["chat"], ["serve", "--port", "0"]):
        assert main(argv) == 1
        err = one_line_error(capsys)
        assert "gpt-oss-20b is not in the local model store; get it with `oss-mlx convert " \
               "openai/gpt-oss-20b`" in err and "try the demo: --demo" in err, (argv, err)


def test_generate_system_is_the_developer_instructions(encoding, scripted_dir, capsys):
    """`--system` is the harmony developer message (`# Instructions`) in generate, as in chat;
    the system message stays the model's own."""
    from oss_mlx.engine import Engine
    from support.scripted import ScriptedModel

    seen = []

    class Recording(Engine):
        def stream(self, conversation, params=None, cancel=None, key=None, progress=None):
            seen.append(self.encoding.decode(self.render(conversation)))
            return super().stream(conversation, params, cancel)

    model = ScriptedModel("<|channel|>final<|message|>ok<|return|>", encoding=encoding)
    assert main(["generate", "--model", str(scripted_dir), "--prompt", "hi", "--system",
                 "Answer in French."], load_engine=lambda f: Recording(model, encoding)) == 0
    assert capsys.readouterr().out == "ok\n"
    system, developer = seen[0].split("<|start|>developer<|message|>")
    assert "Answer in French." not in system
    assert developer.startswith("# Instructions\n\nAnswer in French.<|end|>")


def test_eval_plot_says_it_needs_the_bench_extra_before_running(home, monkeypatch, capsys):
    """item 1: a documented option that needs an extra says so before anything loads."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["eval", "tools", "--demo", "--categories", "simple", "--limit", "1",
                 "--plot", "acc.png"]) == 1
    assert one_line_error(capsys) == ("oss-mlx: error: drawing needs matplotlib: pip install "
                                      "'oss-mlx[bench]'\n")
    assert not (home / "eval").exists()  # no results file: nothing ran

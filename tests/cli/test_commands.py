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

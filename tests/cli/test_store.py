"""The local model store: where models go, how names resolve, and `oss-mlx list`."""

import json
from pathlib import Path

import pytest

from oss_mlx.errors import OssMlxError
from oss_mlx import store


def fake_model(folder: Path, layers=2, dense=None) -> Path:
    folder.mkdir(parents=True)
    cfg = {"model_type": "gpt_oss", "format": "oss-mlx", "format_version": 1,
           "model": {"num_hidden_layers": layers, "num_experts": 32, "experts_per_token": 4},
           "quantization": {"experts": {"mode": "mxfp4", "group_size": 32, "bits": 4},
                            "dense": dense},
           "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 5000)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_root_follows_env(home, monkeypatch):
    assert store.store_root() == home / "models"
    monkeypatch.delenv("OSS_MLX_HOME")
    assert store.store_root() == Path.home() / ".cache" / "oss-mlx" / "models"


def test_store_path_for(home, tmp_path):
    assert store.store_path_for("openai/gpt-oss-20b") == home / "models" / "gpt-oss-20b"
    assert store.store_path_for("openai/gpt-oss-120b", dense_bits=8) == home / "models" / "gpt-oss-120b-q8"
    (tmp_path / "gpt-oss-20b" / "original").mkdir(parents=True)
    assert store.store_path_for(tmp_path / "gpt-oss-20b") == home / "models" / "gpt-oss-20b"
    assert store.store_path_for(tmp_path / "gpt-oss-20b" / "original") == home / "models" / "gpt-oss-20b"


def test_resolve(home, tmp_path):
    m = fake_model(home / "models" / "gpt-oss-20b")
    assert store.resolve_model("gpt-oss-20b") == m
    assert store.resolve_model("openai/gpt-oss-20b") == m  # a Hub id maps to its store name
    elsewhere = fake_model(tmp_path / "mine")
    assert store.resolve_model(str(elsewhere)) == elsewhere
    with pytest.raises(OssMlxError, match="oss-mlx convert openai/gpt-oss-120b"):
        store.resolve_model("gpt-oss-120b")
    with pytest.raises(OssMlxError, match="no such model folder"):
        store.resolve_model(str(tmp_path / "absent" / "x"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(OssMlxError, match="not an oss-mlx model folder"):
        store.resolve_model(str(tmp_path / "plain"))


def test_list(home, capsys):
    from oss_mlx.cli import main

    assert main(["list"]) == 0
    assert "No models" in capsys.readouterr().out
    fake_model(home / "models" / "gpt-oss-20b", layers=24)
    fake_model(home / "models" / "gpt-oss-20b-q8", layers=24,
               dense={"mode": "affine", "group_size": 64, "bits": 8, "modules": []})
    (home / "models" / "junk").mkdir()  # not a model: not listed
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "gpt-oss-20b" in out and "gpt-oss-20b-q8" in out and "affine 8-bit" in out
    assert "junk" not in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["gpt-oss-20b", "gpt-oss-20b-q8"]
    assert rows[0]["size"] == 5000 + len((home / "models" / "gpt-oss-20b" / "config.json").read_bytes())
    assert rows[1]["dense"] == "affine 8-bit" and rows[0]["layers"] == 24


def upstream_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    return folder


def test_store_name_wins_over_a_same_named_upstream_folder(home, tmp_path, monkeypatch):
    """After `oss-mlx convert ./tiny` (stored as `tiny`), `--model tiny` from the folder that
    holds ./tiny is the store entry, and the advice for `./tiny` names a command that works."""
    monkeypatch.chdir(tmp_path)
    upstream_folder(tmp_path / "tiny")
    with pytest.raises(OssMlxError, match=r"run `oss-mlx convert \./tiny` first \(then --model tiny\)"):
        store.resolve_model("./tiny")
    with pytest.raises(OssMlxError, match=r"upstream gpt-oss checkpoint.*oss-mlx convert tiny`"):
        store.resolve_model("tiny")
    entry = fake_model(home / "models" / "tiny")
    (entry / "manifest.json").write_text(json.dumps({"source_folder": str(tmp_path / "tiny")}))
    assert store.resolve_model("tiny") == entry
    with pytest.raises(OssMlxError, match="converted in the store already: use --model tiny$"):
        store.resolve_model("./tiny")
    converted_here = fake_model(tmp_path / "mine")
    assert store.resolve_model("mine").resolve() == converted_here  # a converted folder wins


def test_unknown_names_list_the_candidates(home):
    fake_model(home / "models" / "gpt-oss-20b")
    fake_model(home / "models" / "tiny")
    with pytest.raises(OssMlxError, match=r"did you mean gpt-oss-20b\?.*convert openai/gpt-oss-2b"):
        store.resolve_model("gpt-oss-2b")
    with pytest.raises(OssMlxError, match=r"it has gpt-oss-20b, tiny; convert a checkpoint with"):
        store.resolve_model("mystery")


def test_a_file_is_named_a_file(home, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(OssMlxError, match="is a file, not a model folder"):
        store.resolve_model(str(f))


def test_caches_follow_oss_mlx_home(home):
    """docs/convert.md: OSS_MLX_HOME moves oss-mlx's caches: bench --synth checkpoints and chat history
    too (bench used ~/.cache/oss-mlx/bench whatever it said)."""
    from oss_mlx.bench.checkpoints import cache_root
    from oss_mlx.cli.chat import input as chat

    assert cache_root(None) == home / "bench"
    assert chat.history_file() == home / "chat_history"

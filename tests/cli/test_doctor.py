"""`oss-mlx doctor`: a healthy store, a corrupted model file (found by its manifest checksum),
a truncated one, no store at all, and no network (sockets refused)."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from oss_mlx import cli
from oss_mlx.cli import doctor


@pytest.fixture()
def store(tmp_path, monkeypatch, tiny_model):
    """An OSS_MLX_HOME whose store holds a copy of the tiny model."""
    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path))
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    return tmp_path / "models"


@pytest.fixture()
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError("doctor tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _doctor_json(capsys, *extra):
    rc = cli.main(["doctor", "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_healthy_store(store, offline, capsys, monkeypatch):
    monkeypatch.setenv("OSS_MLX_MEMORY_LIMIT", "8GB")
    rc, r = _doctor_json(capsys)
    assert rc == 0 and r["ok"]
    assert (r["store"]["path"], r["store"]["exists"]) == (str(store), True)
    assert abs(r["store"]["free_disk_bytes"] - shutil.disk_usage(store).free) < 1 << 30
    (m,) = r["models"]
    assert (m["name"], m["ok"], m["problems"], m["check"]) == ("tiny", True, [], "quick")
    assert m["layers"] == 4 and m["dense"] == "bfloat16"
    assert set(m["fits"]) == {"8k", "8k kv8", "32k", "32k kv8", "128k", "128k kv8"}
    # the figures are the memory plan's, against this machine's limit
    from oss_mlx.engine import memory

    plan = memory.plan_for_folder(store / "tiny", 32768)
    assert m["fits"]["32k"]["total_bytes"] == plan.total and m["fits"]["32k"]["fits"]
    assert (r["machine"]["limit_bytes"], r["machine"]["limit_source"]) == (
        8_000_000_000, "OSS_MLX_MEMORY_LIMIT")
    # 20b bf16 at 8k fits in 8 GB on no machine; the 20b at 8k with 8-bit dense neither
    ref = {(x["model"], x["dense"], x["kv"]): x["fits"] for x in r["reference"]}
    assert not ref[("gpt-oss-20b", "bf16", "bf16")]["8k"]["fits"]
    assert r["machine"]["backend"] == "cpu" and r["machine"]["mlx"]
    models = {(x["model"], x["dense"], x["kv"]) for x in r["reference"]}
    assert ("gpt-oss-120b", "8-bit", "8-bit") in models and len(models) == 8
    assert r["vocabulary"]["ok"]


def test_corrupted_file_is_found_by_its_checksum(store, offline, capsys):
    shard = next((store / "tiny").glob("model*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one byte of a weight: same size, header still valid
    shard.write_bytes(bytes(data))
    rc, r = _doctor_json(capsys)
    assert rc == 1 and not r["ok"]
    (m,) = r["models"]
    assert m["problems"] == [f"{shard.name}: sha256 mismatch (corrupted or modified)"]
    # and the text report says so too
    assert cli.main(["doctor"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().out


def test_truncated_file_and_missing_file(store, offline, capsys):
    shard = next((store / "tiny").glob("model*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    (store / "tiny" / "o200k_base.tiktoken").unlink()
    rc, r = _doctor_json(capsys)
    (m,) = r["models"]
    assert rc == 1
    assert any(p.startswith(f"{shard.name}: ") and "the manifest says" in p for p in m["problems"])
    assert "o200k_base.tiktoken: missing" in m["problems"]


def test_full_check_hashes_big_files(store, offline, capsys, monkeypatch):
    """Above QUICK_HASH_BYTES the quick check only compares sizes and headers; --full hashes."""
    monkeypatch.setattr(doctor, "QUICK_HASH_BYTES", 1000)
    shard = next((store / "tiny").glob("model*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, r = _doctor_json(capsys)
    assert rc == 0 and r["models"][0]["check"] == "quick"
    rc, r = _doctor_json(capsys, "--full")
    assert rc == 1 and r["models"][0]["check"] == "full"


def test_no_store(tmp_path, monkeypatch, offline, capsys):
    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path / "nowhere"))
    rc, r = _doctor_json(capsys)
    assert rc == 0 and r["models"] == [] and r["store"]["exists"] is False
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "does not exist yet" in out and "oss-mlx convert openai/gpt-oss-20b" in out


def test_refuses_what_the_limit_cannot_hold(store, offline, capsys, monkeypatch):
    monkeypatch.setenv("OSS_MLX_MEMORY_LIMIT", "100MB")
    rc, r = _doctor_json(capsys)
    fits = r["models"][0]["fits"]
    assert rc == 0 and fits["8k"]["fits"] is False  # fits but not a breakage
    assert all(not f["fits"] for row in r["reference"] for f in row["fits"].values())

"""The memory plan (oss_mlx.memory): its figures against MLX's measured peak memory
(mx.get_peak_memory over load + chunked prefill + decode) on the tiny and a 20b-shaped model,
the two independent weight counts (safetensors headers vs the layout table) against each other,
the machine limit, and the refusal with its one-line advice."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from oss_mlx.bench.memory import measure
from oss_mlx.config import PRESETS, read_model_folder
from oss_mlx.defaults import parse_size
from oss_mlx.engine import machine, memory
from oss_mlx.engine.loading import LoadOptions, load_engine
from oss_mlx.errors import OssMlxError


@pytest.fixture(scope="module")
def shaped_20b(tmp_path_factory):
    """gpt-oss-20b's widths (hidden 2880, 64 q / 8 kv heads, intermediate 2880, window 128,
    top-4) cut to 2 layers, 4 experts and a 4096-row vocabulary: ~260 MB, built here."""
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    cfg = replace(PRESETS["20b"], num_hidden_layers=2, num_experts=4, vocab_size=4096)
    src = synth(tmp_path_factory.mktemp("src") / "s20", config=cfg, seed=1)
    return convert(src, tmp_path_factory.mktemp("mlx") / "m20")


def _assert_within(measured, planned, tol, what):
    assert abs(measured - planned) <= tol * measured, (
        f"{what}: measured {measured:,} planned {planned:,} ({planned / measured - 1:+.1%})")


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_plan_matches_measured_peak_tiny(tiny_model, kv_bits):
    context, chunk = 200, 64  # 25x the tiny window, 4 chunks
    m = measure(tiny_model, context, kv_bits, chunk)
    p = memory.plan_for_folder(tiny_model, context, kv_bits, chunk=chunk)
    assert m["weights"] == p.weights  # exact: header sizes at the loaded dtypes
    _assert_within(m["peak"], p.total, 0.10, "tiny peak")


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_plan_matches_measured_peak_20b_shaped(shaped_20b, kv_bits):
    context, chunk = 160, 64  # past the 128-token window, 3 chunks
    m = measure(shaped_20b, context, kv_bits, chunk)
    p = memory.plan_for_folder(shaped_20b, context, kv_bits, chunk=chunk)
    assert m["weights"] == p.weights
    _assert_within(m["peak"], p.total, 0.10, "20b-shaped peak")
    # the part beyond the weights is what the formula predicts, not noise under them
    _assert_within(m["peak"] - m["weights"], p.kv + p.working, 0.35, "20b-shaped KV + buffers")


def test_weights_from_headers_equal_the_layout_table(tiny_hf, tiny_model, tmp_path):
    """Two independent counts: the converted files' headers, and the layout table plus the
    converter's quantization rule, for bf16, 8-bit and 4-bit dense weights."""
    from oss_mlx.convert.convert import convert

    cfg = read_model_folder(tiny_model).config
    for bits in (16, 8, 4):
        folder = tiny_model if bits == 16 else convert(tiny_hf, tmp_path / f"q{bits}", dense_bits=bits)
        ours = sorted(memory.folder_tensors(folder))
        table = sorted(memory.config_tensors(cfg, bits))
        assert ours == table
    assert memory._tensor_bytes(memory.config_tensors(cfg, 4), "bfloat16") < \
        memory._tensor_bytes(memory.config_tensors(cfg, 8), "bfloat16")


def test_published_sizes():
    """The published 20b is ~13.8 GB, 12.1 GB with 8-bit dense; 120b ~65 GB (issue figures)."""
    from oss_mlx.config import PRESETS

    w = lambda name, bits: memory._tensor_bytes(memory.config_tensors(PRESETS[name], bits), "bfloat16", "gpu")  # noqa: E731
    assert 13.5e9 < w("20b", 16) < 14.0e9 and 11.8e9 < w("20b", 8) < 12.4e9
    assert 61e9 < w("120b", 16) < 66e9
    # KV of the 20b at 128k: 12 full layers x 131072 x 8 heads x 64 x (K, V) x 2 bytes
    kv = memory.kv_bytes(PRESETS["20b"], 131072)
    assert kv - 12 * 131072 * 8 * 64 * 2 * 2 == 12 * 640 * 8 * 64 * 2 * 2  # + sliding layers
    assert memory.kv_bytes(PRESETS["20b"], 131072, 8) < 0.55 * kv


def test_parse_size():
    """One size parser for every option and variable: K/M/G/T (with or without B) are powers
    of 1000, as oss-mlx prints sizes; KiB/MiB/GiB/TiB powers of 1024."""
    assert parse_size("12GB") == parse_size("12G") == parse_size("12 gb") == 12_000_000_000
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("800MB") == parse_size("800M") == 800_000_000
    assert parse_size("16GiB") == 16 << 30
    assert parse_size("1234") == 1234
    for bad in ("lots", "-5G", "8Gi B", "iB", "", "1.2.3G"):
        with pytest.raises(OssMlxError):
            parse_size(bad)


def test_machine_limit_macos_uses_working_set_then_wired_limit(monkeypatch):
    import mlx.core as mx

    monkeypatch.delenv(machine.LIMIT_ENV, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(mx, "device_info", lambda: {
        "memory_size": 16 << 30, "max_recommended_working_set_size": 11453251584}, raising=False)
    sysctl = {"iogpu.wired_limit_mb": "0"}
    monkeypatch.setattr(machine, "sysctl", lambda name: sysctl.get(name))
    lim = machine.machine_limit()
    assert (lim.bytes, lim.source, lim.total_ram) == (11453251584, "GPU working set", 16 << 30)
    sysctl["iogpu.wired_limit_mb"] = "14336"
    lim = machine.machine_limit()
    assert (lim.bytes, lim.source, lim.wired_limit_mb) == (14336 << 20, "iogpu wired limit", 14336)


def test_machine_limit_elsewhere_is_available_ram(monkeypatch):
    monkeypatch.delenv(machine.LIMIT_ENV, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(machine, "meminfo", lambda: {"MemTotal": 24 << 30, "MemAvailable": 9 << 30})
    lim = machine.machine_limit()
    assert (lim.bytes, lim.source) == (9 << 30, "available RAM")
    monkeypatch.setenv(machine.LIMIT_ENV, "3GB")
    assert machine.machine_limit().bytes == 3_000_000_000




def test_refusal_is_one_line_with_advice_that_fits(tiny_model, monkeypatch):
    cfg = read_model_folder(tiny_model).config
    full = memory.plan_for_folder(tiny_model)
    limit = int(full.weights + 0.4 * (full.total - full.weights))
    monkeypatch.setenv(machine.LIMIT_ENV, str(limit))
    with pytest.raises(OssMlxError) as e:
        memory.check_fits(tiny_model)
    msg = str(e.value)
    assert "\n" not in msg and "short" in msg and "--force" in msg
    short_by = (full.total - limit) / 1e9
    assert f"{short_by:.1f} GB short" in msg
    # the advised context fits, and 1024 more would not
    n = int(msg.split("--max-context ")[1].split(";")[0].split()[0])
    assert memory.plan_for_folder(tiny_model, n).total <= limit
    assert memory.plan_for_folder(tiny_model, n + 1024).total > limit
    memory.check_fits(tiny_model, max_context=n)  # ... and passes the check
    assert memory.check_fits(tiny_model, force=True).total == full.total


def test_refusal_names_kv8_dense8_and_the_wired_limit_on_a_mac(monkeypatch):
    """A 20b at 128k on a (simulated) 16 GB Mac: the advice lists what the plan says fits."""
    cfg = PRESETS["20b"]
    plan = memory.plan_for_config(cfg, 131072, backend="gpu")
    lim = machine.Limit(int(plan.total - 0.2e9), "GPU working set", True, 32 << 30)
    monkeypatch.setattr(machine, "backend", lambda: "gpu")
    opts = memory.advice(cfg, plan, lim)
    assert any(o.startswith("--kv-bits 8") for o in opts)
    assert any(o.startswith("8-bit dense weights") for o in opts)
    wired = [o for o in opts if "sudo sysctl iogpu.wired_limit_mb=" in o]
    assert wired and "reboot" in wired[0]
    mb = int(wired[0].split("wired_limit_mb=")[1].split()[0])
    assert mb << 20 > plan.total


def test_bad_max_context(tiny_model):
    with pytest.raises(OssMlxError, match="outside the model.s 1..131,072"):
        memory.check_fits(tiny_model, max_context=10**7)


def test_cli_refuses_before_loading(tiny_model, monkeypatch, capsys):
    """`oss-mlx generate` with a fake small limit: one line on stderr, exit 1, no load."""
    from oss_mlx import cli

    monkeypatch.setenv(machine.LIMIT_ENV, "10MB")
    called = []
    monkeypatch.setattr("oss_mlx.model.loading.load", lambda *a, **k: called.append(a))
    rc = cli.main(["generate", "--model", str(tiny_model), "--prompt", "hi", "--max-tokens", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and not called
    assert err.startswith("oss-mlx: error: tiny at 131,072 tokens needs") and "\n" not in err


def test_mac_table_picks_the_first_option_that_fits():
    from oss_mlx.config import PRESETS

    assert memory.default_gpu_limit(16) == 11453246122  # 2/3 of 16 GiB (reported: 10.67 GiB)
    assert memory.default_gpu_limit(64) == 48 << 30
    table = memory.mac_table(contexts=(131072,), macs=(24, 96))
    rows = {r.split("|")[1].strip().split()[0]: [c.strip() for c in r.split("|")[2:4]]
            for r in table.splitlines()[2:]}
    # 20b at 128k on a 24 GB Mac: bf16 KV does not fit under 2/3 of 24 GiB, 8-bit KV does
    limit = memory.default_gpu_limit(24)
    assert memory.plan_for_config(PRESETS["20b"], 131072, backend="gpu").total > limit
    kv8 = memory.plan_for_config(PRESETS["20b"], 131072, 8, backend="gpu").total
    assert kv8 <= limit and rows["24"][0] == f"bf16 kv8 ({kv8 / 1e9:.1f})"
    assert rows["24"][1] == "no" and rows["96"][1].startswith("bf16 (")


def test_dense_bits_4(tiny_hf, tiny_model, tmp_path):
    """`convert --dense-bits 4`: the same modules as 8-bit, packed by mx.quantize(bits=4) bit
    for bit (chunked rows = whole tensor), loaded as 4-bit quantized modules, named -q4 in the
    store, and its logits stay near the bf16 model's (docs/memory.md gives the measured error)."""
    import json

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from oss_mlx.convert.convert import convert
    from oss_mlx.model import load
    from oss_mlx.store import store_path_for

    out = convert(tiny_hf, tmp_path / "q4", dense_bits=4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["dense"]["bits"] == 4
    assert store_path_for("openai/gpt-oss-20b", 4).name == "gpt-oss-20b-q4"
    w = mx.load(str(next(out.glob("model*.safetensors"))))
    ref = load(tiny_model, dtype=mx.float32)
    emb = ref.embedding.weight.astype(mx.bfloat16)
    for got, want in zip((w["embedding.weight"], w["embedding.scales"], w["embedding.biases"]),
                         mx.quantize(emb, group_size=64, bits=4)):
        assert mx.array_equal(got, want).item()
    q4 = load(out, dtype=mx.float32)
    assert isinstance(q4.unembedding, nn.QuantizedLinear) and q4.unembedding.bits == 4
    assert isinstance(q4.layers[0].attention.qkv, nn.QuantizedLinear)
    ids = mx.array(np.random.default_rng(0).integers(0, 200000, (1, 24)), dtype=mx.int32)
    a, b = np.array(ref(ids)[0]), np.array(q4(ids)[0])
    assert np.abs(a - b).mean() < 0.5 * a.std()


def test_load_engine_applies_context_and_kv_format(tiny_model):
    from oss_mlx.model.kv_quant import QuantizedKVCache

    engine = load_engine(str(tiny_model), LoadOptions(max_context=64, kv_bits=8))
    assert engine.max_context == 64
    assert isinstance(engine.model.make_cache()[1], QuantizedKVCache)
    with pytest.raises(OssMlxError, match="context_length_exceeded"):
        engine.logits(list(range(100, 170)))
    assert engine.logits(list(range(100, 140))).shape == (engine.model.config.vocab_size,)

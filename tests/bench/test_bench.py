"""`oss-mlx bench`: the roofline arithmetic against the published per-token byte counts, the
chip table, and a smoke run of the whole command on the tiny checkpoint (the real figures come
from runs, see benchmarks/README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from oss_mlx.bench import roofline
from oss_mlx.cli import main
from oss_mlx.config import ModelConfig

# gpt-oss-20b (docs/model.md §1.1)
CFG_20B = ModelConfig(num_hidden_layers=24, num_experts=32)


@dataclass
class Fake:
    """Stands in for an mx.array: only .nbytes is read, so 20b shapes cost no memory."""

    nbytes: int


def _params_20b(dense_bits: int) -> dict:
    """Our tensor names and storage (contract) for the 20b shapes: experts mxfp4 (uint32 packed
    + uint8 e8m0 scales per 32), dense bf16, or 8-bit affine gs64 (uint32 + bf16 scales/biases)."""
    c = CFG_20B
    H, V, E, I, D = c.hidden_size, c.vocab_size, c.num_experts, c.intermediate_size, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * D

    def dense(name, rows, cols):
        if dense_bits == 16:
            return {f"{name}.weight": Fake(rows * cols * 2)}
        return {f"{name}.weight": Fake(rows * cols), f"{name}.scales": Fake(rows * cols // 64 * 2),
                f"{name}.biases": Fake(rows * cols // 64 * 2)}

    p = {**dense("embedding", V, H), **dense("unembedding", V, H), "norm.weight": Fake(H * 2)}
    for n in range(c.num_hidden_layers):
        a, m = f"layers.{n}.attention", f"layers.{n}.mlp"
        p.update(dense(f"{a}.qkv", qkv, H))
        p.update(dense(f"{a}.out", H, c.num_attention_heads * D))
        p.update({
            f"{a}.norm.weight": Fake(H * 2), f"{a}.qkv.bias": Fake(qkv * 2),
            f"{a}.out.bias": Fake(H * 2), f"{a}.sinks": Fake(c.num_attention_heads * 4),
            f"{m}.norm.weight": Fake(H * 2),
            f"{m}.router.weight": Fake(E * H * 2), f"{m}.router.bias": Fake(E * 2),
            f"{m}.experts.gate_up.weight": Fake(E * 2 * I * H // 8 * 4),
            f"{m}.experts.gate_up.scales": Fake(E * 2 * I * H // 32),
            f"{m}.experts.gate_up.bias": Fake(E * 2 * I * 2),
            f"{m}.experts.down.weight": Fake(E * H * I // 8 * 4),
            f"{m}.experts.down.scales": Fake(E * H * I // 32),
            f"{m}.experts.down.bias": Fake(E * H * 2),
        })
    return p


def test_bytes_per_token_match_published_20b_figures():
    # The published bytes per 20b token: 3.706 GB with bf16 non-expert weights, 2.564 with
    # 8-bit; experts 1.269 GB. Biases and norms (not in those sums) are < 0.2%.
    bf16 = roofline.weight_bytes_per_token(_params_20b(16), CFG_20B)
    assert bf16["experts"] / 1e9 == pytest.approx(1.269, rel=2e-3)
    assert bf16["unembedding"] / 1e9 == pytest.approx(1.158, rel=1e-3)
    assert bf16["attention"] / 1e9 == pytest.approx(1.274, rel=2e-3)
    assert bf16["embedding_row"] == 2880 * 2
    assert sum(bf16.values()) / 1e9 == pytest.approx(3.706, rel=3e-3)
    q8 = roofline.weight_bytes_per_token(_params_20b(8), CFG_20B)
    assert sum(q8.values()) / 1e9 == pytest.approx(2.564, rel=3e-3)


def test_kv_bytes_match_published_20b_figures():
    # "20b at L = 4k: +104 MB. At L = 32k: +808 MB" (f16/bf16 K and V, window 128 on half the layers)
    assert roofline.kv_bytes_per_token(CFG_20B, 4096, 2) / 1e6 == pytest.approx(104, abs=0.5)
    assert roofline.kv_bytes_per_token(CFG_20B, 32768, 2) / 1e6 == pytest.approx(808, abs=0.5)
    # Below the window every layer reads the same number of positions.
    assert roofline.kv_bytes_per_token(CFG_20B, 100, 4) == 24 * 100 * 2 * 8 * 64 * 4


@pytest.mark.parametrize("chip,cores,gbps", [
    ("Apple M4 Max", 32, 410.0), ("Apple M4 Max", 40, 546.0), ("Apple M3 Max", 30, 300.0),
    ("Apple M2 Ultra", None, 800.0), ("Apple M1", 8, 68.25), ("Apple M4 Pro", 20, 273.0),
    ("Apple M9 Hyper", None, None), ("AMD EPYC", None, None),
])
def test_apple_bandwidth_table(chip, cores, gbps):
    assert roofline.apple_bandwidth(chip, cores) == gbps


def test_ratios_are_ours_over_theirs():
    res = [{"runtime": "a", "name": "oss-mlx", "prompt_tokens": 8,
            "median": {"prefill_tps": 30.0, "ttft_s": 1.0, "decode_tps": 6.0, "peak_memory_bytes": 5}},
           {"runtime": "b", "name": "mlx-lm", "prompt_tokens": 8,
            "median": {"prefill_tps": 10.0, "ttft_s": 2.0, "decode_tps": 4.0, "peak_memory_bytes": 10}}]
    (r,) = roofline.compute_ratios(res)
    assert (r["prefill_tps"], r["ttft_s"], r["decode_tps"], r["peak_memory_bytes"]) == (3.0, 0.5, 1.5, 0.5)


@pytest.mark.subprocess  # --ops counts kernels in a child process
def test_bench_smoke(tiny_model, tiny_hf, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_model), "--source", str(tiny_hf),
               "--prompt-tokens", "8,20", "--gen-tokens", "4", "--repeat", "1",
               "--compare", "mlx-lm", "--dtype", "float32,bfloat16", "--ops", "--json", str(out)])
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps to the terminal width
    assert "mlx-lm bfloat16" in text and "oss-mlx bfloat16" in text
    assert "oss-mlx float32" in text and "float32 activations" in text

    report = json.loads(out.read_text())
    assert "kernels per decode token" in text
    kernels = {k["runtime"]: k for k in report["kernels"]}
    assert set(kernels) == {"oss-mlx float32", "oss-mlx bfloat16", "mlx-lm bfloat16"}
    assert kernels["oss-mlx float32"]["per_layer"] < kernels["mlx-lm bfloat16"]["per_layer"]
    m = report["machine"]
    assert m["backend"] in ("CPU", "Metal", "CUDA") and m["mlx_version"] and m["chip"]
    assert report["settings"]["prompt_tokens"] == [8, 20]
    labels = [r["label"] for r in report["runtimes"]]
    assert len(labels) == 3 and labels[-1].startswith("mlx-lm") and "oss-mlx bfloat16" in labels
    assert len(report["results"]) == 6
    for r in report["results"]:
        assert len(r["runs"]) == 1 and r["runs"][0]["generated"] == 4
        for k in ("prefill_tps", "ttft_s", "decode_tps", "peak_memory_bytes"):
            assert r["median"][k] > 0
        assert r["roofline"]["bytes_per_token"] > 0 and r["roofline"]["achieved_gbps"] > 0
        assert r["roofline"]["context"] == r["prompt_tokens"] + 2
    assert len(report["ratios"]) == 4
    assert all(q[k] > 0 for q in report["ratios"]
               for k in ("prefill_tps", "ttft_s", "decode_tps", "peak_memory_bytes"))

    # Ours in bf16 and mlx-lm load the same checkpoint: the bytes a token reads must agree
    # (experts exactly, being the same mxfp4 tensors; the rest to within norm/sink dtypes).
    # Both ran the same model: the same prompt gives the same greedy first token at bf16.
    first = {r["runtime"]: r["runs"][0]["first_tokens"][0] for r in report["results"]}
    assert first["oss-mlx bfloat16"] == first[labels[-1]]
    assert all(isinstance(q["same_tokens"], bool) for q in report["ratios"])
    by = {r["runtime"]: r["roofline"]["components"] for r in report["results"] if r["prompt_tokens"] == 8}
    ours, theirs = by["oss-mlx bfloat16"], by[labels[-1]]
    # The same mxfp4 tensors; our expert biases are float32, theirs bf16: k (2I + H) x 2 more
    # bytes per layer and token.
    c = ModelConfig.from_dict(report["model"]["config"])
    extra = c.num_hidden_layers * c.experts_per_token * (2 * c.intermediate_size + c.hidden_size) * 2
    assert ours["experts"] - theirs["experts"] == extra
    assert sum(ours.values()) == pytest.approx(sum(theirs.values()), rel=0.02)


@pytest.mark.parametrize("argv", [
    ["bench"],
    ["bench", "--synth", "20b", "--prompt-tokens", "0"],
    ["bench", "--synth", "20b", "--dtype", "int8"],
    ["bench", "--model", "x", "--layers", "2"],
])
def test_bench_bad_arguments_one_line_error(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("oss-mlx: error:") and "\n" not in err and "Traceback" not in err


def test_bench_compare_needs_a_source(tiny_model, tmp_path, capsys):
    # A converted folder whose manifest names no source: mlx-lm has nothing to load.
    import shutil

    model = shutil.copytree(tiny_model, tmp_path / "m")
    (model / "manifest.json").unlink(missing_ok=True)
    assert main(["bench", "--model", str(model), "--compare", "mlx-lm", "--prompt-tokens", "4"]) == 1
    assert capsys.readouterr().err.startswith("oss-mlx: error: --compare mlx-lm needs")


def test_plot_draws_saved_results_and_says_what_it_needs(tmp_path, monkeypatch, capsys):
    """`oss-mlx bench --plot PNG --from JSON`: drawing belongs to the package (a wheel install
    draws too); without matplotlib, one line naming the extra, before anything runs."""
    import sys

    from oss_mlx.bench import plot

    report = {"format": "oss-mlx-bench", "machine": {"chip": "Apple M4 Max", "backend": "Metal",
                                                     "mlx_version": "0"},
              "model": {"name": "synth-20b"},
              "results": [{"runtime": rt, "prompt_tokens": n, "median": {"decode_tps": v}}
                          for rt, n, v in [("oss-mlx bfloat16", 4096, 80.0), ("oss-mlx bfloat16", 128, 90.0),
                                           ("mlx-lm bfloat16", 128, 70.0), ("mlx-lm bfloat16", 4096, 52.0)]]}
    assert plot.series(report)["oss-mlx bfloat16"] == ([128, 4096], [90.0, 80.0])
    src = tmp_path / "r.json"
    src.write_text(json.dumps(report))
    assert main(["bench", "--plot", str(tmp_path / "d.png"), "--from", str(src)]) == 0
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "--plot", str(tmp_path / "x.png"), "--from", str(tmp_path / "bad.json")]) == 1
    assert "is not a file written by `oss-mlx bench --json`" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--synth", "20b", "--plot", str(tmp_path / "e.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "oss-mlx: error: drawing needs matplotlib: pip install 'oss-mlx[bench]'"
    assert not (tmp_path / "e.png").exists()

"""mlx-lm's default quantized output (`mlx_lm.convert -q`: dense modules affine 4-bit, the
router 8-bit) converts losslessly, each module's quantization kept as mlx-lm stored it; what
cannot be kept in our layout is refused saying what is accepted (issue 20, item 7).

The folders are made by mlx-lm's own converter from the project's tiny checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert


@pytest.fixture(scope="module")
def mlx_lm_q4(tiny_hf, tmp_path_factory):
    """`mlx_lm.convert -q` with its defaults (4 bits, group 64; its gpt_oss predicate puts the
    router at 8 bits)."""
    out = tmp_path_factory.mktemp("mlx-lm") / "gpt-oss-tiny-4bit"
    mlx_lm_convert(str(tiny_hf), str(out), quantize=True)
    return out


def _tensors(folder) -> dict:
    import mlx.core as mx

    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


# Our module -> mlx-lm's module(s) (q | k | v are our fused qkv's rows, in that order).
MODULES = {"embedding": ["model.embed_tokens"], "unembedding": ["lm_head"]}
PER_LAYER = {"attention.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "attention.out": ["self_attn.o_proj"], "mlp.router": ["mlp.router"]}


@pytest.mark.slow
def test_mlx_lm_default_quantization_converts_losslessly(mlx_lm_q4, tiny_model, tmp_path,
                                                         capsys):
    import mlx.core as mx
    import mlx.nn as nn

    from oss_mlx import load
    from oss_mlx.cli import main
    from oss_mlx.config import read_model_folder

    out = tmp_path / "from-mlx-lm"
    assert main(["convert", str(mlx_lm_q4), "-o", str(out)]) == 0
    assert ("converting it losslessly (experts already mxfp4, dense weights kept affine 4-bit, "
            "mlp.router affine 8-bit)") in capsys.readouterr().err

    # Each module's quantization as mlx-lm's own config.json states it.
    theirs = json.loads((mlx_lm_q4 / "config.json").read_text())["quantization"]
    four, eight = ({"mode": "affine", "group_size": 64, "bits": b} for b in (4, 8))
    assert theirs["model.layers.0.self_attn.q_proj"] == four
    assert theirs["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}
    dense = json.loads((out / "config.json").read_text())["quantization"]["dense"]
    assert dense == {"modules": {"attention.out": four, "attention.qkv": four, "embedding": four,
                                 "mlp.router": eight, "unembedding": four}}
    assert read_model_folder(out).dense_label == "4-bit"

    # Byte for byte: the quantized modules are mlx-lm's tensors (q | k | v rows joined), the
    # rest (experts, norms, biases, sinks) what our converter makes of the same checkpoint.
    got, src, bf16 = _tensors(out), _tensors(mlx_lm_q4), _tensors(tiny_model)
    layers = read_model_folder(out).config.num_hidden_layers
    pairs = dict(MODULES)
    for n in range(layers):
        pairs.update({f"layers.{n}.{m}": [f"model.layers.{n}.{t}" for t in ts]
                      for m, ts in PER_LAYER.items()})
    quantized = set()
    for ours, names in pairs.items():
        for part in ("weight", "scales", "biases"):
            want = mx.concatenate([src[f"{t}.{part}"] for t in names], axis=0)
            assert got[f"{ours}.{part}"].dtype == want.dtype, (ours, part)
            assert mx.array_equal(got[f"{ours}.{part}"], want).item(), (ours, part)
            quantized.add(f"{ours}.{part}")
    assert quantized <= set(got)
    rest = set(got) - quantized
    assert rest == set(bf16) - {f"{m}.weight" for m in pairs}
    for k in sorted(rest):
        assert got[k].dtype == bf16[k].dtype and mx.array_equal(got[k], bf16[k]).item(), k

    # The loader quantizes each module as stored: its logits are those of our bf16 conversion
    # quantized with the parameters mlx-lm's config.json names, holding mlx-lm's tensors.
    model = load(out)
    oracle = load(tiny_model)

    def as_mlx_lm_said(path, module):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        leaf = path.split(".", 2)[-1] if path.startswith("layers.") else path
        if leaf not in MODULES and leaf not in PER_LAYER:
            return False
        name = (MODULES.get(leaf) or [f"model.layers.{path.split('.')[1]}.{PER_LAYER[leaf][0]}"])[0]
        q = theirs[name]
        return {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}

    nn.quantize(oracle, class_predicate=as_mlx_lm_said)
    oracle.load_weights([(k, got[k].astype(mx.float32) if ".mlp.router." in k
                          and got[k].dtype == mx.bfloat16 else got[k]) for k in quantized],
                        strict=False)
    x = mx.array([[200006, 173781, 200005, 13225, 2375, 0, 1, 2]])
    assert mx.array_equal(model(x), oracle(x)).item()

    from oss_mlx.config import describe_dense  # what `list` and `bench` print

    assert describe_dense(dense) == "affine 4-bit, mlp.router affine 8-bit"


def test_old_uniform_form_is_still_read(tmp_path):
    """config.json files written before the per-module form keep loading as they did."""
    from oss_mlx.config import dense_bits, dense_modules, describe_dense

    old = {"mode": "affine", "group_size": 64, "bits": 8,
           "modules": ["embedding", "attention.qkv", "attention.out", "unembedding"]}
    assert dense_modules(old) == {m: {"mode": "affine", "group_size": 64, "bits": 8}
                                  for m in old["modules"]}
    assert dense_bits(old) == 8 and describe_dense(old) == "affine 8-bit"
    assert dense_modules(None) == {} and dense_bits(None) == 16 and describe_dense(None) == "bf16"
    with pytest.raises(ValueError, match="not understood"):
        dense_modules({"bits": 8})


def test_broken_dense_quantization_is_a_broken_folder(tmp_path):
    from oss_mlx.config import BrokenModelFolder, read_model_folder

    (tmp_path / "config.json").write_text(json.dumps({
        "format": "oss-mlx", "model": {}, "quantization": {"dense": {"modules": {"embedding": 8}}}}))
    with pytest.raises(BrokenModelFolder, match="module 'embedding' has no mode, group size and bits"):
        read_model_folder(tmp_path)


@pytest.mark.slow
def test_what_cannot_be_kept_says_what_is_accepted(tiny_hf, tmp_path, capsys):
    """A folder whose attention out projection is 8-bit in layer 0 and 4-bit elsewhere (an
    mlx-lm predicate of one's own) cannot be one module kind in our config: refused in one
    line that says what oss-mlx reads."""
    from oss_mlx.cli import main

    def layer0_out_at_8_bits(path, module, config=None):
        if not hasattr(module, "to_quantized") or "experts" in path:
            return False
        if path.endswith("router") or path == "model.layers.0.self_attn.o_proj":
            return {"group_size": 64, "bits": 8}
        return True

    src = tmp_path / "mixed-by-layer"
    mlx_lm_convert(str(tiny_hf), str(src), quantize=True, quant_predicate=layer0_out_at_8_bits)
    capsys.readouterr()
    assert main(["convert", str(src), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert ("unsupported mlx-lm quantization (attention.out is quantized differently across "
            "layers or q/k/v (4-bit group 64, 8-bit group 64); oss-mlx reads mlx-lm folders "
            "whose dense modules are bf16 or affine-quantized, each kind of module") in err, err
    assert "what `mlx_lm.convert -q` and `--q-bits N` write" in err

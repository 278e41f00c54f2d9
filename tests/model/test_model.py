"""The MLX model against independent oracles: the numpy reference written from docs/model.md §1.8
(tests/reference.py, reading the SOURCE checkpoint) and golden logits from Hugging Face
transformers (tests/golden/, made by tests/golden/make_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from support import reference
from oss_mlx.config import ModelConfig
from oss_mlx.errors import OssMlxError
from oss_mlx.model import Model, default_dtype, load

GOLDEN = Path(__file__).parent / "golden"
T = 70  # well past the tiny window of 8


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1234).integers(0, 201088, T)


@pytest.fixture(scope="module")
def ref_logits(tiny_hf, ids):
    conf, weights = reference.load_checkpoint(tiny_hf)
    return reference.forward(conf, weights, ids)


@pytest.fixture(scope="module")
def model32(tiny_model):
    return load(tiny_model, dtype=mx.float32)


def logits_of(model, ids, cache=None):
    return np.array(model(mx.array(ids)[None], cache=cache).astype(mx.float32))[0]


def test_tiny_window_and_length(tiny_hf, ids, ref_logits):
    """The window matters at this length, so the reference comparisons below test it: without
    it the reference's logits are the same for the first 8 positions and differ after."""
    conf, weights = reference.load_checkpoint(tiny_hf)
    assert conf["sliding_window"] == 8 < T
    unwindowed = reference.forward({**conf, "sliding_window": T}, weights, ids)
    np.testing.assert_allclose(unwindowed[:8], ref_logits[:8], rtol=0, atol=1e-6)
    assert np.abs(unwindowed[8:] - ref_logits[8:]).max() > 1e-2


def test_float32_matches_numpy_reference(model32, ids, ref_logits):
    out = logits_of(model32, ids)
    assert 1 < np.abs(ref_logits).max() < 50  # logits of order 1-10, not a degenerate model
    np.testing.assert_allclose(out, ref_logits, rtol=0, atol=1e-4)


def test_chunked_prefill_matches_reference(model32, ids, ref_logits):
    cache = model32.make_cache()
    out = np.concatenate(
        [logits_of(model32, ids[s : s + 16], cache) for s in range(0, T, 16)]
    )
    np.testing.assert_allclose(out, ref_logits, rtol=0, atol=1e-4)
    for chunk in (16, 7, 512):
        last = model32.prefill(mx.array(ids)[None], model32.make_cache(), chunk_size=chunk)
        assert last.shape == (1, model32.config.vocab_size)
        np.testing.assert_allclose(np.array(last)[0], ref_logits[-1], rtol=0, atol=1e-4)


def test_token_by_token_decode_equals_full_forward(model32, ids):
    full = logits_of(model32, ids)
    cache = model32.make_cache()
    steps = np.concatenate([logits_of(model32, ids[i : i + 1], cache) for i in range(T)])
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-4)
    # sliding layers keep only the window; full layers keep everything
    assert cache[0].keys.shape[2] == 8 and cache[1].offset == T
    # a prefill, then decoding on top of it
    cache = model32.make_cache()
    model32.prefill(mx.array(ids[:37])[None], cache, chunk_size=16)
    rest = np.concatenate([logits_of(model32, ids[i : i + 1], cache) for i in range(37, T)])
    np.testing.assert_allclose(rest, full[37:], rtol=0, atol=1e-4)
    # filling the cache without logits, then the last token
    cache = model32.make_cache()
    assert model32.prefill(mx.array(ids[:-1])[None], cache, chunk_size=16, logits=False) is None
    assert cache[1].offset == T - 1
    last = model32.prefill(mx.array(ids[-1:])[None], cache)
    np.testing.assert_allclose(np.array(last)[0], full[-1], rtol=0, atol=1e-4)


def test_bfloat16_agrees_in_argmax(tiny_model, model32):
    # All bf16, experts included, as on a GPU (on the CPU backend they default to float32).
    model = load(tiny_model, expert_dtype=mx.bfloat16)  # stored dtype: bf16
    assert model.dtype == mx.bfloat16
    agree, gaps = [], []
    for seed in range(4):
        ids = np.random.default_rng(seed).integers(0, 201088, 128)
        ref, out = logits_of(model32, ids), logits_of(model, ids)
        agree.extend(out.argmax(-1) == ref.argmax(-1))
        top2 = np.sort(ref, axis=-1)[:, -2:]
        gaps.extend(top2[:, 1] - top2[:, 0])
    agree, gaps = np.array(agree), np.array(gaps)
    assert agree.mean() >= 0.95, agree.mean()
    # bf16 logits near 9 are spaced 0.0625 apart: only near-ties may flip
    assert np.all(gaps[~agree] < 0.5), gaps[~agree]


def test_both_layouts_give_identical_logits(tiny_model, tiny_model_original, model32, ids):
    other = load(tiny_model_original, dtype=mx.float32)
    assert np.array_equal(logits_of(other, ids[:20]), logits_of(model32, ids[:20]))


@pytest.mark.parametrize("name", ["tiny-seed0", "tiny-seed1-3layers"])
def test_matches_transformers_golden(name, tmp_path_factory):
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    golden = np.load(GOLDEN / f"{name}.npz")
    meta = json.loads(str(golden["meta"]))
    root = tmp_path_factory.mktemp(name)
    src = synth(root / "src", preset="tiny", layout="hf", seed=meta["seed"], layers=meta["layers"])
    assert reference.fingerprint(src) == meta["weights_sha256"], (
        "synth now makes other weights than the goldens were made from: "
        "rerun `python tests/golden/make_golden.py` (needs torch)"
    )
    model = load(convert(src, root / "mlx"), dtype=mx.float32)
    out = logits_of(model, golden["ids"])
    np.testing.assert_allclose(out[:, golden["vocab_ids"]], golden["logits"], rtol=0, atol=1e-3)
    # the golden full-vocab argmax is (within tolerance) our maximum too
    at_golden = np.take_along_axis(out, golden["argmax"][:, None], axis=1)[:, 0]
    assert np.all(at_golden >= out.max(axis=1) - 1e-3)


def test_8bit_dense_weights_load_into_quantized_modules(tiny_hf, model32, ids, tmp_path_factory):
    """`convert --dense-bits 8`: same logits as the float model carrying the dequantized
    8-bit weights (wiring), and close to the unquantized reference (argmax)."""
    from oss_mlx.convert.convert import convert

    folder = convert(tiny_hf, tmp_path_factory.mktemp("q8") / "tiny-q8", dense_bits=8)
    q8 = load(folder, dtype=mx.float32)
    assert isinstance(q8.embedding, nn.QuantizedEmbedding)
    assert isinstance(q8.unembedding, nn.QuantizedLinear)
    assert isinstance(q8.layers[1].attention.qkv, nn.QuantizedLinear)
    assert isinstance(q8.layers[1].attention.out, nn.QuantizedLinear)
    assert type(q8.layers[1].mlp.router) is nn.Linear  # routers stay bf16

    def dequantized(m):
        return mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(mx.float32)

    def linear(q):
        lin = nn.Linear(1, 1, bias="bias" in q)
        lin.weight = dequantized(q)
        if "bias" in q:
            lin.bias = q.bias
        return lin

    dense = load(folder, dtype=mx.float32)  # a second copy, its quantized modules made float
    dense.embedding = nn.Embedding(1, 1)
    dense.embedding.weight = dequantized(q8.embedding)
    dense.unembedding = linear(q8.unembedding)
    for a, b in zip(dense.layers, q8.layers):
        a.attention.qkv = linear(b.attention.qkv)
        a.attention.out = linear(b.attention.out)
    np.testing.assert_allclose(logits_of(q8, ids), logits_of(dense, ids), rtol=0, atol=1e-4)
    agree = (logits_of(q8, ids).argmax(-1) == logits_of(model32, ids).argmax(-1)).mean()
    assert agree >= 0.9, agree


# ---- masks and caches: count the keys each query sees ---------------------------------


def counting_model():
    """2 layers (sliding, full) whose attention outputs n / (n + 1) in channel 0, where n is
    the number of visible keys: q = k = 0 (uniform scores), v = 1, sink logit 0."""
    cfg = ModelConfig(
        num_hidden_layers=2, num_experts=4, vocab_size=16, hidden_size=64, intermediate_size=64,
        head_dim=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
    )
    model = Model(cfg, dtype=mx.float32)
    for layer in model.layers:
        a = layer.attention
        a.qkv.weight = mx.zeros_like(a.qkv.weight)
        a.qkv.bias = mx.concatenate([mx.zeros((6 * 64,)), mx.ones((2 * 64,))])
        a.out.weight = mx.zeros_like(a.out.weight).at[0, 0].add(1.0)
        a.out.bias = mx.zeros_like(a.out.bias)
        a.sinks = mx.zeros_like(a.sinks)
    return model


def keys_seen(model, cache, chunks) -> list[list[int]]:
    """Feed `chunks` (token counts) through counting_model's two layers with `cache`; for each
    layer, how many keys each position's query saw (read back from n / (n + 1))."""
    seen = [[], []]
    for n in chunks:
        x = mx.zeros((1, n, 64))
        full, window = model.masks(x, cache)
        for l, mask in ((0, window), (1, full)):
            y = model.layers[l].attention(x, mask, cache[l], model._periods)
            r = np.array(y[0, :, 0], dtype=np.float64)
            seen[l].extend(np.rint(r / (1 - r)).astype(int))
    return seen


@pytest.mark.parametrize(
    "with_cache, chunks",
    [
        (False, [20]),  # whole prompt, no cache
        (True, [20]),
        (True, [5, 5, 5, 5, 5, 5]),  # chunked prefill over a rotating cache
        (True, [1] * 20),  # token-by-token decode
        (True, [12, 1, 1, 9, 1, 3]),  # chunks after decode steps after chunks
        (True, [3, 1, 20]),
    ],
)
def test_sliding_layers_see_exactly_the_window(with_cache, chunks):
    model = counting_model()
    cache = model.make_cache() if with_cache else [None, None]
    seen = keys_seen(model, cache, chunks)
    pos = np.arange(sum(chunks))
    assert seen[0] == list(np.minimum(pos + 1, 8))  # current token + 7 previous
    assert seen[1] == list(pos + 1)
    if with_cache:
        assert cache[0].keys.shape[2] <= 8 + max(chunks) - 1  # bounded by the window


# ---- loading ---------------------------------------------------------------------------


def test_default_dtype_on_cpu(tiny_model):
    """With no dtype a model computes in bfloat16 (default_dtype): its dense weights are held
    in it and it gives exactly the logits of an explicit bfloat16 load."""
    x = mx.array([[200006, 173781, 200005, 13225, 2375]])
    model = load(tiny_model)
    assert model.layers[0].attention.qkv.weight.dtype == default_dtype() == mx.bfloat16
    assert mx.array_equal(model(x), load(tiny_model, dtype=mx.bfloat16)(x)).item()
    assert not mx.array_equal(model(x), load(tiny_model, dtype=mx.float32)(x)).item()


def test_loads_lazily_mapped_weights(tiny_model):
    model = load(tiny_model, lazy=True)
    assert model.config.num_hidden_layers == 4 and model.model_dir == Path(tiny_model)
    experts = model.layers[0].mlp.experts
    assert experts.gate_up.weight.dtype == mx.uint32 and experts.gate_up.scales.dtype == mx.uint8
    assert model.layers[0].attention.norm.weight.dtype == mx.float32  # norms computed in fp32
    assert load(tiny_model, dtype="float32", lazy=True).layers[0].attention.qkv.weight.dtype == mx.float32


def test_bad_folders_raise_clear_errors(tmp_path, tiny_model):
    with pytest.raises(OssMlxError, match="no such model folder"):
        load(tmp_path / "nowhere")
    with pytest.raises(OssMlxError, match="config.json"):
        load(tmp_path)
    with pytest.raises(OssMlxError, match="unknown dtype"):
        load(tiny_model, dtype="int8")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_model).iterdir():
        if f.suffix == ".json":
            (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(Path(tiny_model).glob("model*.safetensors"))[0]
    (broken / shard.name).write_bytes(shard.read_bytes()[:1000])  # truncated
    with pytest.raises(OssMlxError):
        load(broken)


def test_cpu_experts_run_float32_and_prefill_skips_unneeded_work(tiny_model, model32, ids):
    # On the CPU backend a bf16 model feeds its experts float32 (MLX's CPU mxfp4 kernels are
    # far faster with float32 activations); the dense matmuls stay bf16.
    model = load(tiny_model)
    assert model.dtype == mx.bfloat16
    assert all(layer.mlp.norm.dtype == mx.float32 for layer in model.layers)
    assert all(layer.attention.norm.dtype == mx.bfloat16 for layer in model.layers)
    ref = logits_of(model32, ids[:40])
    out = logits_of(model, ids[:40])
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.95
    # prefill runs the last block's MLP on the last position only: same logits as the full
    # forward's last row.
    last = model32.prefill(mx.array(ids[None, :40]), model32.make_cache(), chunk_size=16)
    np.testing.assert_allclose(np.array(last[0]), ref[-1], atol=1e-4)


def test_one_precision_rule_for_weights_and_compute(tiny_model):
    """docs/model.md §1.7 / OpenAI's Metal reference: float32 residual, norms and router; the embedding
    as stored; dense weights in the model dtype; experts' activations (and biases) float32 on
    the CPU backend."""
    model = load(tiny_model, lazy=True)  # bf16 dense
    p = model.precision
    assert (p.dense, p.experts) == (mx.bfloat16, mx.float32)
    assert p.weight("layers.0.attention.norm.weight") == mx.float32
    assert p.weight("layers.3.mlp.router.weight") == mx.float32
    assert p.weight("embedding.weight") is None
    assert p.weight("layers.0.attention.qkv.weight") == mx.bfloat16
    assert p.weight("layers.0.mlp.experts.gate_up.bias") == mx.float32
    # what load did with it
    a, m = model.layers[0].attention, model.layers[0].mlp
    assert a.qkv.weight.dtype == a.sinks.dtype == mx.bfloat16 and m.router.weight.dtype == mx.float32
    assert m.experts.bias.dtype == mx.float32 and model.embedding.weight.dtype == mx.bfloat16
    assert (a.norm.dtype, m.norm.dtype, m.expert_dtype, model.norm.dtype) == (
        mx.bfloat16, mx.float32, mx.float32, mx.bfloat16)
    # the two expert biases became one table: gate_up's 2I then down's H
    c = model.config
    assert m.experts.bias.shape == (c.num_experts, 2 * c.intermediate_size + c.hidden_size)

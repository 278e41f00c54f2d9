"""`oss-mlx convert`: the output folder exactly as the contract says, a lossless MXFP4 repack
(checked element by element against the independent numpy decoder of docs/checkpoint.md §4), both
layouts giving identical tensors, the vocabulary, 8-bit dense weights, the Hub path offline,
and a one-line error with nothing left behind for every kind of bad input."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from support.reference import mxfp4_dequant
from support.scripted import vocab_dir
from test_synth import raw

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
L, E, H, I, D, NQ, NKV, V = 4, 8, 64, 64, 64, 4, 2, 201088


def contract_tensors(dense_bits=16):
    """Our names, dtypes and shapes for the tiny preset (the contract's table)."""
    qkv = (NQ + 2 * NKV) * D

    def dense(name, rows, cols):
        if dense_bits == 8:
            return {f"{name}.weight": ("uint32", (rows, cols // 4)),
                    f"{name}.scales": ("bfloat16", (rows, cols // 64)),
                    f"{name}.biases": ("bfloat16", (rows, cols // 64))}
        return {f"{name}.weight": ("bfloat16", (rows, cols))}

    out = {**dense("embedding", V, H), "norm.weight": ("bfloat16", (H,)), **dense("unembedding", V, H)}
    for n in range(L):
        p = f"layers.{n}."
        out.update({p + k: v for k, v in {
            "attention.norm.weight": ("bfloat16", (H,)),
            **dense("attention.qkv", qkv, H), "attention.qkv.bias": ("bfloat16", (qkv,)),
            **dense("attention.out", H, NQ * D), "attention.out.bias": ("bfloat16", (H,)),
            "attention.sinks": ("bfloat16", (NQ,)),
            "mlp.norm.weight": ("bfloat16", (H,)),
            "mlp.router.weight": ("bfloat16", (E, H)), "mlp.router.bias": ("bfloat16", (E,)),
            "mlp.experts.gate_up.weight": ("uint32", (E, 2 * I, H // 8)),
            "mlp.experts.gate_up.scales": ("uint8", (E, 2 * I, H // 32)),
            "mlp.experts.gate_up.bias": ("bfloat16", (E, 2 * I)),
            "mlp.experts.down.weight": ("uint32", (E, H, I // 8)),
            "mlp.experts.down.scales": ("uint8", (E, H, I // 32)),
            "mlp.experts.down.bias": ("bfloat16", (E, H)),
        }.items()})
    return out


def load_mx(folder: Path) -> dict:
    import mlx.core as mx

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(mx.load(str(folder / f)))
    assert set(out) == set(index["weight_map"])
    return out


def test_output_folder_matches_contract(tiny_model):
    w = load_mx(tiny_model)
    got = {k: (str(v.dtype).split(".")[-1], tuple(v.shape)) for k, v in w.items()}
    assert got == contract_tensors()
    files = sorted(p.name for p in tiny_model.iterdir())
    assert files == ["config.json", "manifest.json", "model-00001-of-00001.safetensors",
                     "model.safetensors.index.json", "o200k_base.tiktoken"]
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss" and cfg["format"] == "oss-mlx" and cfg["format_version"] == 1
    assert cfg["quantization"] == {"experts": {"mode": "mxfp4", "group_size": 32, "bits": 4},
                                   "dense": None}
    assert cfg["dtype"] == "bfloat16"
    from oss_mlx.config import ModelConfig

    m = ModelConfig.from_dict(cfg["model"])
    assert (m.num_hidden_layers, m.num_experts, m.hidden_size, m.sliding_window) == (4, 8, 64, 8)
    assert m.rope_scaling_factor == 32.0 and m.initial_context_length == 4096
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())
    sizes = {"bfloat16": 2, "uint32": 4, "uint8": 1}
    assert index["metadata"]["total_size"] == sum(
        int(np.prod(s)) * sizes[d] for d, s in contract_tensors().values())


def test_manifest_and_vocabulary(tiny_model, tiny_model_original):
    for folder, layout in [(tiny_model, "hf"), (tiny_model_original, "original")]:
        data = (folder / "o200k_base.tiktoken").read_bytes()
        assert hashlib.sha256(data).hexdigest() == O200K_SHA256
        man = json.loads((folder / "manifest.json").read_text())
        assert man["source_layout"] == layout and man["dense_bits"] == 16
        assert set(man["versions"]) >= {"oss-mlx", "mlx"}
        files = {p.name for p in folder.iterdir()} - {"manifest.json"}
        assert set(man["files"]) == files
        for name, entry in man["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
    hf = json.loads((tiny_model / "manifest.json").read_text())["vocabulary"]["from"]
    orig = json.loads((tiny_model_original / "manifest.json").read_text())["vocabulary"]["from"]
    assert "tokenizer.json" in hf and "bpe-openai" in orig


def test_experts_are_lossless(tiny_model, tiny_original):
    """mx.dequantize of the converted experts == numpy decoding of the source blocks, element
    for element, with the gate/up rows de-interleaved (gate = even rows, up = odd rows)."""
    import mlx.core as mx

    src, w = raw(tiny_original), load_mx(tiny_model)
    for n in range(L):
        up_src = mxfp4_dequant(src[f"block.{n}.mlp.mlp1_weight.blocks"], src[f"block.{n}.mlp.mlp1_weight.scales"])
        expect = np.concatenate([up_src[:, 0::2], up_src[:, 1::2]], axis=1)  # [E, 2I, H]
        p = f"layers.{n}.mlp.experts."
        got = mx.dequantize(w[p + "gate_up.weight"], w[p + "gate_up.scales"], group_size=32, bits=4,
                            mode="mxfp4")
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), expect)
        down = mxfp4_dequant(src[f"block.{n}.mlp.mlp2_weight.blocks"], src[f"block.{n}.mlp.mlp2_weight.scales"])
        got = mx.dequantize(w[p + "down.weight"], w[p + "down.scales"], group_size=32, bits=4, mode="mxfp4")
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), down)
        bias = src[f"block.{n}.mlp.mlp1_bias"]
        np.testing.assert_array_equal(np.array(w[p + "gate_up.bias"].view(mx.uint16)),
                                      np.concatenate([bias[:, 0::2], bias[:, 1::2]], axis=1))
        np.testing.assert_array_equal(np.array(w[p + "down.bias"].view(mx.uint16)),
                                      src[f"block.{n}.mlp.mlp2_bias"])


def test_dense_weights_copied(tiny_model, tiny_hf):
    import mlx.core as mx

    src, w = raw(tiny_hf), load_mx(tiny_model)
    bits = lambda a: np.array(a.view(mx.uint16))  # noqa: E731
    assert np.array_equal(bits(w["embedding.weight"]), src["model.embed_tokens.weight"])
    assert np.array_equal(bits(w["unembedding.weight"]), src["lm_head.weight"])
    assert np.array_equal(bits(w["norm.weight"]), src["model.norm.weight"])
    for n in range(L):
        h = f"model.layers.{n}.self_attn."
        for part in ("weight", "bias"):
            qkv = np.concatenate([src[h + f"{p}_proj.{part}"] for p in "qkv"])
            assert np.array_equal(bits(w[f"layers.{n}.attention.qkv.{part}"]), qkv)
        assert np.array_equal(bits(w[f"layers.{n}.attention.out.weight"]), src[h + "o_proj.weight"])
        assert np.array_equal(bits(w[f"layers.{n}.attention.sinks"]), src[h + "sinks"])
        assert np.array_equal(bits(w[f"layers.{n}.mlp.router.weight"]),
                              src[f"model.layers.{n}.mlp.router.weight"])


def test_hf_and_original_convert_identically(tiny_model, tiny_model_original):
    for name in ["config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
                 "o200k_base.tiktoken"]:
        assert (tiny_model / name).read_bytes() == (tiny_model_original / name).read_bytes(), name


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory):
    from oss_mlx.convert.synth import synth

    return synth(tmp_path_factory.mktemp("src") / "sharded", layout="hf", max_shard_bytes=20_000_000)


def test_sharded_source_and_original_subfolder(sharded_hf, tiny_model, tiny_original, tmp_path):
    from oss_mlx.convert.convert import convert

    out = convert(sharded_hf, tmp_path / "a")
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == \
        (tiny_model / "model-00001-of-00001.safetensors").read_bytes()
    # A repo root that only has original/ is found; the vocabulary then comes from bpe-openai.
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(tiny_original, root / "original")
    out = convert(root, tmp_path / "b")
    assert json.loads((out / "manifest.json").read_text())["source_layout"] == "original"


def test_dense_bits_8(tiny_hf, tmp_path):
    import mlx.core as mx

    from oss_mlx.convert.convert import convert

    out = convert(tiny_hf, tmp_path / "q8", dense_bits=8)
    w = load_mx(out)
    assert {k: (str(v.dtype).split(".")[-1], tuple(v.shape)) for k, v in w.items()} == contract_tensors(8)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["dense"] == {
        "mode": "affine", "group_size": 64, "bits": 8,
        "modules": ["embedding", "attention.qkv", "attention.out", "unembedding"]}
    # Chunked quantization == mx.quantize of the whole tensor, bit for bit.
    src = raw(tiny_hf)
    bf16 = lambda a: mx.array(a).view(mx.bfloat16)  # noqa: E731
    qkv = np.concatenate([src[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    for ours, full in [("embedding", src["model.embed_tokens.weight"]),
                       ("unembedding", src["lm_head.weight"]), ("layers.1.attention.qkv", qkv)]:
        ref = mx.quantize(bf16(full), group_size=64, bits=8)
        for got, want in zip([w[f"{ours}.{k}"] for k in ("weight", "scales", "biases")], ref):
            assert mx.array_equal(got, want).item(), ours
    deq = mx.dequantize(w["embedding.weight"], w["embedding.scales"], w["embedding.biases"],
                        group_size=64, bits=8).astype(mx.float32)
    err = float(mx.max(mx.abs(deq - bf16(src["model.embed_tokens.weight"]).astype(mx.float32))))
    assert 0 < err < 0.05  # unit-variance data, 8-bit groups of 64
    # The model loads it and runs.
    try:
        import oss_mlx.model  # noqa: F401
    except ImportError:
        pytest.skip("oss_mlx.model not available")
    from oss_mlx import load

    logits = load(out)(mx.array([[200006, 173781, 200005]]))
    assert logits.shape == (1, 3, V) and bool(mx.all(mx.isfinite(logits)))


def test_logits_are_of_order_1_to_10(tiny_model):
    """The synth scaling claim, through the real model: logits std ~2, max ~10."""
    pytest.importorskip("oss_mlx.model")
    import mlx.core as mx

    from oss_mlx import load

    logits = load(tiny_model, dtype=mx.float32)(mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]))
    std = float(mx.std(logits))
    top = float(mx.max(mx.abs(logits)))
    assert 0.5 < std < 5 and 3 < top < 30, (std, top)


# ---- the store and the Hub --------------------------------------------------------------


def test_convert_into_store_and_list(tiny_hf, capsys):
    from oss_mlx.cli import main
    from oss_mlx.store import resolve_model, store_root

    assert main(["convert", str(tiny_hf)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == store_root() / "tiny-hf"
    assert resolve_model("tiny-hf") == out
    assert resolve_model(str(out)) == out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-hf" in listing and "mxfp4" in listing and "bfloat16" in listing
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["name"] == "tiny-hf")
    assert row["layers"] == 4 and row["num_experts"] == 8
    assert row["size"] == sum(f.stat().st_size for f in out.iterdir())


def test_unknown_model_says_how_to_get_it(tiny_hf):
    from oss_mlx.errors import OssMlxError
    from oss_mlx.store import resolve_model

    with pytest.raises(OssMlxError, match="oss-mlx convert openai/gpt-oss-20b"):
        resolve_model("gpt-oss-20b")
    with pytest.raises(OssMlxError, match="oss-mlx convert openai/gpt-oss-120b"):
        resolve_model("openai/gpt-oss-120b")
    # An upstream checkpoint, not a converted model (test_convert_into_store_and_list may have
    # stored it already, as tiny-hf: then the advice is to use that).
    with pytest.raises(OssMlxError, match=r"upstream gpt-oss checkpoint, not a converted model"
                                          r".*(oss-mlx convert .*tiny-hf|use --model tiny-hf)"):
        resolve_model(str(tiny_hf))


def fake_hub_cache(root: Path, repo: str, files: Path) -> Path:
    """The huggingface_hub cache layout: refs/main -> snapshots/<commit>/<files>."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    snap = d / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in files.iterdir():
        (snap / f.name).symlink_to(f)
    return snap


def test_hub_id_from_cache_offline(tiny_hf, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from oss_mlx.convert.convert import convert

    fake_hub_cache(tmp_path / "hub", "openai/gpt-oss-20b", tiny_hf)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = convert("openai/gpt-oss-20b", tmp_path / "m")
    man = json.loads((out / "manifest.json").read_text())
    assert man["source"] == "openai/gpt-oss-20b" and man["source_revision"] == "0" * 40


def test_hub_offline_and_no_network_errors(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from oss_mlx.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["convert", "openai/gpt-oss-20b", "-o", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert main(["convert", "openai/gpt-oss-20b", "-o", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreachable" in err
    assert not (tmp_path / "m").exists()


# ---- bad input: one line on stderr, exit 1, nothing left behind -------------------------


def copy_source(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_header(path: Path, edit) -> None:
    """Change a safetensors header in place (same data), e.g. to give a tensor a wrong shape."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    path.write_bytes(struct.pack("<Q", len(raw_header)) + raw_header + data[8 + n:])


def first_shard_with(folder: Path, name: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def bad_config(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))


def missing_shard(src):
    first_shard_with(src, "lm_head.weight").unlink()


def truncated_shard(src):
    f = first_shard_with(src, "lm_head.weight")
    f.write_bytes(f.read_bytes()[:-1000])


def corrupt_header(src):
    f = first_shard_with(src, "model.layers.1.self_attn.sinks")
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00not json at all\xff" * 2
    f.write_bytes(bytes(data))


def wrong_shape(src):
    def edit(h):
        h["model.layers.0.self_attn.sinks"]["shape"] = [2, 2]  # same bytes, wrong shape

    rewrite_header(first_shard_with(src, "model.layers.0.self_attn.sinks"), edit)


@pytest.mark.parametrize("damage,words", [
    (bad_config, "not a gpt-oss config"),
    (missing_shard, "missing shard"),
    (truncated_shard, "truncated"),
    (corrupt_header, "corrupt safetensors header"),
    (wrong_shape, "has shape [2, 2], expected [4]"),
])
def test_bad_input(sharded_hf, tmp_path, capsys, damage, words):
    from oss_mlx.cli import main

    src = copy_source(sharded_hf, tmp_path / "src")
    damage(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("oss-mlx: error: ") and err.count("\n") == 1 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no temporary folder


def test_out_exists_needs_force(tiny_hf, tmp_path, capsys):
    from oss_mlx.cli import main

    out = tmp_path / "out"
    assert main(["convert", str(tiny_hf), "-o", str(out)]) == 0
    stamp = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["convert", str(tiny_hf), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert (out / "manifest.json").read_text() == stamp
    assert main(["convert", str(tiny_hf), "-o", str(out), "--force", "--dense-bits", "8"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["dense"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # --force never deletes a folder that is not a converted model.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_hf), "-o", str(other), "--force"]) == 1
    assert (other / "keep.txt").read_text() == "mine"


def test_reconvert_and_convert_again_say_what_they_are(tiny_hf, tiny_model, tmp_path, capsys,
                                                      monkeypatch):
    """A converted folder given to convert is named as such; `oss-mlx convert tiny` when the
    store has `tiny` says how to use it (the advice `--model tiny` then works)."""
    from oss_mlx.cli import main
    from oss_mlx.store import resolve_model

    assert main(["convert", str(tiny_model), "-o", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert "is already a converted oss-mlx model: nothing to convert" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "again").exists()

    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").symlink_to(tiny_hf, target_is_directory=True)
    assert main(["convert", "tiny"]) == 0  # stored as `tiny`
    capsys.readouterr()
    assert main(["convert", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "already exists: use it with --model tiny " in err, err
    assert resolve_model("tiny") == tmp_path / "home" / "models" / "tiny"


def test_missing_source(tmp_path, capsys):
    from oss_mlx.cli import main

    assert main(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_vocabulary_sources_for_original_layout(tiny_original, tmp_path, monkeypatch, capsys):
    from oss_mlx.cli import main

    good = vocab_dir(tmp_path / "tk")
    genuine = (good / "o200k_base.tiktoken").read_bytes()
    assert hashlib.sha256(genuine).hexdigest() == O200K_SHA256
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(good))
    assert main(["convert", str(tiny_original), "-o", str(tmp_path / "a")]) == 0
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "TIKTOKEN_ENCODINGS_BASE" in man["vocabulary"]["from"]
    assert "no tokenizer.json" in capsys.readouterr().err  # it says where the vocabulary came from
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(genuine[:-10])
    assert main(["convert", str(tiny_original), "-o", str(tmp_path / "b"), "--vocab", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the genuine o200k_base" in err
    assert not (tmp_path / "b").exists()


def test_mlx_lm_reads_the_source_the_same_way(tiny_hf, tiny_model):
    """mlx-lm loads the synth HF checkpoint with its own sanitize (gate/up split by striding);
    its logits match our model on our conversion up to bf16 rounding."""
    pytest.importorskip("oss_mlx.model")
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx

    from oss_mlx import load

    ref_model, tok = mlx_lm.load(str(tiny_hf))
    assert tok.encode("Hello world", add_special_tokens=False) == [13225, 2375]
    x = mx.array([[200006, 173781, 200005, 13225, 2375, 0, 1, 2]])
    ref = ref_model(x).astype(mx.float32)
    ours = load(tiny_model)
    got = ours(x).astype(mx.float32)
    assert mx.array_equal(mx.argmax(ref, -1), mx.argmax(got, -1)).item()
    # The logits cannot match exactly (mlx-lm's YaRN rounds its ramp, docs/traps.md §6.1), so compare
    # what can: every weight mlx-lm read equals ours, value for value.
    from mlx.utils import tree_flatten

    theirs, mine = dict(tree_flatten(ref_model.parameters())), dict(tree_flatten(ours.parameters()))

    def same(a, b):
        f = (lambda t: t.astype(mx.float32)) if mx.issubdtype(a.dtype, mx.floating) else (lambda t: t)
        return a.shape == b.shape and mx.array_equal(f(a), f(b)).item()

    pairs = {"model.embed_tokens.weight": mine["embedding.weight"],
             "model.norm.weight": mine["norm.weight"], "lm_head.weight": mine["unembedding.weight"]}
    for n in range(L):
        p, q = f"model.layers.{n}.", f"layers.{n}."
        qkv_w, qkv_b = mine[q + "attention.qkv.weight"], mine[q + "attention.qkv.bias"]
        for name, (a, b) in zip("qkv", [(0, NQ * D), (NQ * D, (NQ + NKV) * D),
                                        ((NQ + NKV) * D, (NQ + 2 * NKV) * D)]):
            pairs[p + f"self_attn.{name}_proj.weight"] = qkv_w[a:b]
            pairs[p + f"self_attn.{name}_proj.bias"] = qkv_b[a:b]
        for theirs_name, ours_name in [
                ("self_attn.o_proj.weight", "attention.out.weight"),
                ("self_attn.o_proj.bias", "attention.out.bias"), ("self_attn.sinks", "attention.sinks"),
                ("input_layernorm.weight", "attention.norm.weight"),
                ("post_attention_layernorm.weight", "mlp.norm.weight"),
                ("mlp.router.weight", "mlp.router.weight"), ("mlp.router.bias", "mlp.router.bias"),
                ("mlp.experts.down_proj.weight", "mlp.experts.down.weight"),
                ("mlp.experts.down_proj.scales", "mlp.experts.down.scales")]:
            pairs[p + theirs_name] = mine[q + ours_name]
        # The loader joins each layer's expert biases into one [E, 2I + H] table: gate_up | down.
        bias = mine[q + "mlp.experts.bias"]
        pairs[p + "mlp.experts.down_proj.bias"] = bias[:, 2 * I:]
        for part in ("weight", "scales", "bias"):  # our gate rows first, then the up rows
            gate_up = bias[:, : 2 * I] if part == "bias" else mine[q + f"mlp.experts.gate_up.{part}"]
            pairs[p + f"mlp.experts.gate_proj.{part}"] = gate_up[:, :I]
            pairs[p + f"mlp.experts.up_proj.{part}"] = gate_up[:, I:]
    assert set(pairs) == set(theirs)
    for name, value in pairs.items():
        assert same(theirs[name], value), name


# ---- mlx-lm's gpt_oss folders (the mlx-community MXFP4-Q8 builds) -----------------------


@pytest.fixture(scope="module")
def mlx_lm_q8(tiny_hf, tmp_path_factory):
    """`tiny_hf` converted by mlx-lm's own code as the mlx-community builds are: experts kept
    mxfp4 (mlx-lm's sanitize), every dense module affine 8-bit group 64 (its router included)."""
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert
    out = tmp_path_factory.mktemp("mlx-lm") / "gpt-oss-tiny-MXFP4-Q8"
    mlx_lm_convert(str(tiny_hf), str(out), quantize=True, q_group_size=64, q_bits=8)
    return out


def _all_tensors(folder):
    import mlx.core as mx

    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


@pytest.mark.slow
def test_mlx_lm_folder_converts_losslessly(mlx_lm_q8, tiny_hf, tmp_path, capsys):
    """Every tensor equals, byte for byte, what our converter makes of the same source with
    --dense-bits 8; the 8-bit router (which ours keeps in bf16) is mlx-lm's own bytes; and the
    logits equal those of our conversion given that router."""
    import mlx.core as mx
    import mlx.nn as nn

    from oss_mlx import load
    from oss_mlx.convert.convert import convert
    from oss_mlx.errors import OssMlxError
    from oss_mlx.store import resolve_model

    with pytest.raises(OssMlxError, match=r"is an mlx-lm gpt_oss folder, not a converted model: "
                                          r"run `oss-mlx convert"):
        resolve_model(str(mlx_lm_q8))
    out = convert(mlx_lm_q8, tmp_path / "from-mlx-lm")
    assert "converting it losslessly (experts already mxfp4, dense weights kept affine 8-bit, " \
           "group 64)" in capsys.readouterr().err
    ref = convert(tiny_hf, tmp_path / "q8", dense_bits=8)
    dense = json.loads((out / "config.json").read_text())["quantization"]["dense"]
    assert dense == {"mode": "affine", "group_size": 64, "bits": 8, "modules": [
        "attention.out", "attention.qkv", "embedding", "mlp.router", "unembedding"]}

    got, want, src = _all_tensors(out), _all_tensors(ref), _all_tensors(mlx_lm_q8)
    routers = {k for k in got if ".mlp.router." in k and not k.endswith(".bias")}
    assert set(got) - routers == set(want) - {k for k in want if k.endswith("router.weight")}
    for k in sorted(set(got) - routers):
        assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item(), k
    for k in routers:
        assert mx.array_equal(got[k], src["model." + k]).item(), k

    x = mx.array([[200006, 173781, 200005, 13225, 2375, 0, 1, 2]])
    ours = load(ref)
    nn.quantize(ours, 64, 8, class_predicate=lambda p, m: p.endswith("mlp.router"))
    ours.load_weights([(k, got[k].astype(mx.float32) if got[k].dtype == mx.bfloat16 else got[k])
                       for k in routers], strict=False)
    assert mx.array_equal(load(out)(x), ours(x)).item()
    # And it is then a model folder like any other.
    assert resolve_model(str(out)) == out


@pytest.mark.subprocess
def test_sigterm_cleans_up_and_stale_partials_are_removed(tiny_hf, tmp_path, monkeypatch):
    """SIGTERM mid-write removes the temporary folder as Ctrl-C does; a later convert removes
    the temporary folders of dead processes (and keeps those of live ones)."""
    import os
    import signal
    import subprocess
    import sys

    from oss_mlx.checkpoint import safetensors as stio
    from oss_mlx.convert import convert as conv

    real = stio.write_shards

    def write_then_sigterm(folder, *a, **k):
        (folder / "half-written").write_bytes(b"x" * 100)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(folder, *a, **k)

    monkeypatch.setattr(conv.stio, "write_shards", write_then_sigterm)
    with pytest.raises(SystemExit) as e:
        conv.convert(tiny_hf, tmp_path / "out")
    assert e.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # no OUT, no .out.partial-PID
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    monkeypatch.undo()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".out.partial-{dead}" / "x").mkdir(parents=True)
    (tmp_path / f".other.partial-{dead}").mkdir()
    (tmp_path / f".kept.old-{dead}").mkdir()  # died between its renames: restored, not removed
    (tmp_path / f".busy.partial-{os.getppid()}").mkdir()  # a live process: left alone
    conv.convert(tiny_hf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".busy.partial-{os.getppid()}", "kept", "out"]


def test_layout_table_gives_each_tensor_its_dtype(tiny_model):
    """Per-tensor behaviour is data: every tensor the model loads has a row in the layout table,
    and is held in the dtype that row's `runtime` column says (float16 compute, so "compute"
    differs from the stored bf16)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from oss_mlx.checkpoint.layout import runtime_dtype
    from oss_mlx.model import load

    model = load(tiny_model, dtype="float16", lazy=True)
    want = {"float32": mx.float32, "stored": mx.bfloat16, "compute": mx.float16,
            "experts": model.precision.experts}
    seen = set()
    for name, a in tree_flatten(model.parameters()):
        # The loader joins each layer's gate_up and down biases into one table (one gather).
        name = name.replace(".experts.bias", ".experts.down.bias")
        if mx.issubdtype(a.dtype, mx.floating):
            rule = runtime_dtype(name)
            seen.add(rule)
            assert a.dtype == want[rule], (name, a.dtype, rule)
    assert seen == set(want)

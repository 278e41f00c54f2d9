"""`oss-mlx synth`: upstream names, shapes, dtypes, configs, sharding and tokenizer files,
checked against the tables of docs/checkpoint.md §2-4 and docs/harmony.md §5.1 with independent readers (safetensors,
tokenizers, openai-harmony)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from support.reference import mxfp4_dequant
from support.scripted import vocab_dir

# docs/checkpoint.md §3.1 (HF) / §3.2 (original) per-layer tables, as functions of the dimensions.
def hf_layer(E, H, I, D, nq, nkv):
    return {
        "input_layernorm.weight": ("BF16", [H]),
        "self_attn.q_proj.weight": ("BF16", [nq * D, H]), "self_attn.q_proj.bias": ("BF16", [nq * D]),
        "self_attn.k_proj.weight": ("BF16", [nkv * D, H]), "self_attn.k_proj.bias": ("BF16", [nkv * D]),
        "self_attn.v_proj.weight": ("BF16", [nkv * D, H]), "self_attn.v_proj.bias": ("BF16", [nkv * D]),
        "self_attn.o_proj.weight": ("BF16", [H, nq * D]), "self_attn.o_proj.bias": ("BF16", [H]),
        "self_attn.sinks": ("BF16", [nq]),
        "post_attention_layernorm.weight": ("BF16", [H]),
        "mlp.router.weight": ("BF16", [E, H]), "mlp.router.bias": ("BF16", [E]),
        "mlp.experts.gate_up_proj_blocks": ("U8", [E, 2 * I, H // 32, 16]),
        "mlp.experts.gate_up_proj_scales": ("U8", [E, 2 * I, H // 32]),
        "mlp.experts.gate_up_proj_bias": ("BF16", [E, 2 * I]),
        "mlp.experts.down_proj_blocks": ("U8", [E, H, I // 32, 16]),
        "mlp.experts.down_proj_scales": ("U8", [E, H, I // 32]),
        "mlp.experts.down_proj_bias": ("BF16", [E, H]),
    }


def original_layer(E, H, I, D, nq, nkv):
    qkv = (nq + 2 * nkv) * D
    return {
        "attn.norm.scale": ("BF16", [H]),
        "attn.qkv.weight": ("BF16", [qkv, H]), "attn.qkv.bias": ("BF16", [qkv]),
        "attn.sinks": ("BF16", [nq]),
        "attn.out.weight": ("BF16", [H, nq * D]), "attn.out.bias": ("BF16", [H]),
        "mlp.norm.scale": ("BF16", [H]),
        "mlp.gate.weight": ("BF16", [E, H]), "mlp.gate.bias": ("BF16", [E]),
        "mlp.mlp1_weight.blocks": ("U8", [E, 2 * I, H // 32, 16]),
        "mlp.mlp1_weight.scales": ("U8", [E, 2 * I, H // 32]),
        "mlp.mlp1_bias": ("BF16", [E, 2 * I]),
        "mlp.mlp2_weight.blocks": ("U8", [E, H, I // 32, 16]),
        "mlp.mlp2_weight.scales": ("U8", [E, H, I // 32]),
        "mlp.mlp2_bias": ("BF16", [E, H]),
    }


def expected(layout, L, E, H=64, I=64, D=64, nq=4, nkv=2, V=201088):
    if layout == "hf":
        out = {"model.embed_tokens.weight": ("BF16", [V, H]), "model.norm.weight": ("BF16", [H]),
               "lm_head.weight": ("BF16", [V, H])}
        for n in range(L):
            out.update({f"model.layers.{n}.{k}": v for k, v in hf_layer(E, H, I, D, nq, nkv).items()})
    else:
        out = {"embedding.weight": ("BF16", [V, H]), "norm.scale": ("BF16", [H]),
               "unembedding.weight": ("BF16", [V, H])}
        for n in range(L):
            out.update({f"block.{n}.{k}": v for k, v in original_layer(E, H, I, D, nq, nkv).items()})
    return out


def headers(folder: Path) -> dict:
    """{name: (dtype, shape)} over every safetensors file, read by the safetensors library."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "numpy") as s:
            for k in s.keys():
                sl = s.get_slice(k)
                out[k] = (sl.get_dtype(), list(sl.get_shape()))
    return out


def raw(folder: Path) -> dict:
    """{name: np.ndarray} with bf16 read as uint16 bits (mx.load is independent of our writer)."""
    import mlx.core as mx

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            out[k] = np.array(v.view(mx.uint16)) if v.dtype == mx.bfloat16 else np.array(v)
    return out


def test_tiny_hf_layout(tiny_hf):
    got = headers(tiny_hf)
    assert len(got) == 19 * 4 + 3
    assert got == expected("hf", L=4, E=8)
    files = sorted(p.name for p in tiny_hf.iterdir())
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja"]:
        assert f in files


def test_tiny_original_layout(tiny_original):
    got = headers(tiny_original)
    assert len(got) == 15 * 4 + 3
    assert got == expected("original", L=4, E=8)
    assert sorted(p.name for p in tiny_original.iterdir()) == ["config.json", "dtypes.json",
                                                               "model.safetensors"]
    tags = json.loads((tiny_original / "dtypes.json").read_text())
    assert set(tags) == set(got)
    for k, v in tags.items():
        assert v == ("FP4" if k.endswith(".blocks") else "UE8" if k.endswith(".scales") else "BF16")


def test_full_size_tables_match_spec():
    """The real 20b/120b tables (docs/checkpoint.md §3.1/3.2) without writing 13 GB: the generator's plan."""
    from oss_mlx.checkpoint import layout
    from oss_mlx.config import PRESETS

    for preset, L, E in [("20b", 24, 32), ("120b", 36, 128)]:
        cfg = PRESETS[preset]
        for lay in ("hf", "original"):
            plan = {k: (d, list(s)) for k, (d, s) in layout.upstream_tensors(cfg, lay).items()}
            assert plan == expected(lay, L=L, E=E, H=2880, I=2880, D=64, nq=64, nkv=8)
    plan = layout.upstream_tensors(PRESETS["20b"], "hf")
    assert len(plan) == 459
    assert plan["model.layers.0.mlp.experts.gate_up_proj_blocks"] == ("U8", (32, 5760, 90, 16))
    orig = layout.upstream_tensors(PRESETS["20b"], "original")
    assert len(orig) == 363
    nbytes = sum(math.prod(s) * (2 if d == "BF16" else 1) for d, s in orig.values())
    assert abs(nbytes / 1e9 - 13.76) < 0.01  # published original/model.safetensors size


def test_configs(tiny_hf, tiny_original):
    from oss_mlx.config import PRESETS
    from oss_mlx.convert.synth import hf_config, original_config

    orig = json.loads((tiny_original / "config.json").read_text())
    assert orig == {"num_hidden_layers": 4, "num_experts": 8, "experts_per_token": 4,
                    "vocab_size": 201088, "hidden_size": 64, "intermediate_size": 64,
                    "swiglu_limit": 7.0, "head_dim": 64, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "sliding_window": 8, "initial_context_length": 4096,
                    "rope_theta": 150000, "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1,
                    "rope_ntk_beta": 32}
    # docs/checkpoint.md §2.2/2.1 derived checks: the published 20b files are 376 and 1806 bytes.
    assert len(json.dumps(original_config(PRESETS["20b"]))) == 376
    assert len(json.dumps(hf_config(PRESETS["20b"]), indent=2) + "\n") == 1806
    hf = json.loads((tiny_hf / "config.json").read_text())
    assert hf["model_type"] == "gpt_oss" and hf["architectures"] == ["GptOssForCausalLM"]
    assert hf["num_local_experts"] == 8 and hf["num_experts_per_tok"] == 4
    assert hf["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert hf["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                  "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                  "truncate": False}
    assert hf["quantization_config"]["quant_method"] == "mxfp4"
    assert (hf["eos_token_id"], hf["pad_token_id"], hf["sliding_window"]) == (200002, 199999, 8)
    assert hf["max_position_embeddings"] == 131072 and hf["tie_word_embeddings"] is False
    gen = (tiny_hf / "generation_config.json").read_text()
    assert json.loads(gen) == {"bos_token_id": 199998, "do_sample": True,
                               "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999,
                               "transformers_version": "4.55.0.dev0"}
    assert len(gen) == 177  # published size (docs/checkpoint.md §2.3)


def test_same_seed_same_values_in_both_layouts(tiny_hf, tiny_original):
    hf, orig = raw(tiny_hf), raw(tiny_original)
    assert np.array_equal(hf["model.embed_tokens.weight"], orig["embedding.weight"])
    assert np.array_equal(hf["lm_head.weight"], orig["unembedding.weight"])
    for n in range(4):
        h, o = f"model.layers.{n}.", f"block.{n}."
        for part in ("weight", "bias"):
            qkv = np.concatenate([hf[h + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            assert np.array_equal(qkv, orig[o + f"attn.qkv.{part}"])
        assert np.array_equal(hf[h + "mlp.experts.gate_up_proj_blocks"], orig[o + "mlp.mlp1_weight.blocks"])
        assert np.array_equal(hf[h + "mlp.experts.down_proj_scales"], orig[o + "mlp.mlp2_weight.scales"])
        assert np.array_equal(hf[h + "mlp.router.bias"], orig[o + "mlp.gate.bias"])


def test_seed_and_layers(tmp_path):
    from oss_mlx.convert.synth import synth

    a = raw(synth(tmp_path / "a", layout="original", seed=1, layers=1))
    b = raw(synth(tmp_path / "b", layout="original", seed=2, layers=1))
    assert len(a) == 15 + 3
    assert not np.array_equal(a["block.0.attn.qkv.weight"], b["block.0.attn.qkv.weight"])


def test_sharded_hf_is_zero_based_with_index(tmp_path):
    from oss_mlx.convert.synth import synth

    out = synth(tmp_path / "s", preset="tiny", layout="hf", max_shard_bytes=20_000_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00002.safetensors" for i in range(3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = headers(out)
    assert set(index["weight_map"]) == set(got) and len(got) == 19 * 4 + 3
    sizes = {"BF16": 2, "U8": 1}
    assert index["metadata"]["total_size"] == sum(math.prod(s) * sizes[d] for d, s in got.values())
    for name, f in index["weight_map"].items():
        with safe_open(out / f, "numpy") as s:
            assert name in s.keys()


def test_values_are_scaled(tiny_original):
    """Activations O(1): unit embeddings, expert weights with std ~ 1/sqrt(fan_in), logits ~ 2 std."""
    w = raw(tiny_original)
    bf16 = lambda a: (a.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    assert 0.9 < bf16(w["embedding.weight"]).std() < 1.1
    assert 1.5 < bf16(w["unembedding.weight"]).std() * 8 < 2.5  # x unit RMS, H = 64
    gate_up = mxfp4_dequant(w["block.0.mlp.mlp1_weight.blocks"], w["block.0.mlp.mlp1_weight.scales"])
    assert gate_up.shape == (8, 128, 64)
    assert 0.5 / 8 < gate_up.std() < 2 / 8  # 1/sqrt(64)
    assert len(np.unique(w["block.0.mlp.mlp1_weight.scales"])) == 3  # jittered scales


@pytest.fixture(scope="module")
def o200k_folder(tmp_path_factory):
    return vocab_dir(tmp_path_factory.mktemp("tiktoken"))


TEXT = ("Hello world! I'm THERE's über-cool 12345 çé 你好  \n\n\t  ¿qué? 🤖🤖 def f(x):\n"
        "    return x**2  # comment\r\n")


def test_tokenizer_json_matches_harmony(tiny_hf, o200k_folder, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(o200k_folder))
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    tok = tokenizers.Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    text = TEXT + Path(json.__file__).read_text()[:20000]
    assert tok.encode(text, add_special_tokens=False).ids == enc.encode(text, allowed_special=set())
    assert tok.decode(enc.encode(TEXT, allowed_special=set())) == TEXT
    for name, i in [("<|start|>", 200006), ("<|channel|>", 200005), ("<|message|>", 200008),
                    ("<|end|>", 200007), ("<|return|>", 200002), ("<|call|>", 200012),
                    ("<|constrain|>", 200003), ("<|startoftext|>", 199998),
                    ("<|endoftext|>", 199999), ("<|reserved_201087|>", 201087)]:
        assert tok.token_to_id(name) == i
    assert tok.get_vocab_size() == 201088
    assert tok.encode("<|start|>assistant", add_special_tokens=False).ids == [200006, 173781]


def test_transformers_loads_tokenizer_and_template(tiny_hf, o200k_folder, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(o200k_folder))
    from openai_harmony import (Conversation, HarmonyEncodingName, Message, Role, SystemContent,
                                load_harmony_encoding)

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_hf))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (199998, 200002, 199999)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                  add_generation_prompt=True, tokenize=False)
    ids = tok.encode(ids, add_special_tokens=False)
    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    date = tok.decode(ids).split("Current date: ")[1][:10]  # transformers provides strftime_now
    conv = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_conversation_start_date(date)),
        Message.from_role_and_content(Role.USER, "What is 2 + 2?")])
    assert ids == enc.render_conversation_for_completion(conv, Role.ASSISTANT)


def test_chat_template_tool_call_matches_harmony(tiny_hf, o200k_folder, monkeypatch):
    """Instructions, a function tool, an analysis + tool call turn and the tool's result render
    as openai-harmony renders the same conversation."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(o200k_folder))
    from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyEncodingName,
                                Message, Role, SystemContent, ToolDescription,
                                load_harmony_encoding)

    params = {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["c", "f"]}}}
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "description": "Gets the weather.", "parameters": params}}]
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "need tool", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather",
                                                  "arguments": {"location": "Paris"}}}]},
            {"role": "tool", "name": "get_weather", "content": '{"sunny": true}'}]
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_hf))
    text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    date = text.split("Current date: ")[1][:10]
    dev = DeveloperContent.new().with_instructions("Be brief.").with_function_tools(
        [ToolDescription.new("get_weather", "Gets the weather.", parameters=params)])
    conv = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_conversation_start_date(date)),
        Message.from_role_and_content(Role.DEVELOPER, dev),
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        Message.from_role_and_content(Role.ASSISTANT, "need tool").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, '{"location": "Paris"}')
        .with_channel("commentary").with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"sunny": true}')
        .with_recipient("assistant").with_channel("commentary")])
    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    assert text == enc.decode(enc.render_conversation_for_completion(conv, Role.ASSISTANT))


def test_cli(tmp_path, capsys):
    from oss_mlx.cli import main

    out = tmp_path / "c"
    assert main(["synth", str(out), "--preset", "tiny", "--layers", "1", "--layout", "original",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert main(["synth", str(out)]) == 1  # exists: one line, untouched
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["synth", str(tmp_path / "d"), "--layers", "0"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]

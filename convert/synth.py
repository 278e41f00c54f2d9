"""`oss-mlx synth`: write a random-weight gpt-oss checkpoint in an exact upstream layout.

The project's stand-in for the real checkpoints in tests, benchmarks and demos: same tensor
names, shapes, dtypes, MXFP4 expert encoding, sharding, configs and tokenizer files as
`openai/gpt-oss-{20b,120b}` (docs/checkpoint.md §2-4), with random values.

- Every tensor gets its own random stream, seeded by (seed, tensor name), and is generated in
  fixed-size row chunks: the values do not depend on the layout (HF's q/k/v are row slices of
  the original fused qkv) and a full-size model is written tensor by tensor in bounded memory.
- Scales keep a forward pass well-behaved: unit-RMS residual stream, matmul weights with std
  about 1/sqrt(fan_in) (MXFP4 block scales 2^-k picked for that), and an unembedding giving
  logits with std about 2, so the largest of 201088 logits is about 10.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import replace
from functools import lru_cache
from statistics import NormalDist
from pathlib import Path

import numpy as np

from oss_mlx.config import PRESETS, PRESET_HELP, ModelConfig
from oss_mlx.errors import OssMlxError

from oss_mlx.checkpoint import layout as L
from oss_mlx.checkpoint import files
from oss_mlx.checkpoint import safetensors as stio
from oss_mlx.convert.progress import Progress
from oss_mlx.checkpoint import vocab

# Upstream shard sizes (docs/checkpoint.md §2.4): HF 4.8e9 bytes, 0-based names; original 120b has 7 shards.
HF_SHARD_BYTES = 4_800_000_000
ORIGINAL_SHARD_BYTES = 10_000_000_000
CHUNK_ELEMS = 1 << 24

# The original config keys, in upstream order (docs/checkpoint.md §2.2).
ORIGINAL_KEYS = ["num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
                 "hidden_size", "intermediate_size", "swiglu_limit", "head_dim",
                 "num_attention_heads", "num_key_value_heads", "sliding_window",
                 "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
                 "rope_ntk_beta"]
FLOAT_KEYS = {"swiglu_limit", "rope_scaling_factor"}


def original_config(cfg: ModelConfig) -> dict:
    d = cfg.to_dict()
    return {k: (float(d[k]) if k in FLOAT_KEYS else int(d[k])) for k in ORIGINAL_KEYS}


def hf_config(cfg: ModelConfig) -> dict:
    """config.json of the HF repo root (docs/checkpoint.md §2.1), with this model's dimensions."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": cfg.experts_per_token,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initial_context_length": cfg.initial_context_length,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_types": ["sliding_attention" if cfg.is_sliding(i) else "full_attention"
                        for i in range(cfg.num_hidden_layers)],
        "max_position_embeddings": cfg.max_context,
        "model_type": "gpt_oss",
        "num_attention_heads": cfg.num_attention_heads,
        "num_experts_per_tok": cfg.experts_per_token,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_local_experts": cfg.num_experts,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": {
            "beta_fast": float(cfg.rope_ntk_beta),
            "beta_slow": float(cfg.rope_ntk_alpha),
            "factor": float(cfg.rope_scaling_factor),
            "original_max_position_embeddings": cfg.initial_context_length,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": int(cfg.rope_theta),
        "router_aux_loss_coef": 0.9,
        "sliding_window": cfg.sliding_window,
        "swiglu_limit": float(cfg.swiglu_limit),
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True,
                     "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999,
                     "transformers_version": "4.55.0.dev0"}


def tokenizer_config() -> dict:
    return {
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in vocab.special_tokens().items()
        },
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|return|>",
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


SPECIAL_TOKENS_MAP = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>",
                      "pad_token": "<|endoftext|>"}


# ---- random values ----------------------------------------------------------------------


@lru_cache(maxsize=None)
def _normal_table(mean: float, std: float) -> np.ndarray:
    """bf16 bits of the 65536 quantiles of N(mean, std^2) at (k + 0.5) / 65536.

    Indexing it with uniform random uint16 draws from the normal distribution (discretized to
    65536 levels, tails cut at 4.3 std) about 5x faster than `standard_normal` + rounding,
    which matters for the 1.8 G dense values of a 20b checkpoint.
    """
    inv = NormalDist(mean, std).inv_cdf
    x = np.array([inv((k + 0.5) / 65536) for k in range(65536)], dtype=np.float32)
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def _rule(name: str, cfg: ModelConfig):
    """How tensor `name` (our name) is drawn: the `init` column of the layout table."""
    return L.spec(name).init(cfg)


def generate(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int):
    """Chunks (numpy, split along axis 0) of tensor `name`'s values, as stored on disk."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rule = _rule(name, cfg)
    row = math.prod(shape[1:])
    rows = max(1, CHUNK_ELEMS // max(row, 1))
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        if rule[0] == "normal":
            idx = np.frombuffer(rng.bytes(2 * n * row), dtype=np.uint16)
            yield _normal_table(rule[1], rule[2])[idx]
        elif rule[0] == "bytes":
            yield np.frombuffer(rng.bytes(n * row), dtype=np.uint8)
        else:  # E8M0 scales jittered by one binade so the scale decoding is exercised
            yield (rng.integers(-1, 2, n * row, dtype=np.int16) + rule[1]).astype(np.uint8)


def _jobs(cfg: ModelConfig, layout: str, seed: int) -> list[stio.Job]:
    jobs = []
    for ours, orig, hf, dtype, shape in L.entries(cfg):
        produce = (lambda ours=ours, shape=shape: generate(ours, shape, cfg, seed))
        names = L.upstream_parts(cfg, layout, orig, hf, shape)
        jobs.append(stio.Job([stio.TensorInfo(n, dtype, s) for n, s in names], produce))
    return jobs


def _check_out(out: Path, force: bool) -> None:
    """`--force` replaces a checkpoint (or an empty folder), never a file or another folder."""
    from oss_mlx.store import checkpoint_kind

    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise OssMlxError(f"{out} already exists (use --force to replace it)")
    if not out.is_dir():
        raise OssMlxError(f"{out} is a file; --force replaces a checkpoint folder, not a file: "
                          "choose another OUT")
    if any(out.iterdir()) and checkpoint_kind(out) != "an upstream gpt-oss checkpoint":
        raise OssMlxError(f"{out} exists and is not a gpt-oss checkpoint; not replacing it: "
                          "choose another OUT")


def synth(out, preset: str = "tiny", layout: str = "hf", layers: int | None = None,
          seed: int = 0, force: bool = False, max_shard_bytes: int | None = None,
          config: ModelConfig | None = None) -> Path:
    """Write a random-weight checkpoint to `out` and return its path.

    layout "hf": `out` is an HF repo root (configs, sharded safetensors + index, tokenizer files).
    layout "original": `out` is the content of `original/` (config.json, dtypes.json,
    model.safetensors), with no tokenizer. Same seed => same values in both layouts.
    `max_shard_bytes` overrides the preset's sharding (tests use it to get several shards);
    `config` replaces the preset's dimensions altogether (a shape no preset has).
    """
    if config is None and preset not in PRESETS:
        raise OssMlxError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if layout not in ("hf", "original"):
        raise OssMlxError(f"unknown layout {layout!r} (choose hf or original)")
    cfg = config or PRESETS[preset]
    if layers is not None:
        if layers < 1:
            raise OssMlxError("--layers must be at least 1")
        cfg = replace(cfg, num_hidden_layers=layers)
    out = Path(out).expanduser()
    _check_out(out, force)

    jobs = _jobs(cfg, layout, seed)
    total = sum(j.nbytes for j in jobs)
    files.disk_check(out.parent, total + (30 << 20))
    big = total > 1_000_000_000
    with files.AtomicFolder(out, replace=force) as tmp:
        if layout == "hf":
            limit = max_shard_bytes or (HF_SHARD_BYTES if big else None)
            _write_json(tmp / "config.json", hf_config(cfg))
            _write_json(tmp / "generation_config.json", GENERATION_CONFIG)
            _write_json(tmp / "tokenizer_config.json", tokenizer_config())
            _write_json(tmp / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
            (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
            (tmp / "tokenizer.json").write_bytes(vocab.tokenizer_json().read_bytes())
            name = lambda i, n: f"model-{i:05d}-of-{n - 1:05d}.safetensors"  # noqa: E731
        else:
            limit = max_shard_bytes or (ORIGINAL_SHARD_BYTES if total > ORIGINAL_SHARD_BYTES else None)
            (tmp / "config.json").write_text(json.dumps(original_config(cfg)))
            _write_json(tmp / "dtypes.json", {
                t.name: ("FP4" if t.name.endswith(".blocks") else
                         "UE8" if t.name.endswith(".scales") else t.dtype)
                for j in jobs for t in j.tensors})
            name = lambda i, n: f"model--{i + 1:05d}-of-{n:05d}.safetensors"  # noqa: E731
        with Progress(total, f"synth {preset} ({layout})") as advance:
            if limit is None:
                stio.write_shards(tmp, jobs, total + 1, lambda i, n: "model.safetensors",
                                  metadata={"format": "pt"}, index=None, on_bytes=advance)
            else:
                stio.write_shards(tmp, jobs, limit, name, metadata={"format": "pt"},
                                  on_bytes=advance)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# A harmony chat template (docs/harmony.md §5.2-5.5): system message as harmony renders it, a leading
# system/developer message as developer instructions, function tools, past assistant turns as
# final answers (with analysis only for a pending tool call), tool results on commentary.
CHAT_TEMPLATE = r"""{#- gpt-oss harmony chat template (oss-mlx synth). All text is emitted by
    expressions so the output does not depend on the trim_blocks/lstrip_blocks settings. -#}
{%- macro render_type(p) -%}
    {%- if p.enum is defined -%}{{- '"' + (p.enum | join('" | "')) + '"' -}}
    {%- elif p.type == "integer" or p.type == "number" -%}{{- "number" -}}
    {%- elif p.type == "array" -%}{{- (render_type(p['items']) if p['items'] is defined else "any") + "[]" -}}
    {%- elif p.type is defined -%}{{- p.type -}}
    {%- else -%}{{- "any" -}}{%- endif -%}
{%- endmacro -%}
{%- macro render_tools(tools) -%}
    {{- "## functions\n\nnamespace functions {\n\n" -}}
    {%- for t in tools -%}
        {%- set f = t.function if t.function is defined else t -%}
        {{- "// " + f.description + "\n" -}}
        {%- if f.parameters is defined and f.parameters.properties -%}
            {{- "type " + f.name + " = (_: {\n" -}}
            {%- for k, p in f.parameters.properties.items() -%}
                {%- if p.description is defined -%}{{- "// " + p.description + "\n" -}}{%- endif -%}
                {{- k + ("" if k in (f.parameters.required or []) else "?") + ": " + render_type(p) + ",\n" -}}
            {%- endfor -%}
            {{- "}) => any;\n\n" -}}
        {%- else -%}
            {{- "type " + f.name + " = () => any;\n\n" -}}
        {%- endif -%}
    {%- endfor -%}
    {{- "} // namespace functions" -}}
{%- endmacro -%}
{{- "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06" -}}
{%- if strftime_now is defined -%}{{- "\nCurrent date: " + strftime_now("%Y-%m-%d") -}}{%- endif -%}
{{- "\n\nReasoning: " + (reasoning_effort | default("medium")) -}}
{{- "\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message." -}}
{%- if tools -%}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{%- endif -%}
{{- "<|end|>" -}}
{%- set msgs = messages -%}
{%- set ns = namespace(instructions=none, last_final=-1) -%}
{%- if msgs and msgs[0].role in ("system", "developer") -%}
    {%- set ns.instructions = msgs[0].content -%}
    {%- set msgs = msgs[1:] -%}
{%- endif -%}
{%- if ns.instructions or tools -%}
    {{- "<|start|>developer<|message|>" -}}
    {%- if ns.instructions -%}{{- "# Instructions\n\n" + ns.instructions -}}{%- endif -%}
    {%- if tools -%}
        {%- if ns.instructions -%}{{- "\n\n" -}}{%- endif -%}
        {{- "# Tools\n\n" + render_tools(tools) -}}
    {%- endif -%}
    {{- "<|end|>" -}}
{%- endif -%}
{%- for m in msgs -%}
    {%- if m.role == "assistant" and not m.tool_calls -%}{%- set ns.last_final = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in msgs -%}
    {%- if m.role == "user" -%}
        {{- "<|start|>user<|message|>" + m.content + "<|end|>" -}}
    {%- elif m.role == "assistant" and m.tool_calls -%}
        {%- set thinking = m.thinking or m.reasoning_content -%}
        {%- if thinking and loop.index0 > ns.last_final -%}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + thinking + "<|end|>" -}}
        {%- endif -%}
        {%- for c in m.tool_calls -%}
            {%- set f = c.function if c.function is defined else c -%}
            {{- "<|start|>assistant to=functions." + f.name + "<|channel|>commentary <|constrain|>json<|message|>" -}}
            {{- f.arguments if f.arguments is string else (f.arguments | tojson) -}}
            {{- "<|call|>" -}}
        {%- endfor -%}
    {%- elif m.role == "assistant" -%}
        {{- "<|start|>assistant<|channel|>final<|message|>" + m.content + "<|end|>" -}}
    {%- elif m.role == "tool" -%}
        {{- "<|start|>functions." + (m.name | default("tool")) + " to=assistant<|channel|>commentary<|message|>" + m.content + "<|end|>" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|start|>assistant" -}}{%- endif -%}"""


# ---- `oss-mlx synth` --------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to create")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help=f"model dimensions: {PRESET_HELP} (default: tiny)")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="keep only the first N layers (default: the preset's)")
    parser.add_argument("--layout", choices=["hf", "original"], default="hf",
                        help="hf: HF repo root; original: the `original/` folder")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the random weights (the same weights in both layouts)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def main(args) -> int:
    out = synth(args.out, preset=args.preset, layout=args.layout, layers=args.layers,
                seed=args.seed, force=args.force)
    print(out)
    return 0

"""Model configuration: one internal dataclass, read from either upstream config, the model
shapes oss-mlx knows (PRESETS), and the one reader of a converted folder's config.json.

Field names are exactly the keys of the `original/config.json` layout (OpenAI's
`ModelConfig`, docs/checkpoint.md §2.2), with the 120b values as defaults; the few constants
that upstream hard-codes (eps, swiglu alpha) are fields too so the model never hides a literal.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from oss_mlx.errors import OssMlxError


@dataclass
class ModelConfig:
    num_hidden_layers: int = 36
    num_experts: int = 128
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    # Not in the original config; upstream hard-codes them (docs/model.md §1.1, docs/checkpoint.md §2.2).
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702

    @property
    def max_context(self) -> int:
        """Reference context length: initial_context_length * rope_scaling_factor (131072)."""
        return int(self.initial_context_length * self.rope_scaling_factor)

    def is_sliding(self, layer: int) -> bool:
        """Even layers use the sliding window, odd layers full attention (docs/model.md §1.5)."""
        return layer % 2 == 0

    @property
    def yarn_concentration(self) -> float:
        return 0.1 * math.log(self.rope_scaling_factor) + 1.0

    # ---- (de)serialisation -------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_original(cls, d: dict) -> "ModelConfig":
        """`original/config.json`: exactly OpenAI's ModelConfig keys."""
        required = {f.name for f in dataclasses.fields(cls)} - {"rms_norm_eps", "swiglu_alpha"}
        missing = sorted(required - d.keys())
        if missing:
            raise OssMlxError(f"not a gpt-oss original config: missing {', '.join(missing)}")
        return cls.from_dict(d)

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Hugging Face `config.json` (model_type gpt_oss)."""
        if d.get("model_type") != "gpt_oss":
            raise OssMlxError(
                f"not a gpt-oss config: model_type is {d.get('model_type')!r}, expected 'gpt_oss'"
            )
        try:
            rs = d["rope_scaling"]
            return cls(
                num_hidden_layers=d["num_hidden_layers"],
                num_experts=d["num_local_experts"],
                experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                swiglu_limit=d.get("swiglu_limit", 7.0),
                head_dim=d["head_dim"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d["num_key_value_heads"],
                sliding_window=d["sliding_window"],
                initial_context_length=rs.get(
                    "original_max_position_embeddings", d.get("initial_context_length", 4096)
                ),
                rope_theta=d["rope_theta"],
                rope_scaling_factor=rs["factor"],
                rope_ntk_alpha=rs.get("beta_slow", 1.0),
                rope_ntk_beta=rs.get("beta_fast", 32.0),
                rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            )
        except (KeyError, TypeError) as e:
            raise OssMlxError(f"not a gpt-oss config: missing or malformed key {e}") from None


# ---- the shapes oss-mlx knows ----------------------------------------------------------------

PRESETS = {
    # Unit tests: every mechanism (window 8, 4 layers, 8 experts top-4) at toy widths.
    "tiny": ModelConfig(num_hidden_layers=4, num_experts=8, experts_per_token=4, hidden_size=64,
                        intermediate_size=64, head_dim=64, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=8),
    "small": ModelConfig(num_hidden_layers=8, num_experts=16, experts_per_token=4, hidden_size=512,
                         intermediate_size=512, head_dim=64, num_attention_heads=8,
                         num_key_value_heads=2, sliding_window=128),
    # The published models (docs/model.md §1.1).
    "20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    # The 20b's layer structure (24 layers, sliding/full, sinks, 32 experts top-4, window 128)
    # at small widths and a small vocabulary: decode is bound by kernel count, not bytes (the
    # latency-bound benchmark, benchmarks/README.md).
    "narrow": ModelConfig(num_hidden_layers=24, num_experts=32, experts_per_token=4,
                          vocab_size=4096, hidden_size=128, intermediate_size=128, head_dim=64,
                          num_attention_heads=8, num_key_value_heads=2, sliding_window=128),
    "120b": ModelConfig(num_hidden_layers=36, num_experts=128),
}
PRESET_HELP = ("tiny (unit tests: 4 layers, width 64, window 8), small (8 layers, width 512), "
               "20b and 120b (the published shapes), narrow (the 20b's 24 layers and 32 "
               "experts at width 128 with a 4,096-token vocabulary: decode bound by kernel "
               "count)")


# ---- a converted folder's config.json --------------------------------------------------------

FORMAT = "oss-mlx"  # config.json["format"] of a folder `oss-mlx convert` wrote


class NotAModelFolder(OssMlxError):
    """The folder has no oss-mlx config.json: it is something else (or nothing)."""


class BrokenModelFolder(OssMlxError):
    """The folder says it is an oss-mlx model, but its config.json cannot be used."""


@dataclass
class ModelFolder:
    """A converted model folder's config.json: the model's config and the whole file (`meta`:
    format, quantization, dtype)."""

    path: Path
    config: ModelConfig
    meta: dict

    @property
    def quantization(self) -> dict:
        return self.meta.get("quantization") or {}

    @property
    def dense_modules(self) -> dict[str, dict]:
        """{module: {"mode", "group_size", "bits"}} of the quantized dense modules (see
        dense_modules())."""
        return dense_modules(self.quantization.get("dense"))

    @property
    def dense_label(self) -> str:
        """"bf16", or "8-bit" / "4-bit" for affine-quantized dense weights (the bits most
        quantized modules have)."""
        bits = dense_bits(self.quantization.get("dense"))
        return "bf16" if bits == 16 else f"{bits}-bit"


# config.json's quantization.dense, in one of two forms (docs/checkpoint.md §3.4):
#   uniform: {"mode", "group_size", "bits", "modules": [module, ...]}: every listed module alike
#            (`oss-mlx convert --dense-bits N`, an mlx-lm folder quantized alike throughout);
#   per module: {"modules": {module: {"mode", "group_size", "bits"}}}: each module as it was
#            stored (an mlx-lm folder from `mlx_lm.convert -q`: 4-bit, its router 8-bit).
# A module is our name without its layer (`attention.qkv`, `mlp.router`, `embedding`).


def dense_modules(dense) -> dict[str, dict]:
    """{module: {"mode", "group_size", "bits"}} from quantization.dense in either form ({} for
    bf16 dense weights); ValueError when it is neither."""
    if not dense:
        return {}
    if not isinstance(dense, dict) or "modules" not in dense:
        raise ValueError(f"quantization.dense is not understood: {dense!r}")
    modules = dense["modules"]
    if isinstance(modules, list):
        params = {"mode": dense.get("mode", "affine"), "group_size": dense.get("group_size"),
                  "bits": dense.get("bits")}
        out = {m: dict(params) for m in modules}
    elif isinstance(modules, dict):
        out = {m: {"mode": q.get("mode", "affine"), "group_size": q.get("group_size"),
                   "bits": q.get("bits")} if isinstance(q, dict) else q
               for m, q in modules.items()}
    else:
        raise ValueError(f"quantization.dense.modules is not understood: {modules!r}")
    for m, q in out.items():
        if not (isinstance(m, str) and isinstance(q, dict) and isinstance(q["group_size"], int)
                and isinstance(q["bits"], int) and isinstance(q["mode"], str)):
            raise ValueError(f"quantization.dense: module {m!r} has no mode, group size and "
                             f"bits ({q!r})")
    return out


def dense_bits(dense) -> int:
    """16 for bf16 dense weights, else the bits most quantized modules have."""
    modules = dense_modules(dense)
    if isinstance(dense, dict) and isinstance(dense.get("modules"), list):
        return dense["bits"]  # the uniform form says it
    if not modules:
        return 16
    counts: dict[int, int] = {}
    for q in modules.values():
        counts[q["bits"]] = counts.get(q["bits"], 0) + 1
    return max(counts, key=lambda b: (counts[b], -b))


def describe_dense(dense) -> str:
    """"bf16", "affine 8-bit", or "affine 4-bit, mlp.router affine 8-bit": readable, one
    line."""
    modules = dense_modules(dense)

    def label(q):
        return f"{q['mode']} {q['bits']}-bit" + (f" (group {q['group_size']})"
                                                  if q["group_size"] != 64 else "")

    if isinstance(dense, dict) and isinstance(dense.get("modules"), list):
        return label({"mode": dense.get("mode", "affine"), "group_size": dense.get("group_size"),
                      "bits": dense.get("bits")})  # the uniform form says it
    if not modules:
        return "bf16"

    labels: dict[str, list[str]] = {}
    for m, q in sorted(modules.items()):
        labels.setdefault(label(q), []).append(m)
    main = max(labels, key=lambda k: len(labels[k]))
    rest = [f"{', '.join(ms)} {lab}" for lab, ms in labels.items() if lab != main]
    return ", ".join([main] + rest)


def read_model_folder(path) -> ModelFolder:
    """The one reader of a converted folder's config.json. NotAModelFolder when the folder
    holds no oss-mlx config.json (missing, or another project's); BrokenModelFolder, saying
    why, when it claims to be one but cannot be read."""
    path = Path(path)
    cfg = path / "config.json"
    try:
        text = cfg.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotAModelFolder(f"{path} is not an oss-mlx model folder (no config.json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BrokenModelFolder(f"{cfg}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        meta = json.loads(text)
    except ValueError as e:
        # Damaged, or another project's file: a converted folder has our manifest beside it.
        if FORMAT not in text and not (path / "manifest.json").is_file():
            raise NotAModelFolder(f"{path} is not an oss-mlx model folder "
                                  "(its config.json is not JSON)") from None
        raise BrokenModelFolder(f"{cfg} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NotAModelFolder(f"{path} is not an oss-mlx model folder (no oss-mlx config.json)")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise BrokenModelFolder(f"{cfg} has no model configuration (\"model\")")
    try:
        config = ModelConfig.from_dict(model)
        config.max_context  # noqa: B018 - a non-number fails here, not at the first request
    except (TypeError, ValueError) as e:
        raise BrokenModelFolder(f"{cfg}: malformed model configuration ({e})") from None
    quantization = meta.get("quantization") or {}
    try:
        if not isinstance(quantization, dict):
            raise ValueError(f"quantization is not an object: {quantization!r}")
        dense_modules(quantization.get("dense"))
    except ValueError as e:
        raise BrokenModelFolder(f"{cfg}: {e}") from None
    return ModelFolder(path, config, meta)

"""Model configuration: one internal dataclass, read from either upstream config.

Field names are exactly the keys of the `original/config.json` layout (OpenAI's
`ModelConfig`, spec section 2.2), with the 120b values as defaults; the few constants that
upstream hard-codes (eps, swiglu alpha) are fields too so the model never hides a literal.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import OssMlxError

# Reasoning efforts of the harmony system message (spec 5.3), in order; the one list every
# command, the chat REPL and the server read (oss_mlx.harmony re-exports it).
EFFORTS = ("low", "medium", "high")


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
    # Not in the original config; upstream hard-codes them (spec 1.1, 2.2).
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702

    @property
    def max_context(self) -> int:
        """Reference context length: initial_context_length * rope_scaling_factor (131072)."""
        return int(self.initial_context_length * self.rope_scaling_factor)

    def is_sliding(self, layer: int) -> bool:
        """Even layers use the sliding window, odd layers full attention (spec 1.5)."""
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

"""YaRN rotary embedding exactly as OpenAI's reference (docs/model.md §1.4.1).

mlx-lm's `YarnRoPE` floors/ceils the correction range to 8 and 18, which moves the frequencies
of dims 8-17 by up to 76%; the reference (and HF with `truncate: false`) keeps the fractional
bounds. So we compute the inverse frequencies here and hand `mx.fast.rope` their periods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from oss_mlx.config import ModelConfig


@dataclass
class Yarn:
    inv_freq: np.ndarray  # [head_dim / 2] float32, angle = position * inv_freq
    concentration: float  # multiplies cos and sin, hence q and k
    low: float
    high: float


def yarn(config: ModelConfig) -> Yarn:
    """The reference's `_compute_concentration_and_inv_freq`, unrounded bounds."""
    d = config.head_dim
    base = config.rope_theta
    s = config.rope_scaling_factor
    freq = base ** (np.arange(0, d, 2, dtype=np.float32) / d)
    d_half = d / 2
    low = d_half * math.log(config.initial_context_length / (config.rope_ntk_beta * 2 * math.pi))
    low /= math.log(base)
    high = d_half * math.log(config.initial_context_length / (config.rope_ntk_alpha * 2 * math.pi))
    high /= math.log(base)
    interpolation = 1.0 / (s * freq)
    extrapolation = 1.0 / freq
    ramp = np.clip((np.arange(d_half, dtype=np.float32) - low) / (high - low), 0, 1)
    mask = 1 - ramp
    inv_freq = interpolation * (1 - mask) + extrapolation * mask
    return Yarn(inv_freq.astype(np.float32), config.yarn_concentration, low, high)

"""YaRN RoPE against the numbers in docs/model.md §1.4.1 (not against our own formula)."""

import math

import mlx.core as mx
import numpy as np

from oss_mlx.config import ModelConfig
from oss_mlx.model.gpt_oss import Model
from oss_mlx.model.rope import yarn

# inv_freq, i = 0..31, derived in float64 from docs/model.md §1.4.1
SPEC_INV_FREQ = np.array([
    1.000000e+00, 6.890443e-01, 4.747821e-01, 3.271459e-01, 2.254180e-01, 1.553230e-01, 1.070244e-01, 7.374457e-02,
    5.081327e-02, 3.170570e-02, 1.933500e-02, 1.159205e-02, 6.794959e-03, 3.860359e-03, 2.093792e-03, 1.052602e-03,
    4.564839e-04, 1.293187e-04, 3.830881e-05, 2.639647e-05, 1.818834e-05, 1.253257e-05, 8.635496e-06, 5.950239e-06,
    4.099978e-06, 2.825067e-06, 1.946596e-06, 1.341291e-06, 9.242090e-07, 6.368209e-07, 4.387978e-07, 3.023511e-07,
])  # fmt: skip


def test_yarn_bounds_are_unrounded():
    y = yarn(ModelConfig())
    assert math.isclose(y.low, 8.092779115512402, rel_tol=1e-12)
    assert math.isclose(y.high, 17.39802450158856, rel_tol=1e-12)
    assert math.isclose(y.concentration, 1.3465735902799727, rel_tol=1e-12)


def test_yarn_inv_freq_matches_spec_table():
    inv_freq = yarn(ModelConfig()).inv_freq
    assert inv_freq.shape == (32,)
    # the table has 7 significant digits; float32 adds ~1e-7 relative
    np.testing.assert_allclose(inv_freq, SPEC_INV_FREQ, rtol=2e-6)
    # floor/ceil bounds (mlx-lm's YarnRoPE) would move dims 9..17 by 0.27% .. 76%
    ext, itp = 150000.0 ** (-np.arange(32) * 2 / 64), 150000.0 ** (-np.arange(32) * 2 / 64) / 32
    ramp = np.clip((np.arange(32) - 8) / (18 - 8), 0, 1)
    rounded = itp * ramp + ext * (1 - ramp)
    assert np.all(np.abs(rounded[9:18] / SPEC_INV_FREQ[9:18] - 1) > 2e-3)
    assert abs(rounded[17] / SPEC_INV_FREQ[17] - 1) > 0.7  # the 76% of docs/model.md §1.4.1


def test_model_rope_is_rotate_half_with_spec_frequencies():
    """mx.fast.rope fed with the model's periods rotates halves [0:32] / [32:64] by p*inv_freq."""
    model = Model(ModelConfig(num_hidden_layers=0, vocab_size=8, hidden_size=64))
    x = mx.random.normal((1, 3, 5, 64), key=mx.random.key(0))
    for offset in (0, 7, 4000):
        y = mx.fast.rope(
            x, 64, traditional=False, base=None, scale=1.0, offset=offset, freqs=model._periods
        )
        angle = (offset + np.arange(5))[:, None] * SPEC_INV_FREQ[None]
        c, s = np.cos(angle), np.sin(angle)
        xn = np.array(x, dtype=np.float64)
        x1, x2 = xn[..., :32], xn[..., 32:]
        ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
        # float32 angles at position ~4000 carry ~4000 * 6e-8 rad of rounding
        np.testing.assert_allclose(np.array(y), ref, atol=2e-3 if offset > 1000 else 2e-5)

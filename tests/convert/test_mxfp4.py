"""MXFP4 decoding: the numpy decoder of tests/reference.py (written from docs/checkpoint.md §4), checked
against the worked example of docs/checkpoint.md §4.3 and the E2M1 bit layout, and MLX's `mxfp4` mode checked against it on the converter's repack
(blocks viewed as little-endian uint32, flattened)."""

import numpy as np
import pytest

from support.reference import FP4, mxfp4_dequant


def test_worked_example():
    # docs/checkpoint.md §4.3: byte 0x2F with scale 128 -> (even, odd) = (FP4[0xF], FP4[0x2]) * 2 = (-12, 2).
    blocks = np.zeros((1, 16), dtype=np.uint8)
    blocks[0, 0] = 0x2F
    out = mxfp4_dequant(blocks, np.array([128], dtype=np.uint8))
    assert out[0] == -12.0 and out[1] == 2.0
    assert np.all(out[2:] == 0)


def test_lut_is_e2m1():
    # Each code decoded from its bits: (-1)^s * 2^(e-1) * (1 + m/2), subnormal when e == 0.
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        v = (m / 2) if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
        assert FP4[code] == (-v if s else v)


def test_mlx_mxfp4_equals_numpy_decoding():
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)  # [E, out, G, 16]
    scales = rng.integers(110, 140, (3, 5, 4), dtype=np.uint8)
    w = mx.array(blocks.view("<u4").reshape(3, 5, 16))  # the converter's repack
    got = mx.dequantize(w, mx.array(scales), group_size=32, bits=4, mode="mxfp4")
    got = np.array(got.astype(mx.float32), dtype=np.float64)
    np.testing.assert_array_equal(got, mxfp4_dequant(blocks, scales))

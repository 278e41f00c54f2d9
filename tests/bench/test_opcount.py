"""Kernel counting (oss_mlx/opcount.py): a hand-built graph whose kernels are known, then the
counts of one decode step of the tiny model for both runtimes, against the list of kernels a
decode layer is made of (oss_mlx/model.py, Experts and Attention)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from oss_mlx.bench import opcount


def test_counts_fast_calls_once_compiled_regions_once_views_never():
    x, w, W = mx.ones((8, 64)), mx.ones((64,)), mx.ones((64, 32))
    mx.eval(x, w, W)
    fuse = mx.compile(lambda a: (mx.exp(a) * 2 + 1).astype(mx.bfloat16))  # one fused region

    def graph():
        y = mx.fast.rms_norm(x, w, 1e-5)                          # 1 kernel on a GPU
        z = y.reshape(1, 8, 64).transpose(0, 2, 1).transpose(0, 2, 1)  # views
        return fuse(z.squeeze(0) @ W)                              # Matmul, then Compiled

    with opcount.fast_as_one_kernel():
        counted = opcount.count_graph(graph())
    assert counted == {"fast": 1, "Matmul": 1, "Compiled": 1}
    # Without the stand-in the CPU backend's fallback for rms_norm shows up as many kernels.
    assert sum(opcount.count_graph(graph()).values()) > 3


@pytest.mark.subprocess
def test_decode_step_kernels_tiny(tiny_model, tiny_hf):
    counts = {k["runtime"]: k for k in opcount.count_in_subprocess(
        tiny_model, ["float32"], source=tiny_hf, decode="both")}
    ours, plain = counts["oss-mlx float32"], counts["oss-mlx float32 plain"]
    theirs = next(v for k, v in counts.items() if k.startswith("mlx-lm"))
    # A layer: attention norm, qkv, rope, 2 cache writes, sdpa, out, residual add (8); MLP
    # norm, router, argpartition, take_along_axis, softmax, bias gather, gate_up, swiglu,
    # down, down bias, addmm (11). The compiled step runs the same kernels as the plain path.
    assert ours["per_layer"] == plain["per_layer"] == 19
    assert ours["per_layer_kinds"]["fast"] == 4 and ours["per_layer_kinds"]["GatherQMM"] == 2
    assert theirs["per_layer"] > 30  # separate q/k/v, two ropes, three bias adds, ...
    for k in (ours, plain, theirs):
        assert k["total"] == k["layers"] * k["per_layer"] + k["outside_layers"]
        assert 0 < k["outside_layers"] < 15  # embedding, final norm, unembedding, argmax, masks

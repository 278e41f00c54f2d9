"""Loading a converted model folder (docs/checkpoint.md §3) into `gpt_oss.Model`.

    model = load("gpt-oss-20b")            # a store name or a folder; dtype=default_dtype()
    model = load(folder, shard=sharding)   # this rank's share only (oss_mlx/model/shard.py)

The safetensors are memory-mapped lazily by mx.load and become the parameters directly (no
extra copy when the dtype is the stored one). What each tensor is loaded as is the model's
precision rule (gpt_oss.Precision), read from the layout table.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from oss_mlx.checkpoint.layout import EXPERTS_MXFP4, leaf
from oss_mlx.checkpoint.safetensors import shard_files
from oss_mlx.config import read_model_folder
from oss_mlx.defaults import DTYPES
from oss_mlx.errors import OssMlxError
from oss_mlx.model.gpt_oss import Model, Precision


def _resolve(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p  # read_model_folder says whether it is a converted folder
    from oss_mlx.store import resolve_model  # a store name, or an error saying how to get it

    return Path(resolve_model(path))


def _dense_predicate(modules: dict):
    """The quantization the converter stored each dense module in (config 'dense', either form:
    config.dense_modules), for nn.quantize: its parameters, or False for a bf16 module."""
    def predicate(path, module):
        q = modules.get(leaf(path))
        if q is None or not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        return {"group_size": q["group_size"], "bits": q["bits"], "mode": q["mode"]}
    return predicate


def _cast(name, value, precision: Precision):
    if not mx.issubdtype(value.dtype, mx.floating):
        return value  # packed weights and e8m0 scales
    dtype = precision.weight(name)
    return value if dtype is None else value.astype(dtype)


def _join_expert_biases(weights: dict) -> dict:
    """`layers.N.mlp.experts.{gate_up,down}.bias` -> one `layers.N.mlp.experts.bias` table
    [E, 2I + H] (Experts reads both with one gather)."""
    for name in [n for n in weights if n.endswith(".experts.gate_up.bias")]:
        prefix = name[: -len("gate_up.bias")]
        down = weights.pop(prefix + "down.bias", None)
        if down is None:
            continue  # load_weights reports the missing tensor
        weights[prefix + "bias"] = mx.concatenate([weights.pop(name), down], axis=-1)
    return weights


def compute_dtype(dtype, stored: mx.Dtype) -> mx.Dtype:
    """The dense dtype asked for: an mx.Dtype, a name from a command line, or None (stored)."""
    if dtype is None:
        return stored
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OssMlxError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
        return getattr(mx, dtype)
    return dtype


def load(path, dtype=None, lazy: bool = False, expert_dtype=None, shard=None) -> Model:
    """Load a converted folder or a store name.

    `shard`: an `oss_mlx.model.shard.Sharding`: build and read only this rank's share.
    `expert_dtype`: the experts' activations' dtype (default: float32 on the CPU backend, much
    faster there, and `dtype` elsewhere). `lazy=False` evaluates the weights now, so the load
    time is paid here and not by the first token.
    """
    folder = read_model_folder(_resolve(path))
    model_dir, quant = folder.path, folder.quantization
    experts_q = quant.get("experts") or EXPERTS_MXFP4
    stored = getattr(mx, folder.meta.get("dtype", "bfloat16"), None)
    if not isinstance(stored, mx.Dtype):
        raise OssMlxError(f"{model_dir}/config.json: unknown dtype {folder.meta.get('dtype')!r}")
    dtype = compute_dtype(dtype, stored)
    model = (shard.model if shard is not None else Model)(
        folder.config, dtype=dtype, expert_dtype=expert_dtype,
        group_size=experts_q["group_size"], bits=experts_q["bits"], mode=experts_q["mode"])
    dense = folder.dense_modules
    if dense:
        nn.quantize(model, class_predicate=_dense_predicate(dense))
    files, _ = shard_files(model_dir, "model*.safetensors")
    weights = {}
    for f in files:
        try:
            weights.update((shard.read if shard is not None else mx.load)(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise OssMlxError(f"{f}: unreadable safetensors file ({e})") from None
    weights = _join_expert_biases({k: _cast(k, v, model.precision) for k, v in weights.items()})
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise OssMlxError(f"{model_dir}: weights do not match the config ({e})") from None
    del weights
    if shard is not None:
        shard.finish(model)
    if not lazy:
        try:
            mx.eval(model.parameters())
        except (RuntimeError, ValueError) as e:
            raise OssMlxError(f"{model_dir}: cannot read the weights ({e})") from None
    model.eval()
    model.model_dir = model_dir
    return model

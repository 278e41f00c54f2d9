"""The gpt-oss model in MLX (docs/model.md §1): the forward pass (gpt_oss.py), YaRN RoPE
(rope.py), the quantized KV cache with sinks (kv_quant.py), the compiled decode step
(decode.py), the split across the ranks of a launch (shard.py), and loading (loading.py)."""

from oss_mlx.model.gpt_oss import Model, Precision, default_dtype
from oss_mlx.model.loading import load

__all__ = ["Model", "Precision", "default_dtype", "load"]

"""oss-mlx: OpenAI's gpt-oss models on MLX, bit-faithful to the reference."""

__version__ = "0.1.0"


def load(path, dtype=None):
    """Load a converted model folder (or a name in the local model store)."""
    from oss_mlx.model import load as _load

    return _load(path, dtype=dtype)


__all__ = ["load", "__version__"]

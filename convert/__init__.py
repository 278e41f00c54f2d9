"""The converter: upstream gpt-oss checkpoints -> MLX model folders (installed as oss_mlx.convert)."""

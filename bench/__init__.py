"""mlx_serving.bench."""

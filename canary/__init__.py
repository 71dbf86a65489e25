"""mlx_serving.canary."""

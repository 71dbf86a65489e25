"""mlx_serving.native."""

"""mlx_serving.deployments."""

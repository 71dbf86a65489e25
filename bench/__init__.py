"""mlx_serving.bench."""

# before any benchmark imports mlx-lm, which would lower the file-descriptor limits that the
# servers it starts inherit (engine/fd_limits.py)
from mlx_serving.engine import fd_limits  # noqa: F401

"""mlx_serving.bench."""

import multiprocessing

# before any benchmark imports mlx-lm, which would lower the file-descriptor limits that the
# servers it starts inherit (engine/fd_limits.py). Not in a process that multiprocessing
# spawned (a load-client process starts no server and needs no mlx-lm; an engine's child
# process imports the engine, and this with it): importing mlx-lm takes 1.6 s there.
if multiprocessing.parent_process() is None:
    from mlx_serving.engine import fd_limits  # noqa: F401

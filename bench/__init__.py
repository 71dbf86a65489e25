"""mlx_serving.bench."""

import multiprocessing
import sys


def _spawned() -> bool:
    """Whether multiprocessing started this process. ``parent_process()`` is set only once
    the child has unpickled its target and arguments, which import this package first; the
    command line of a spawned child ends with ``--multiprocessing-fork`` from the start."""
    return (multiprocessing.parent_process() is not None
            or "--multiprocessing-fork" in sys.orig_argv)


# before any benchmark imports mlx-lm, which would lower the file-descriptor limits that the
# servers it starts inherit (engine/fd_limits.py). Not in a process that multiprocessing
# spawned (a load-client process starts no server and needs no mlx-lm; an engine's child
# process imports the engine, and this with it): importing mlx-lm takes 1.6 s there, and
# ~15 s of CPU on a GPU host whose Python has torch (transformers imports it).
if not _spawned():
    from mlx_serving.engine import fd_limits  # noqa: F401

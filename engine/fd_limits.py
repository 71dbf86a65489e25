"""mlx-lm, imported without lowering the process's file-descriptor limits.

mlx-lm 0.32 sets ``RLIMIT_NOFILE`` to (2048, 4096) when ``mlx_lm.utils`` is first imported,
to raise macOS's default of 256 for models of many files. Where the limits are higher (Linux
machines and containers usually allow 20,000 to a million), that *lowers* them: the hard one
for good unless the process is privileged, and every process started afterwards inherits
it. A Ray cluster started by a process that had imported mlx-lm gave HAProxy 4,096
descriptors where it asks for ~10,000 and would not start, and a replica could hold no more
than 2,048 sockets.

Every module of this project that imports mlx-lm imports this one first (the engine's,
the benchmarks' and the tests' conftest): a limit mlx-lm asks for is applied only where it
raises one.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Iterator

_INFINITY = resource.RLIM_INFINITY


def _higher(current: int, asked: int) -> int:
    if current == _INFINITY or (asked != _INFINITY and asked <= current):
        return current
    return asked


@contextlib.contextmanager
def fd_limits_only_raised() -> Iterator[None]:
    """While in the block, ``resource.setrlimit(RLIMIT_NOFILE, ...)`` only raises limits, and
    the soft one no further than the hard one where an unprivileged process cannot raise that."""
    setrlimit = resource.setrlimit

    def raise_only(which: int, limits: tuple[int, int]) -> None:
        if which != resource.RLIMIT_NOFILE:
            return setrlimit(which, limits)
        soft, hard = resource.getrlimit(which)
        wanted = (_higher(soft, limits[0]), _higher(hard, limits[1]))
        if wanted == (soft, hard):
            return None
        try:
            return setrlimit(which, wanted)
        except (ValueError, OSError):   # not allowed to raise the hard limit
            capped = wanted[0] if hard == _INFINITY else min(wanted[0], hard)
            return setrlimit(which, (capped, hard))

    resource.setrlimit = raise_only
    try:
        yield
    finally:
        resource.setrlimit = setrlimit


with fd_limits_only_raised():
    import mlx_lm.utils  # noqa: E402,F401  (the import that sets the limits)

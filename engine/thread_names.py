"""Thread names the OS shows (``top -H``, ``ps -L``, ``/proc/PID/task/TID/comm``, py-spy).

Python before 3.14 names its threads only for itself: to the OS every thread of a replica
carries the process's name, so the engine thread, the one whose core bounds each decode
step, cannot be told from Ray's and Serve's threads when a host is checked for contention.
"""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15  # linux/prctl.h
_MAX_BYTES = 15    # both kernels keep 16 bytes, the terminating NUL included


def name_this_thread(name: str) -> None:
    """Give the calling thread ``name`` in the OS (its first 15 bytes); best effort: a
    platform without the call leaves the name as it was."""
    encoded = ctypes.c_char_p(name.encode()[:_MAX_BYTES])
    try:
        libc = ctypes.CDLL(None)
        if sys.platform.startswith("linux"):
            libc.prctl(_PR_SET_NAME, encoded, 0, 0, 0)
        elif sys.platform == "darwin":
            libc.pthread_setname_np(encoded)  # names only the calling thread on macOS
    except (OSError, AttributeError):
        pass

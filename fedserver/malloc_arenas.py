"""Bound glibc's malloc arenas in the server: with a thread per call (hundreds of sites), per-thread arenas keep
freed chunk buffers and the process's memory grows with the threads, not with the work."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENAS = 2
# Buffers of this size and more (model chunks) are mapped on their own and returned to the kernel when freed,
# instead of staying in an arena; a fixed threshold also stops glibc from raising it after each large free.
MMAP_THRESHOLD = 256 << 10


def bound_malloc_arenas() -> bool:
    """Set the arena count and mmap threshold (glibc only; before the server's threads start); True if set."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to bound
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = mallopt(_M_ARENA_MAX, ARENAS) == 1 and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if not done:
        log.warning("could not bound malloc's arenas: memory may grow with the number of threads")
    return done

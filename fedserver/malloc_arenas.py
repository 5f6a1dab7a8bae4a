"""Bound glibc's malloc in the server: with a thread per call (hundreds of sites), per-thread arenas and caches keep
freed chunks, and the process's memory grows with the threads, not with the work."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

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


_TUNABLES = "GLIBC_TUNABLES"
_NO_THREAD_CACHE = "glibc.malloc.tcache_count=0"
_ADDED = "FEDSERVER_ADDED_GLIBC_TUNABLES"  # set across the re-execution: what this module added to GLIBC_TUNABLES


def restart_without_thread_caches() -> None:
    """Execute this process again (same PID, arguments and descriptors) with glibc's per-thread caches of freed
    chunks (tcache) off: glibc reads GLIBC_TUNABLES only when a process starts. Each thread that holds a site's
    long-poll keeps up to seven freed chunks per size class; at 100 sites that was ~4 MiB of the server's ~95 MiB
    (benchmarks/README.md). Not glibc, already off, or set otherwise by the operator: returns and changes nothing.

    In the restarted process the variable is taken out of os.environ again, so that children the server starts
    (the initial model's builder, say) keep glibc's defaults."""
    if os.environ.get(_ADDED) is not None:
        tunables = os.environ.pop(_ADDED)
        if tunables:
            os.environ[_TUNABLES] = tunables
        else:
            os.environ.pop(_TUNABLES, None)
        return
    tunables = os.environ.get(_TUNABLES, "")
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc.tcache_count" in tunables:
        return
    env = dict(os.environ)
    env[_TUNABLES] = ":".join(t for t in (tunables, _NO_THREAD_CACHE) if t)
    env[_ADDED] = tunables  # what to put back
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:  # the interpreter cannot be executed again (removed since?): run as we are
        log.warning("could not turn off malloc's thread caches (%s): memory may grow with the number of threads", e)

"""Direct I/O on a file: block-aligned buffers, and whole positional reads and writes that fall back to the page cache.

Why: on a VM whose host backs memory lazily, every new page-cache page costs a first touch (~2.2 s per GiB here,
benchmarks/README.md), while a direct write of the same GiB is ~0.5 s of disk time and almost no CPU. Direct I/O
moves whole blocks between the disk and block-aligned memory: offsets, lengths and buffers are multiples of BLOCK.
"""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np

BLOCK = 4096
MAX_IO = 1 << 30  # one read or write; Linux moves at most ~2 GiB per call


def round_up(n: int) -> int:
    """`n` rounded up to a whole number of blocks."""
    return -(-n // BLOCK) * BLOCK


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` whose first byte is block-aligned."""
    raw = np.empty(nbytes + BLOCK, dtype=np.uint8)
    start = -raw.ctypes.data % BLOCK
    return raw[start : start + nbytes]


def set_direct(fd: int, on: bool) -> bool:
    """Turn direct I/O on or off for `fd`; returns whether it is on (a file system may not support it)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return on


def pwrite_all(fd: int, view: memoryview, offset: int, direct: bool) -> bool:
    """Write all of `view` at `offset`; returns whether direct I/O is still on.

    A file system that took O_DIRECT at open but refuses it on write (EINVAL) gets the write again through the page
    cache, and direct I/O stays off for `fd`.
    """
    done = 0
    while done < view.nbytes:
        try:
            done += os.pwrite(fd, view[done : done + MAX_IO], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL or not direct:
                raise
            direct = set_direct(fd, False)
    return direct


def pread_all(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill all of `view` from `offset`; OSError naming `what` when the file ends first."""
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done : done + MAX_IO]], offset + done)
        if n <= 0:
            raise OSError(f"{what} ends early ({done} of {view.nbytes} bytes)")
        done += n

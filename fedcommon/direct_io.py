"""Direct I/O on a file: block-aligned buffers, and whole positional reads and writes that fall back to the page cache.

Why: on a VM whose host backs memory lazily, every new page-cache page costs a first touch (~2.2 s per GiB here,
benchmarks/README.md), while a direct write of the same GiB is ~0.5 s of disk time and almost no CPU. Direct I/O
moves whole blocks between the disk and block-aligned memory: offsets, lengths and buffers are multiples of BLOCK.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import mmap
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

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


def open_direct(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o600) -> tuple[int, bool]:
    """Open `path` for direct I/O where its file system allows it; returns (fd, whether direct I/O is on)."""
    fd = os.open(path, flags, mode)
    return fd, set_direct(fd, True)


def read_range(fd: int, buf: np.ndarray, offset: int, nbytes: int, what: str) -> np.ndarray:
    """Bytes [offset, offset + nbytes) of `fd`, read whole blocks at a time into the block-aligned `buf`.

    `buf` holds at least range_bytes(offset, nbytes); the result is a view of it. A file that ends first is an
    OSError naming `what`; a file system that refuses a direct read (EINVAL) gets it again through the page cache.
    """
    head = offset % BLOCK
    want = head + nbytes
    view = memoryview(buf[: round_up(want)])
    done = 0
    while done < want:
        try:
            n = os.preadv(fd, [view[done : done + MAX_IO]], offset - head + done)
        except OSError as e:
            if e.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise
            set_direct(fd, False)
            continue
        if n <= 0:
            raise OSError(f"{what} ends early ({max(0, done - head)} of {nbytes} bytes)")
        done += n
    return buf[head:want]


def range_bytes(offset: int, nbytes: int) -> int:
    """The buffer read_range needs for `nbytes` from `offset`."""
    return round_up(offset % BLOCK + nbytes)


class ReadAhead:
    """Reads batches of (fd, offset, nbytes) ranges, each at most `block_bytes`: threads read the next `depth`
    batches, their ranges side by side, while the caller uses the current one (disk wait overlaps computing, and
    the disk has several reads to work on).

    Its depth + 1 sets of block-aligned buffers are kept for the next `read`: memory touched once, not per call.
    """

    def __init__(self, block_bytes: int, depth: int = 2):
        self.block_bytes, self.depth = block_bytes, depth
        self._pools: list[list[np.ndarray]] = [[] for _ in range(depth + 1)]

    def read(self, batches: Iterable[Sequence[tuple[int, int, int]]], what: str) -> Iterator[list[np.ndarray]]:
        """Each batch's bytes, views valid until the next batch is asked for; OSError naming `what`."""
        it = iter(batches)
        in_flight: deque[list[Future]] = deque()
        with ThreadPoolExecutor(self.depth, thread_name_prefix="read-ahead") as reader:
            for turn in itertools.count():
                while len(in_flight) < self.depth and (batch := next(it, None)) is not None:
                    # the pool of the batch yielded last is free again once the caller asks for the next
                    pool = self._pools[(turn + len(in_flight)) % len(self._pools)]
                    while len(pool) < len(batch):
                        pool.append(aligned_empty(round_up(self.block_bytes) + BLOCK))
                    in_flight.append(
                        [
                            reader.submit(read_range, fd, buf, off, n, what)
                            for (fd, off, n), buf in zip(batch, pool, strict=False)
                        ]
                    )
                if not in_flight:
                    return
                yield [f.result() for f in in_flight.popleft()]


def io_block_bytes(file_bytes: int) -> int:
    """The piece a model-sized file is written, read or sent in: a thirty-second of it, between 256 KiB and 4 MiB,
    in whole blocks. A hundred sites' transfers of a 10 MiB model at once then hold 320 KiB buffers each, while a
    model of a GiB still moves in 4 MiB pieces (a direct write of 10 MiB in 256 KiB pieces takes ~2 ms longer than
    in 4 MiB ones here: the disk, not the calls, sets the pace)."""
    return round_up(min(4 << 20, max(256 << 10, file_bytes // 32)))


class DirectWriter:
    """Positional writes to `fd` combined in a block-aligned buffer and written whole blocks at a time, with direct
    I/O where the file system allows it; a thread writes one full buffer while the caller fills the other.

    Bytes of a block that no write covered keep what the file held there. It also serves as a write-only file
    (write, seek, tell). close() writes what is left and trims the padding of the last block; the fd stays open.
    """

    def __init__(self, fd: int, buffer_bytes: int = 4 << 20, direct: bool = True):
        self.fd = fd
        self.direct = set_direct(fd, True) if direct else False
        self._bufs = (aligned_empty(round_up(buffer_bytes)), aligned_empty(round_up(buffer_bytes)))
        self._cur = 0
        self._base = 0  # file offset of the current buffer's first byte (a block boundary)
        self._fill = 0  # bytes of the current buffer in use
        self._end = os.fstat(fd).st_size  # the file's size as its writes make it
        self._disk_end = self._end  # the same with the padding of partly written blocks
        self._pos = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="write-behind")
        self._pending: Future | None = None

    def pwrite(self, data, offset: int) -> None:
        """Write all of `data` (bytes-like) at `offset`."""
        src = memoryview(data).cast("B")
        if self._fill and offset != self._base + self._fill:
            self.flush()
        while src.nbytes:
            if not self._fill:
                self._start(offset)
            buf = self._bufs[self._cur]
            n = min(src.nbytes, buf.nbytes - self._fill)
            buf[self._fill : self._fill + n] = np.frombuffer(src[:n], np.uint8)
            self._fill += n
            src, offset = src[n:], offset + n
            self._end = max(self._end, offset)
            if self._fill == buf.nbytes:
                self._submit(buf.nbytes)

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.pwrite(data, self._pos)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise ValueError("DirectWriter seeks from the start only")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        return self.fd

    def flush(self) -> None:
        """Write what the buffer holds (its last block completed from the file) and wait for it."""
        if self._fill:
            padded = round_up(self._fill)
            if padded > self._fill:
                self._complete_tail(padded)
            self._submit(padded)
        self._wait()

    def close(self) -> None:
        """Flush, trim the padding past the last byte written, and stop the writing thread."""
        try:
            self.flush()
            if self._disk_end > self._end:
                os.ftruncate(self.fd, self._end)
                self._disk_end = self._end
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop the writing thread without flushing (a write in flight ends first): the fd may then be closed."""
        with contextlib.suppress(OSError):
            self._wait()
        self._writer.shutdown(wait=True)

    def _start(self, offset: int) -> None:
        """Begin the current buffer at the block holding `offset`, with that block's earlier bytes from the file."""
        self._base = offset - offset % BLOCK
        self._fill = offset - self._base
        if self._fill:
            self._load_block(self._bufs[self._cur][:BLOCK], self._base)

    def _complete_tail(self, padded: int) -> None:
        buf = self._bufs[self._cur]
        tail = buf[padded - BLOCK : padded]
        keep = self._fill - (padded - BLOCK)
        saved = tail[:keep].copy()
        self._load_block(tail, self._base + padded - BLOCK)
        tail[:keep] = saved

    def _load_block(self, block: np.ndarray, offset: int) -> None:
        """`block` (BLOCK bytes) as the file holds it at `offset` (zeros past its end)."""
        self._wait()
        block[:] = 0
        if offset < self._disk_end:
            read_range(self.fd, block, offset, min(BLOCK, self._disk_end - offset), "the file being written")

    def _submit(self, nbytes: int) -> None:
        self._wait()
        buf, base = self._bufs[self._cur], self._base
        self._pending = self._writer.submit(self._write, memoryview(buf[:nbytes]), base)
        self._disk_end = max(self._disk_end, base + nbytes)
        self._cur ^= 1
        self._base += nbytes
        self._fill = 0

    def _write(self, view: memoryview, offset: int) -> None:
        self.direct = pwrite_all(self.fd, view, offset, self.direct)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def reopen_direct(fd: int) -> tuple[int, bool]:
    """A new descriptor of `fd`'s file with direct I/O on where allowed, leaving `fd` as it is; the caller closes it.

    Where the file cannot be opened again (no /proc), a duplicate without direct I/O (its flags are `fd`'s too).
    """
    try:
        return open_direct(f"/proc/self/fd/{fd}")
    except OSError:
        return os.dup(fd), False


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


_CACHESTAT = 451  # cachestat(2), Linux 6.5: the same number on x86-64 and arm64
_libc = ctypes.CDLL(None, use_errno=True)


def in_page_cache(fd: int, offset: int, nbytes: int) -> bool:
    """Whether most of bytes [offset, offset + nbytes) of `fd`'s file are in the page cache (reading them from there
    costs no disk time). Asked with cachestat(2), which reads nothing; where the system lacks it: False."""
    span = (ctypes.c_uint64 * 2)(offset, nbytes)
    stat = _CacheStat()
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        return False
    pages = -(-(offset % mmap.PAGESIZE + nbytes) // mmap.PAGESIZE)
    return 2 * stat.cache >= pages

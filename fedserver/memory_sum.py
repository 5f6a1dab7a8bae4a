"""The open round's running weighted sum kept in memory too, added to as uploads stream in (DESIGN §7).

A mirror of fedserver.disk_sum's terms, not a replacement: every upload is still staged on disk and becomes a term
there (the open round's snapshot and every fallback read those files). While each value added here belongs to a
contribution the disk sum has taken, the round's close reads its means from this buffer instead of reading every
term back from disk; an upload that broke off, was refused, or was still arriving when the close began leaves the
mirror unusable for that round, and the close reads the terms as it would without one. The mirror forms each product
as the disk sum does and adds them in the order the chunks arrive (the disk sum: in the order the uploads complete),
so with two contributions its means are the disk sum's bit for bit, and with more they differ at most by the
rounding of a different order of addition.

The buffer is allocated once per run, when the run starts (prepare), and reused round after round (see prepare and
populated_zeros for what its first touch costs).
"""

from __future__ import annotations

import errno
import math
import mmap
import threading

import numpy as np

from fedcommon.direct_io import round_up
from fedcommon.dtypes import accumulator_dtype
from fedserver.aggregator import VarSpec

# "auto" keeps the sum in memory from this size up, while it fits in a quarter of the memory available: below it,
# reading the terms back costs the close a fraction of a second, and a server of many small runs keeps its memory.
AUTO_MIN_BYTES = 256 << 20
AUTO_MEMORY_SHARE = 4
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python names it from 3.12 on
# mmap.madvise holds the GIL: faulting in 16 MiB at a time lets the server's other threads run between the calls
# (a cold GiB in one call held them all for 0.5-2.6 s on this project's VM).
POPULATE_STEP = 16 << 20


def keep_in_memory(choice: str, nbytes: int, available: int) -> bool:
    """Whether a run keeps its round sum in memory: config_fed_server.json's "round_sum" ("auto", "memory", "disk")
    for a sum of `nbytes`, with `available` bytes of memory free."""
    if choice == "memory":
        return True
    if choice == "disk" or nbytes < AUTO_MIN_BYTES:
        return False
    return nbytes <= available // AUTO_MEMORY_SHARE


def populated_zeros(nbytes: int) -> np.ndarray:
    """`nbytes` zeroed bytes of anonymous memory, faulted in by the kernel in 4 KiB pages (MADV_POPULATE_WRITE, Linux
    5.14, one call per POPULATE_STEP). Measured on this project's 2-core VM, a cold GiB took 0.46 s so, 0.8 s written
    by numpy in 4 KiB pages, and 2.8-3.1 s in transparent huge pages, which numpy asks for on arrays of 4 MiB and more;
    2.6 s so in a round whose sites were touching new memory at the same time (see prepare)."""
    if nbytes == 0:
        return np.zeros(0, np.uint8)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    no_huge_pages = getattr(mmap, "MADV_NOHUGEPAGE", None)
    steps = [(no_huge_pages, 0, nbytes)] if no_huge_pages is not None else []
    steps += [
        (MADV_POPULATE_WRITE, start, min(POPULATE_STEP, nbytes - start)) for start in range(0, nbytes, POPULATE_STEP)
    ]
    for advice, start, length in steps:
        try:
            area.madvise(advice, start, length)
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.EFAULT):  # the memory is not there: said now, not by the OOM killer
                area.close()
                raise MemoryError(f"{nbytes} bytes for the round's sum: {e.strerror}") from None
            if advice == MADV_POPULATE_WRITE:  # an older kernel: the pages fault in as they are first written
                break
    return np.frombuffer(area, np.uint8)


class MemorySum:
    """One model-sized buffer of running sums, one view per aggregated variable; thread-safe.

    Each round: `writer(scale)` for each upload as it starts; the writer adds scale x values as they arrive; the disk
    sum `commit`s the writer when it takes the upload as a term; the close `seal`s the round and, when the mirror
    holds exactly the taken terms, reads the means from it; `reset` starts the next round.
    """

    def __init__(self, specs: dict[str, VarSpec], excluded: frozenset[str] = frozenset()):
        self._layout = [(n, accumulator_dtype(s.dtype), s.shape) for n, s in specs.items() if n not in excluded]
        self.nbytes = sum(round_up(math.prod(shape) * dtype.itemsize) for _, dtype, shape in self._layout)
        self._buffer: np.ndarray | None = None  # allocated by prepare's thread, else by the first writer
        self._preparing: threading.Thread | None = None
        self._prepare_error: BaseException | None = None
        self._views: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._holds: int | None = None  # the generation whose values the buffer holds; None: cleared since
        self._sealed = False
        self._tainted = False
        self._committed = 0
        self._live: set[SumWriter] = set()  # writers that added to this round and were neither taken nor dropped

    def _install(self, buffer: np.ndarray) -> None:
        """Take `buffer` (zeroed, nbytes long) as the sums' memory; called with the lock held."""
        self._buffer = buffer
        end = 0
        for name, dtype, shape in self._layout:
            size = math.prod(shape) * dtype.itemsize
            self._views[name] = self._buffer[end : end + size].view(dtype).reshape(shape)
            end += round_up(size)
        self._clear()

    def prepare(self) -> None:
        """Allocate the buffer now, in a thread of its own, so that the first upload finds it ready.

        The run calls this when it starts. Faulting in a GiB of memory the host has taken back costs this project's
        2-core VM ~2.6 s of CPU: made at the first upload, that was 2.6 s during which the round's uploads waited;
        made at the start, it overlaps the sites' own start (benchmarks/README.md, issue 25, seventh pass)."""
        with self._lock:
            if self._buffer is not None or self._preparing is not None:
                return
            thread = threading.Thread(target=self._prepare, name="round-sum-memory", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: the first writer allocates, as without prepare
                return
            self._preparing = thread

    def _prepare(self) -> None:
        try:
            buffer = populated_zeros(self.nbytes)  # outside the lock: the round may open meanwhile
        except (MemoryError, OSError) as e:
            self._prepare_error = e  # raised to the first writer, whose upload then goes on with the disk
            return
        with self._lock:
            if self._buffer is None:
                self._install(buffer)

    def _clear(self) -> None:
        # -0.0, not 0.0: the identity of IEEE addition (-0.0 + x is x for every x, -0.0 included), so that a sum
        # begun here is the disk sum's, whose first term is taken as it is, bit for bit
        for view in self._views.values():
            view.fill(-0.0)

    def reset(self) -> None:
        """A new round: nothing summed, writers of the last round add nothing more."""
        with self._lock:
            self._generation += 1
            self._sealed = self._tainted = False
            self._committed = 0
            self._live.clear()

    def writer(self, scale: float) -> SumWriter:
        """A writer for one upload of this round, which enters the sum as scale x its values."""
        if self._preparing is not None:
            self._preparing.join()
            if self._prepare_error is not None:
                raise self._prepare_error
        with self._lock:
            if self._buffer is None:  # no prepare: the first writer allocates
                self._install(populated_zeros(self.nbytes))
            elif self._holds is not None and self._holds != self._generation:  # an earlier round's sums
                self._clear()
                self._holds = None
            return SumWriter(self, self._generation, scale)

    def _add(self, writer: SumWriter, name: str, start: int, scaled: np.ndarray) -> None:
        with self._lock:
            if writer.generation != self._generation or self._sealed:  # too late: seal saw it if it had added
                writer.dead = True
                return
            view = self._views[name].reshape(-1)[start : start + scaled.size]
            np.add(view, scaled, out=view)
            self._holds = self._generation
            writer.added = True
            self._live.add(writer)

    def commit(self, writer: SumWriter | None, scale: float) -> None:
        """The disk sum took the upload `writer` mirrored, at `scale`: it counts; anything else spoils the round."""
        with self._lock:
            ok = (
                writer is not None
                and writer.memory is self
                and writer.generation == self._generation
                and not writer.dead
                and not self._sealed
                and writer.scale == scale
            )
            if ok:
                self._live.discard(writer)
                self._committed += 1
                writer.dead = True
            else:
                self._tainted = True

    def drop(self, writer: SumWriter) -> None:
        """The upload `writer` mirrored was not taken: if any of it was added, this round's mirror is spoiled."""
        with self._lock:
            if writer.generation == self._generation and writer.added and not writer.dead:
                self._tainted = True
            self._live.discard(writer)
            writer.dead = True

    def seal(self, terms: int) -> bool:
        """The round closes with `terms` contributions taken: nothing more is added, and True when the buffer holds
        exactly those contributions."""
        with self._lock:
            self._sealed = True
            return not self._tainted and not self._live and self._committed == terms

    def view(self, name: str) -> np.ndarray:
        """Variable `name`'s sum (the buffer itself: the close divides it in place)."""
        return self._views[name]


class SumWriter:
    """Adds one upload's values, scaled, into a MemorySum as they arrive."""

    def __init__(self, memory: MemorySum, generation: int, scale: float):
        self.memory = memory
        self.generation = generation
        self.scale = scale
        self.added = False
        self.dead = False
        self._scratch = np.empty(0, np.uint8)

    def add(self, name: str, start: int, values: np.ndarray) -> None:
        """Add scale x `values` (flat, in the variable's accumulator dtype) from element `start` of `name` on."""
        if self.dead:
            return
        if self._scratch.nbytes < values.nbytes:
            self._scratch = np.empty(values.nbytes, np.uint8)
        # The product fedserver.disk_sum forms, bit for bit (a Python float scale: numpy keeps the values' dtype).
        scaled = np.multiply(values, self.scale, out=self._scratch[: values.nbytes].view(values.dtype))
        self.memory._add(self, name, start, scaled)

    def drop(self) -> None:
        self.memory.drop(self)

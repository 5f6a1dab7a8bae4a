"""The open round's running weighted sum on disk: a few term files, summed block by block (DESIGN §7).

A term is a model file in the accumulator dtypes and a scale: its values times the scale are its part of the sum.
A contribution's staging file becomes a term as it is (renamed, scaled by its weight when read); when a round
holds `max_terms` terms, the next contribution first folds them into one new file (scale 1). Memory stays
O(block) whatever the model's size: the files are read and written with pread/pwrite, never mapped, with direct I/O
where the file system allows it (no page-cache pages per round), threads reading the next blocks ahead.

The overflow reasoning of fedserver.aggregator holds: every value of a staged term is at most value_bound(), each
scale is a weight divided by the largest weight (<= 1), and a round sums at most MAX_CONTRIBUTORS terms.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import secrets
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcommon.direct_io import BLOCK, DirectWriter, ReadAhead, io_block_bytes, open_direct
from fedcommon.dtypes import accumulator_dtype
from fedcommon.model_file import TensorEntry, allocate_model_file, read_index
from fedserver.aggregator import MAX_CONTRIBUTORS, ContributionError, VarSpec, check_weight
from fedserver.memory_sum import MemorySum
from fedserver.staged_upload import StagedUpload

_TERM = re.compile(r"open_round\.(\d{1,9})\.fl")
_RETIRED = re.compile(r"retired\.[0-9a-f]{16}\.fl")  # a term no snapshot names, renamed to wait for its deletion


class _Deleter:
    """Deletes files in a thread of its own, which ends when nothing is left to delete (the interpreter waits for it).

    Unlinking a model-sized file costs this project's VM's ext4 ~0.15 s: the close of a round, and the
    acknowledgement its last upload waits for, need not wait for it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def delete(self, paths: list[Path]) -> None:
        for path in paths:
            self._queue.put(path)
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="sum-file-deleter")
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had (the interpreter is ending): deleted here
                    self._delete_queued()
                    return
                self._thread = thread

    def finish(self, timeout: float) -> None:
        """Wait, up to `timeout` seconds, until what was handed over is deleted (before the process replaces itself)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _delete_queued(self, idle_s: float = 0.0) -> None:
        """Delete what is queued; with `idle_s`, also what comes while the queue is never empty that long."""
        while True:
            try:
                path = self._queue.get(timeout=idle_s) if idle_s else self._queue.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(OSError):
                path.unlink()

    def _run(self) -> None:
        while True:
            self._delete_queued(idle_s=1.0)
            with self._lock:
                if self._queue.empty():
                    self._thread = None
                    return


_DELETER = _Deleter()


def finish_deletions(timeout: float = 30.0) -> None:
    """Wait until the sum files of closed rounds are deleted; os.execv does not wait for the thread that does it."""
    _DELETER.finish(timeout)


@dataclass
class Term:
    """One file of the sum: scale x its values; `weights`: the weight it adds, per variable it carries."""

    path: Path
    scale: float
    weights: dict[str, float]
    _entries: dict[str, TensorEntry] | None = None

    def entry(self, name: str) -> TensorEntry:
        """Where variable `name` lies in the term's file (its index is read once: it may name thousands)."""
        if self._entries is None:
            with open(self.path, "rb") as f:
                self._entries = read_index(f, self.path).by_name()
        return self._entries[name]


class DiskSum:
    """Running weighted sums of a round's updates per variable, in files under `folder`."""

    def __init__(
        self,
        folder: Path,
        specs: dict[str, VarSpec],
        excluded: frozenset[str] = frozenset(),
        max_weight: float = 1e9,
        max_terms: int = 2,
        block_bytes: int | None = None,
        memory: MemorySum | None = None,
    ):
        """block_bytes: what one read of a term takes (default: sized to the model, fedcommon.direct_io);
        memory: the run's sum in memory, which this round's uploads mirror into (fedserver.memory_sum)."""
        self.folder = folder
        self.specs = specs
        self.excluded = excluded
        self.max_weight = max_weight
        self.max_terms = max(1, max_terms)
        self.layout = [(n, accumulator_dtype(s.dtype), s.shape) for n, s in specs.items() if n not in excluded]
        total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.layout)
        self.block_bytes = block_bytes or io_block_bytes(total)
        self._terms: list[Term] = []
        self._retired: list[Path] = []  # folded terms: deleted once no snapshot names them (drop_retired)
        self._count = 0
        self._next = 0
        self._buffers: tuple[ReadAhead, np.ndarray] | None = None  # kept between variables: see _scratch
        self._stream: Iterator[tuple[str, int, np.ndarray]] | None = None  # take_mean's blocks, read ahead
        self._head: tuple[str, int, np.ndarray] | None = None  # the stream's next block
        self.memory = memory
        self._memory_holds: bool | None = None  # whether `memory` holds exactly the terms (asked once they are all in)
        self._read_from_memory: set[str] = set()  # means already taken from `memory` (divided there in place)
        if memory is not None:
            memory.reset()

    @property
    def empty(self) -> bool:
        return not self._terms

    @property
    def read_from_memory(self) -> bool:
        """Whether the means taken so far came from the memory mirror (no term read back)."""
        return bool(self._read_from_memory)

    def add(self, staged: StagedUpload, weight: float) -> None:
        """Add weight x the staged update: its file becomes a term (taken from `staged`)."""
        check_weight(weight, self.max_weight)
        if self._count >= MAX_CONTRIBUTORS:
            raise ContributionError(f"the round already sums {MAX_CONTRIBUTORS} contributions")
        self._end_stream()
        if len(self._terms) >= self.max_terms:
            self._fold()
        w = weight / self.max_weight  # <= 1: see MAX_CONTRIBUTORS
        staged.close()
        path = self._new_path()
        os.replace(staged.path, path)
        staged.taken = True
        self._terms.append(Term(path, w, {n: w for n in staged.received}))
        self._count += 1
        self._memory_holds = None
        if self.memory is not None:
            self.memory.commit(staged.mirror, w)

    def _new_path(self) -> Path:
        self._next += 1
        return self.folder / f"open_round.{self._next}.fl"

    def _fold(self) -> None:
        """Sum the terms into one new file of scale 1; the old files wait in `_retired`."""
        self._end_stream()
        path = self._new_path()
        weights = {
            name: sum(t.weights[name] for t in self._terms if name in t.weights)
            for name, _, _ in self.layout
            if any(name in t.weights for t in self._terms)
        }
        try:
            with open(path, "w+b") as out:
                os.fchmod(out.fileno(), 0o600)
                entries = allocate_model_file(out, self.layout, {"kind": "open round sum"}, BLOCK).by_name()
                end = max((e.offset + e.nbytes for e in entries.values()), default=0)
                writer = DirectWriter(out.fileno(), io_block_bytes(end))
                try:
                    with contextlib.closing(self._sums(list(weights))) as sums:
                        for name, start, block in sums:
                            writer.pwrite(block.view(np.uint8), entries[name].offset + start)
                    writer.close()
                finally:
                    writer.abandon()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._retired += [t.path for t in self._terms]
        self._terms = [Term(path, 1.0, weights)]

    def _sums(self, names: list[str]) -> Iterator[tuple[str, int, np.ndarray]]:
        """(variable, byte offset in it, sum of scale x values) for each block of each of `names` that a term
        carries, in that order; the block is valid until the next is asked for.

        Threads read the next blocks ahead (direct I/O), across variables: while the caller works on one variable,
        the next one's first blocks are read.
        """
        ahead, scratch = self._scratch()
        block = self.block_bytes
        fds: dict[Path, int] = {}
        tags: deque[tuple[str, np.dtype, list[Term], int, int]] = deque()

        def batches() -> Iterator[list[tuple[int, int, int]]]:
            for name in names:
                carriers = [t for t in self._terms if name in t.weights]
                dtype = accumulator_dtype(self.specs[name].dtype)
                nbytes = math.prod(self.specs[name].shape) * dtype.itemsize
                step = block - block % dtype.itemsize
                for t in carriers:
                    if t.path not in fds:
                        fds[t.path] = open_direct(t.path)[0]
                offsets = [t.entry(name).offset for t in carriers]
                for start in range(0, nbytes, step):
                    n = min(step, nbytes - start)
                    tags.append((name, dtype, carriers, start, n))
                    yield [(fds[t.path], off + start, n) for t, off in zip(carriers, offsets, strict=True)]

        try:
            with contextlib.closing(ahead.read(batches(), "the open round's sum files")) as reads:
                for views in reads:
                    name, dtype, carriers, start, n = tags.popleft()
                    total, scaled = scratch[:n].view(dtype), scratch[block : block + n].view(dtype)
                    for k, (view, t) in enumerate(zip(views, carriers, strict=True)):
                        values = view.view(dtype)
                        if k == 0:
                            np.multiply(values, t.scale, out=total)
                        else:
                            np.add(total, np.multiply(values, t.scale, out=scaled), out=total)
                    yield name, start, total
        finally:
            for fd in fds.values():
                os.close(fd)

    def _scratch(self) -> tuple[ReadAhead, np.ndarray]:
        """The read-ahead buffers and two blocks to sum in, allocated once: on this VM new memory costs a first touch
        (~2 s per GiB), so a round's sums reuse theirs; clear() lets them go."""
        if self._buffers is None:
            self._buffers = (ReadAhead(self.block_bytes), np.empty(2 * self.block_bytes, np.uint8))
        return self._buffers

    def take_mean(self, name: str) -> np.ndarray | None:
        """The weighted mean of variable `name`'s updates, or None when no contribution carries it.

        Asked in layout order (as the round's close asks), each variable's blocks were read ahead while the caller
        worked on the one before. Where the memory mirror holds exactly the round's terms, the mean is its sum divided
        in place, and nothing is read.
        """
        carriers = [t for t in self._terms if name in t.weights]
        if not carriers:
            return None
        spec = self.specs[name]
        dtype = accumulator_dtype(spec.dtype)
        weight = sum(t.weights[name] for t in carriers)
        if self.memory is not None and name not in self._read_from_memory:
            if self._memory_holds is None:
                self._memory_holds = self.memory.seal(self._count)
            if self._memory_holds:
                self._read_from_memory.add(name)
                sums = self.memory.view(name)
                return np.divide(sums, weight, out=sums)
        out = np.empty(math.prod(spec.shape), dtype)
        if self._head is None or self._head[0] != name:  # not what the stream has next: start it at `name`
            self._end_stream()
            names = [n for n, _, _ in self.layout]
            self._stream = self._sums(
                [n for n in names[names.index(name) :] if any(n in t.weights for t in self._terms)]
            )
            self._head = next(self._stream, None)
        item = dtype.itemsize
        while self._head is not None and self._head[0] == name:
            _, start, block = self._head
            np.divide(block, weight, out=out[start // item : start // item + block.size])
            self._head = next(self._stream, None)
        return out.reshape(spec.shape)

    def _end_stream(self) -> None:
        """Stop the read-ahead of take_mean (the terms change, or the round ends)."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._head = None, None

    def describe(self) -> list[dict[str, Any]]:
        """The terms, for the open round's snapshot (see restore)."""
        return [{"file": t.path.name, "scale": t.scale, "weights": dict(t.weights)} for t in self._terms]

    def restore(self, terms: Any, count: int) -> None:
        """Take back the terms `describe` gave; ValueError when they or their files do not fit this model."""
        if not isinstance(terms, list) or len(terms) > self.max_terms:
            raise ValueError("the snapshot's terms are not a short list")
        taken = []
        for t in terms:
            name = t.get("file") if isinstance(t, dict) else None
            match = _TERM.fullmatch(name) if isinstance(name, str) else None
            scale, weights = (t.get("scale"), t.get("weights")) if isinstance(t, dict) else (None, None)
            if match is None or not _finite_weight(scale) or scale > 1 or not isinstance(weights, dict):
                raise ValueError(f"a term of the snapshot is not one: {str(t)[:200]}")
            if any(n not in self.specs or n in self.excluded or not _finite_weight(w) for n, w in weights.items()):
                raise ValueError(f"{name}: its weights name variables that are not aggregated, or are not weights")
            path = self.folder / name
            with open(path, "rb") as f:
                index = read_index(f, path)
            if [(e.name, e.dtype, e.shape) for e in index.entries] != [(n, d, tuple(s)) for n, d, s in self.layout]:
                raise ValueError(f"{path}: its variables are not this model's")
            taken.append(Term(path, float(scale), {str(n): float(w) for n, w in weights.items()}))
            self._next = max(self._next, int(match.group(1)))
        self._end_stream()
        self._terms, self._count = taken, count
        self._memory_holds = None

    def drop_retired(self) -> None:
        """Delete the folded terms' files (no snapshot names them any more): each is renamed out of the way of the
        terms to come (whose names repeat round after round) and deleted by a thread of its own."""
        renamed = []
        for path in self._retired:
            out_of_the_way = path.with_name(f"retired.{secrets.token_hex(8)}.fl")
            try:
                os.replace(path, out_of_the_way)
            except FileNotFoundError:
                continue
            except OSError:
                path.unlink(missing_ok=True)
                continue
            renamed.append(out_of_the_way)
        self._retired = []
        _DELETER.delete(renamed)

    def clear(self) -> None:
        """Forget the sums and delete their files."""
        self._retired += [t.path for t in self._terms]
        self._end_stream()
        self._terms, self._count = [], 0
        self._buffers = None
        self.memory = None
        self.drop_retired()


def remove_term_files(folder: Path, keep: set[str] = frozenset()) -> None:
    """Delete the sum files in `folder` that no snapshot names (`keep`: the names to keep), and those a stopped
    server left renamed for deletion."""
    with contextlib.suppress(FileNotFoundError):
        for path in folder.iterdir():
            if (_TERM.fullmatch(path.name) and path.name not in keep) or _RETIRED.fullmatch(path.name):
                path.unlink(missing_ok=True)


def _finite_weight(w: Any) -> bool:
    return not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w) and w > 0

"""A site's received global model kept in an unnamed private file, written as it arrives, read back one variable at a
time."""

from __future__ import annotations

import queue
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from fedcommon.direct_io import BLOCK, aligned_empty, pread_all, pwrite_all, round_up, set_direct
from fedcommon.dtypes import dtype_name
from fedcommon.model_file import TensorEntry
from fedcommon.tensor_codec import as_wire_array

_BOUNCE_BYTES = 8 * 1024 * 1024
# One write from an aligned array: small enough that an abort waits at most this much disk time.
_PIECE_BYTES = 64 * 1024 * 1024


class _FileWriter:
    """The file being written: where each variable goes (block-aligned offsets) and the writes themselves."""

    def __init__(self, directory: Path | None) -> None:
        self.file = tempfile.TemporaryFile(dir=directory, buffering=0)
        self.direct = set_direct(self.file.fileno(), True)  # False where the file system refuses direct I/O
        self.entries: dict[str, TensorEntry] = {}
        self._pos = 0
        self._bounce: np.ndarray | None = None

    def reserve(self, name: str, arr: np.ndarray) -> TensorEntry:
        """Place variable `name` after the last one; ValueError naming it when its dtype has no wire name."""
        try:
            dtype_name(arr.dtype)
        except ValueError as e:
            raise ValueError(f"global model variable {name!r}: {e}") from None
        if name in self.entries:
            raise ValueError(f"global model variable {name!r} comes twice")
        entry = TensorEntry(name, arr.dtype, tuple(arr.shape), self._pos, arr.nbytes)
        self.entries[name] = entry
        self._pos += round_up(arr.nbytes)
        return entry

    def write(self, entry: TensorEntry, arr: np.ndarray, stop: threading.Event | None = None) -> None:
        """Write `arr` at its entry: straight from the array where direct I/O allows it, else through a bounce buffer
        (direct I/O needs block-aligned memory); the last block is padded with zeros."""
        raw = arr.reshape(-1).view(np.uint8)
        fd = self.file.fileno()
        whole = raw.nbytes - raw.nbytes % BLOCK if raw.ctypes.data % BLOCK == 0 or not self.direct else 0
        for start in range(0, whole, _PIECE_BYTES):
            if stop is not None and stop.is_set():
                return
            piece = raw[start : min(start + _PIECE_BYTES, whole)]
            self.direct = pwrite_all(fd, memoryview(piece), entry.offset + start, self.direct)
        if self._bounce is None and whole < raw.nbytes:
            self._bounce = aligned_empty(_BOUNCE_BYTES)
        bounce = self._bounce
        for start in range(whole, raw.nbytes, _BOUNCE_BYTES):
            if stop is not None and stop.is_set():
                return
            piece = raw[start : start + _BOUNCE_BYTES]
            padded = round_up(piece.nbytes)
            bounce[: piece.nbytes] = piece
            bounce[piece.nbytes : padded] = 0
            self.direct = pwrite_all(fd, memoryview(bounce[:padded]), entry.offset + start, self.direct)


class GlobalModelFile(Mapping[str, np.ndarray]):
    """The global model on disk: each item read is a fresh array, so the site holds it only while it uses it.

    The file has no name (O_TMPFILE, or unlinked at once where that is missing) and mode 0600: no other process can
    open it, and the system frees it when it is closed, by close() or by the process ending, crash included. It is
    written and read with direct I/O where the file system allows it, so the model does not sit in the page cache
    either (on a VM that backs memory lazily, filling the page cache costs as much as copying into new memory).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], directory: Path | None = None):
        """Write `tensors` to a new file in `directory` (default: the system's temp folder)."""
        arrays = {name: as_wire_array(arr) for name, arr in tensors.items()}
        writer = _FileWriter(directory)
        try:
            entries = [(writer.reserve(name, arr), arr) for name, arr in arrays.items()]
            for entry, arr in entries:
                writer.write(entry, arr)
        except BaseException:
            writer.file.close()
            raise
        self._adopt(writer)

    @classmethod
    def _written(cls, writer: _FileWriter) -> GlobalModelFile:
        stored = cls.__new__(cls)
        stored._adopt(writer)
        return stored

    def _adopt(self, writer: _FileWriter) -> None:
        self.direct = writer.direct  # False where the file system refused direct I/O
        self._file = writer.file
        self._entries = writer.entries
        # A store dropped without close() still gives its disk space back.
        self._closer = weakref.finalize(self, writer.file.close)

    def entry(self, name: str) -> TensorEntry:
        """Where variable `name` lies in the file, with its dtype and shape; KeyError when it is not there."""
        return self._entries[name]

    def read_into(self, name: str, buf: np.ndarray) -> np.ndarray:
        """Variable `name` read into `buf` (block-aligned uint8 of at least round_up(nbytes)); a view of `buf`."""
        entry = self._entries[name]
        view = buf[: round_up(entry.nbytes)]
        pread_all(self._file.fileno(), memoryview(view), entry.offset, f"global model file: variable {entry.name!r}")
        return view[: entry.nbytes].view(entry.dtype).reshape(entry.shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read_into(name, aligned_empty(round_up(self._entries[name].nbytes)))

    def __contains__(self, name: object) -> bool:  # without reading the variable, as Mapping's would
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def fileno(self) -> int:
        """The open file's descriptor (what the site holds of the model)."""
        return self._file.fileno()

    def close(self) -> None:
        """Give the file's disk space back; reading afterwards raises ValueError."""
        self._closer()


class GlobalModelWriter:
    """A GlobalModelFile written by a thread of its own while its variables arrive (as a download decodes them), so
    it is complete soon after the last one came. Ends in finish() or abort(); its thread ends with it."""

    def __init__(self, directory: Path | None = None) -> None:
        """Create the (unnamed, empty) file in `directory` and start the writing thread."""
        self._writer = _FileWriter(directory)
        self._sources: dict[str, np.ndarray] = {}
        self._queue: queue.SimpleQueue[tuple[TensorEntry, np.ndarray] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._failed: tuple[str, BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name="global-model-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None and not self._stop.is_set():
            entry, arr = item
            try:
                self._writer.write(entry, arr, self._stop)
            except BaseException as e:  # handed to the download's thread by add() and finish()
                self._failed = (entry.name, e)
                return

    def _raise_failure(self) -> None:
        if self._failed is not None:
            name, e = self._failed
            raise OSError(f"writing global model variable {name!r}: {e}") from e

    def add(self, name: str, arr: np.ndarray) -> None:
        """Queue variable `name` for writing; keep `arr` unchanged until finish(). Raises the thread's error, if any,
        and ValueError for a dtype without a wire name or a name given twice."""
        self._raise_failure()
        wire = as_wire_array(arr)
        entry = self._writer.reserve(name, wire)
        self._sources[name] = arr
        self._queue.put((entry, wire))

    def source(self, name: str) -> np.ndarray | None:
        """The array given for `name` (None when none was)."""
        return self._sources.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def close_input(self) -> None:
        """No more variables come: the thread ends after the last write."""
        self._queue.put(None)

    def finish(self) -> GlobalModelFile:
        """Wait for the last writes and return the file; OSError naming the variable whose write failed."""
        self._queue.put(None)
        self._thread.join()
        try:
            self._raise_failure()
        except BaseException:
            self._writer.file.close()
            raise
        self._sources.clear()
        return GlobalModelFile._written(self._writer)

    def abort(self) -> None:
        """Stop writing (at most one piece more), and give the file back."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
        self._sources.clear()
        self._writer.file.close()

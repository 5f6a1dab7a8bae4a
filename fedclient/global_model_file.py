"""A site's received global model kept in an unnamed private file, read back one variable at a time."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from fedcommon.dtypes import dtype_name
from fedcommon.model_file import TensorEntry
from fedcommon.tensor_codec import as_wire_array

# Direct I/O moves whole blocks between the disk and block-aligned memory: offsets, lengths and buffers are aligned.
_BLOCK = 4096
_BOUNCE_BYTES = 8 * 1024 * 1024
_MAX_IO = 1 << 30  # one read or write; Linux moves at most ~2 GiB per call


def _round_up(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def _aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` whose first byte is block-aligned."""
    raw = np.empty(nbytes + _BLOCK, dtype=np.uint8)
    start = -raw.ctypes.data % _BLOCK
    return raw[start : start + nbytes]


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
        for name, arr in arrays.items():
            try:
                dtype_name(arr.dtype)
            except ValueError as e:
                raise ValueError(f"global model variable {name!r}: {e}") from None
        f = tempfile.TemporaryFile(dir=directory, buffering=0)
        try:
            self.direct = _set_direct(f.fileno(), True)  # False where the file system refuses direct I/O
            self._entries: dict[str, TensorEntry] = {}
            bounce, pos = _aligned_empty(_BOUNCE_BYTES), 0
            for name, arr in arrays.items():
                self._entries[name] = TensorEntry(name, arr.dtype, tuple(arr.shape), pos, arr.nbytes)
                self._write(f.fileno(), arr.reshape(-1).view(np.uint8), pos, bounce)
                pos += _round_up(arr.nbytes)
        except BaseException:
            f.close()
            raise
        self._file = f
        # A store dropped without close() still gives its disk space back.
        self._closer = weakref.finalize(self, f.close)

    def _write(self, fd: int, raw: np.ndarray, offset: int, bounce: np.ndarray) -> None:
        for start in range(0, raw.nbytes, bounce.nbytes):
            piece = raw[start : start + bounce.nbytes]
            padded = _round_up(piece.nbytes)
            bounce[: piece.nbytes] = piece
            bounce[piece.nbytes : padded] = 0
            self._pwrite_all(fd, memoryview(bounce[:padded]), offset + start)

    def _pwrite_all(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < view.nbytes:
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as e:  # a file system that took O_DIRECT at open but refuses it on write
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self.direct = _set_direct(fd, False)

    def entry(self, name: str) -> TensorEntry:
        """Where variable `name` lies in the file, with its dtype and shape; KeyError when it is not there."""
        return self._entries[name]

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        buf = _aligned_empty(_round_up(entry.nbytes))
        view, done = memoryview(buf), 0
        while done < buf.nbytes:
            n = os.preadv(self._file.fileno(), [view[done : done + _MAX_IO]], entry.offset + done)
            if n <= 0:
                raise OSError(f"global model file: variable {entry.name!r} ends early ({done} of {buf.nbytes} bytes)")
            done += n
        return buf[: entry.nbytes].view(entry.dtype).reshape(entry.shape)

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


def _set_direct(fd: int, on: bool) -> bool:
    """Turn direct I/O on or off for `fd`; returns whether it is on (a file system may not support it)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return on

"""A site's received global model kept in an unnamed private file, read back one variable at a time."""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from fedcommon.direct_io import aligned_empty, pread_all, pwrite_all, round_up, set_direct
from fedcommon.dtypes import dtype_name
from fedcommon.model_file import TensorEntry
from fedcommon.tensor_codec import as_wire_array

_BOUNCE_BYTES = 8 * 1024 * 1024


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
            self.direct = set_direct(f.fileno(), True)  # False where the file system refuses direct I/O
            self._entries: dict[str, TensorEntry] = {}
            bounce, pos = aligned_empty(_BOUNCE_BYTES), 0
            for name, arr in arrays.items():
                self._entries[name] = TensorEntry(name, arr.dtype, tuple(arr.shape), pos, arr.nbytes)
                self._write(f.fileno(), arr.reshape(-1).view(np.uint8), pos, bounce)
                pos += round_up(arr.nbytes)
        except BaseException:
            f.close()
            raise
        self._file = f
        # A store dropped without close() still gives its disk space back.
        self._closer = weakref.finalize(self, f.close)

    def _write(self, fd: int, raw: np.ndarray, offset: int, bounce: np.ndarray) -> None:
        for start in range(0, raw.nbytes, bounce.nbytes):
            piece = raw[start : start + bounce.nbytes]
            padded = round_up(piece.nbytes)
            bounce[: piece.nbytes] = piece
            bounce[piece.nbytes : padded] = 0
            self.direct = pwrite_all(fd, memoryview(bounce[:padded]), offset + start, self.direct)

    def entry(self, name: str) -> TensorEntry:
        """Where variable `name` lies in the file, with its dtype and shape; KeyError when it is not there."""
        return self._entries[name]

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        buf = aligned_empty(round_up(entry.nbytes))
        pread_all(self._file.fileno(), memoryview(buf), entry.offset, f"global model file: variable {entry.name!r}")
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

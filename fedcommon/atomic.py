"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fedcommon.run_folder import make_folders


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: int = 0o600, direct: bool = False) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block completes; readers see old or new.

    direct: written in whole blocks with direct I/O where the file system allows it (write, seek and tell only), so
    a model-sized file costs no page-cache pages and its fsync has little left to do.
    """
    target = Path(path)
    make_folders(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        if direct:
            from fedcommon.direct_io import DirectWriter  # here: the console writes files too, without numpy

            try:
                writer = DirectWriter(fd)
                try:
                    yield writer  # type: ignore[misc]
                    writer.close()
                    os.fsync(fd)
                finally:
                    writer.abandon()  # no write of its thread may reach the fd once it is closed
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_writer(path, mode) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int = 0o600) -> None:
    """Replace `path` with `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), mode)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The .fl model file: a JSON index then raw little-endian tensors, 64-byte aligned; never pickle."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from fedcommon.atomic import atomic_writer
from fedcommon.chunk_wire import DataChunk
from fedcommon.direct_io import ReadAhead, aligned_empty, in_page_cache, range_bytes, read_range, reopen_direct
from fedcommon.dtypes import dtype_from_name, dtype_name
from fedcommon.tensor_codec import DEFAULT_CHUNK_BYTES, as_wire_array
from fedcommon.wire import training_pb2 as pb

MAGIC = b"FLMODEL1"
_ALIGN = 64
DIRECT_MIN_BYTES = 1 << 20  # smaller tensors: a page-cache read costs less than opening the file for direct I/O


class ModelFileError(ValueError):
    """A model file that cannot be read."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a model file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in bytes
    nbytes: int


@dataclass(frozen=True)
class ModelIndex:
    """A model file's index: its tensors in order, and free-form metadata."""

    entries: tuple[TensorEntry, ...]
    meta: dict[str, Any]

    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}


def _pad(n: int, align: int = _ALIGN) -> int:
    return (-n) % align


def _layout(
    specs: list[tuple[str, np.dtype, tuple[int, ...]]], meta: Mapping[str, Any], align: int = _ALIGN
) -> tuple[bytes, list[int]]:
    """The header bytes (magic, length, JSON, padding) and each tensor's absolute offset, each a multiple of `align`.

    An `align` beyond 64 pads the JSON with spaces so that the data starts at a multiple of it: readers that know
    only 64-byte alignment read the file as it is.
    """
    rel, pos = [], 0
    for _, dtype, shape in specs:
        rel.append(pos)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        pos += nbytes + _pad(nbytes, align)
    index = {
        "format": 1,
        "meta": dict(meta),
        "tensors": [
            {"name": n, "dtype": dtype_name(d), "shape": list(s), "offset": o}
            for (n, d, s), o in zip(specs, rel, strict=True)
        ],
    }
    body = json.dumps(index, separators=(",", ":")).encode()
    if align > _ALIGN:
        body += b" " * _pad(16 + len(body), align)
    head = MAGIC + struct.pack("<Q", len(body)) + body
    head += b"\0" * _pad(len(head))
    return head, [len(head) + o for o in rel]


class ModelFileWriter:
    """Writes a model file tensor by tensor (atomically), so a model never needs to be in memory twice.

    Tensors may come in any order (each is written at its place in the announced layout), each once.
    """

    def __init__(self, f: IO[bytes], specs: list[tuple[str, np.dtype, tuple[int, ...]]], meta: Mapping[str, Any]):
        self._f = f
        head, offsets = _layout(specs, meta)
        self._slots = {
            name: (dtype, tuple(shape), off) for (name, dtype, shape), off in zip(specs, offsets, strict=True)
        }
        self._order = [name for name, _, _ in specs]
        self._written: set[str] = set()
        f.write(head)
        self._pos = len(head)

    def write(self, name: str, arr: np.ndarray) -> None:
        """Write tensor `name`; it must be announced, not yet written, and match its dtype and shape."""
        arr = as_wire_array(arr)
        slot = self._slots.get(name)
        if slot is None:
            raise ModelFileError(f"writing {name!r}, which was not announced")
        if name in self._written:
            raise ModelFileError(f"writing {name!r} twice")
        dtype, shape, offset = slot
        if arr.dtype != dtype or tuple(arr.shape) != shape:
            raise ModelFileError(
                f"writing {name!r} {arr.dtype}{list(arr.shape)} where {dtype}{list(shape)} was announced"
            )
        if offset != self._pos:
            self._f.seek(offset)
        self._f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._f.write(b"\0" * _pad(arr.nbytes))
        self._pos = offset + arr.nbytes + _pad(arr.nbytes)
        self._written.add(name)

    def missing(self) -> list[str]:
        """Announced tensors not written yet, in layout order."""
        return [n for n in self._order if n not in self._written]

    def check_complete(self) -> None:
        missing = self.missing()
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelFileError(
                f"model file incomplete: {len(missing)} of {len(self._order)} tensors missing ({shown})"
            )


def save_model(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> None:
    """Write `tensors` to `path` atomically."""
    arrays = {k: as_wire_array(v) for k, v in tensors.items()}
    specs = [(k, a.dtype, tuple(a.shape)) for k, a in arrays.items()]
    with atomic_writer(path) as f:
        w = ModelFileWriter(f, specs, meta or {})
        for k, a in arrays.items():
            w.write(k, a)
        w.check_complete()


def allocate_model_file(
    f: IO[bytes], specs: list[tuple[str, np.dtype, tuple[int, ...]]], meta: Mapping[str, Any], align: int = _ALIGN
) -> ModelIndex:
    """Write a model file's index and size it (sparse, zeros until written); returns where each tensor lies.

    `align`: every tensor starts at a multiple of it (direct_io.BLOCK: each block belongs to one tensor).
    """
    head, offsets = _layout(specs, meta, align)
    f.seek(0)
    f.write(head)
    f.flush()
    entries = []
    end = len(head)
    for (name, dtype, shape), offset in zip(specs, offsets, strict=True):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        entries.append(TensorEntry(name, np.dtype(dtype), tuple(shape), offset, nbytes))
        end = offset + nbytes + _pad(nbytes, align)
    os.ftruncate(f.fileno(), end)
    return ModelIndex(tuple(entries), dict(meta))


def read_index(f: IO[bytes], path: str | os.PathLike = "<model>") -> ModelIndex:
    """Read and check the index at the start of an open model file."""
    f.seek(0)
    head = f.read(16)
    if len(head) < 16 or head[:8] != MAGIC:
        raise ModelFileError(f"{path}: not a fedlearn model file (bad magic)")
    (length,) = struct.unpack("<Q", head[8:16])
    if length > 64 * 1024 * 1024:
        raise ModelFileError(f"{path}: index of {length} bytes is implausibly large")
    try:
        index = json.loads(f.read(length))
        data_start = 16 + length + _pad(16 + length)
        entries = []
        for t in index["tensors"]:
            dtype = dtype_from_name(t["dtype"])
            shape = tuple(int(d) for d in t["shape"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            entries.append(TensorEntry(t["name"], dtype, shape, data_start + int(t["offset"]), nbytes))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: bad index: {e}") from e
    size = os.fstat(f.fileno()).st_size
    for e in entries:
        if e.offset + e.nbytes > size:
            raise ModelFileError(f"{path}: truncated: tensor {e.name!r} ends past the end of the file")
    return ModelIndex(tuple(entries), dict(index.get("meta", {})))


def read_tensor(f: IO[bytes], entry: TensorEntry) -> np.ndarray:
    """One tensor from an open model file, in a fresh writable array.

    A large tensor that is not in the page cache is read with direct I/O (see _uncached_fd): no page-cache pages.
    """
    fd = _uncached_fd(f, entry)
    if fd is not None:
        try:
            buf = aligned_empty(range_bytes(entry.offset, entry.nbytes))
            raw = read_range(fd, buf, entry.offset, entry.nbytes, f"tensor {entry.name!r}")
        except OSError as e:
            raise ModelFileError(f"tensor {entry.name!r}: {e}") from None
        finally:
            os.close(fd)
        return raw.view(entry.dtype).reshape(entry.shape)
    buf = np.empty(entry.nbytes, dtype=np.uint8)
    f.seek(entry.offset)
    if f.readinto(memoryview(buf)) != entry.nbytes:
        raise ModelFileError(f"tensor {entry.name!r}: short read")
    return buf.view(entry.dtype).reshape(entry.shape)


def _uncached_fd(f: IO[bytes], entry: TensorEntry) -> int | None:
    """A direct-I/O descriptor of `f`'s file when `entry` is large and not in the page cache, else None.

    Why: on a VM that backs memory lazily, filling new page-cache pages costs ~2 s of CPU per GiB, while a direct
    read costs disk time only; what is cached already is cheaper to read from the cache.
    """
    if entry.nbytes < DIRECT_MIN_BYTES:
        return None
    try:
        fileno = f.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory file
        return None
    if in_page_cache(fileno, entry.offset, entry.nbytes):
        return None
    fd, direct = reopen_direct(fileno)
    if not direct:
        os.close(fd)
        return None
    return fd


def load_model(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every tensor of a model file, and its metadata."""
    with open(path, "rb") as f:
        index = read_index(f, path)
        return {e.name: read_tensor(f, e) for e in index.entries}, index.meta


def iter_model_chunks(
    f: IO[bytes], index: ModelIndex, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.ModelChunk | DataChunk]:
    """Stream an open model file as wire chunks, straight from disk (no decoding).

    Each data chunk is a view of a buffer that a later chunk refills: send or copy it before taking the next
    (gRPC serializes each chunk before it asks for the next one). A large tensor that is not in the page cache is
    read with direct I/O, the next chunk read ahead by a thread while this one is sent.
    """
    buf = bytearray(min(chunk_bytes, max((e.nbytes for e in index.entries), default=0)))  # a small model: its size
    view = memoryview(buf)
    ahead = ReadAhead(chunk_bytes)
    for e in index.entries:
        yield pb.ModelChunk(
            tensor=pb.TensorHeader(name=e.name, dtype=dtype_name(e.dtype), shape=list(e.shape), nbytes=e.nbytes)
        )
        fd = _uncached_fd(f, e)
        if fd is not None:
            try:
                ranges = (
                    [(fd, e.offset + start, min(chunk_bytes, e.nbytes - start))]
                    for start in range(0, e.nbytes, chunk_bytes)
                )
                with contextlib.closing(ahead.read(ranges, f"tensor {e.name!r}")) as reads:
                    for (data,) in reads:  # before the file is closed, the reading thread has stopped
                        yield DataChunk(memoryview(data))
            finally:
                os.close(fd)
            continue
        f.seek(e.offset)
        left = e.nbytes
        while left:
            n = f.readinto(view[: min(left, chunk_bytes)])
            if not n:
                raise ModelFileError(f"tensor {e.name!r}: file ended early")
            yield DataChunk(view[:n])
            left -= n

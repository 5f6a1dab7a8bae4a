"""Tensors on the wire: a header (name, dtype, shape, size) then raw little-endian bytes in chunks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedcommon.chunk_wire import DataChunk
from fedcommon.dtypes import dtype_from_name, dtype_name
from fedcommon.wire import training_pb2 as pb

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
# Per gRPC message; a chunk plus its framing must fit (DESIGN §4: chunks of ~1-4 MiB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class CodecError(ValueError):
    """A tensor stream that does not follow the wire rules."""


@dataclass(frozen=True)
class TensorSpec:
    """What a TensorHeader announces."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# Offers the array a tensor is to be decoded into (its bytes are overwritten as they arrive), or None for a fresh
# buffer; an array that does not fit the tensor (fits()) is not used.
TensorSink = Callable[[TensorSpec], np.ndarray | None]


def fits(arr: object, spec: TensorSpec) -> bool:
    """True when `arr` can take the tensor's bytes in place: spec's dtype and shape, C-contiguous, writable."""
    return (
        isinstance(arr, np.ndarray)
        and arr.dtype == spec.dtype
        and arr.shape == spec.shape
        and arr.flags.c_contiguous
        and arr.flags.writeable
    )


def as_wire_array(arr: np.ndarray) -> np.ndarray:
    """`arr` as a C-contiguous little-endian array (no copy when it already is one)."""
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # not np.ascontiguousarray: it turns a 0-d array into a 1-d one
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def encode_tensor(
    name: str, arr: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.ModelChunk | DataChunk]:
    """One tensor as a TensorHeader chunk followed by its data chunks (views of the array: keep it unchanged
    until they are sent)."""
    arr = as_wire_array(arr)
    raw = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")
    yield pb.ModelChunk(
        tensor=pb.TensorHeader(name=name, dtype=dtype_name(arr.dtype), shape=list(arr.shape), nbytes=raw.nbytes)
    )
    for start in range(0, raw.nbytes, chunk_bytes):
        yield DataChunk(raw[start : start + chunk_bytes])


def encode_tensors(
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.ModelChunk | DataChunk]:
    """Every tensor of a model, in order, as chunks."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, arr in items:
        yield from encode_tensor(name, arr, chunk_bytes)


def spec_from_header(header: pb.TensorHeader) -> TensorSpec:
    """Check a TensorHeader's own consistency and return what it announces."""
    if not header.name:
        raise CodecError("tensor header without a name")
    dtype = dtype_from_name(header.dtype)
    shape = tuple(int(d) for d in header.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"tensor {header.name!r}: negative dimension in shape {shape}")
    spec = TensorSpec(header.name, dtype, shape)
    if header.nbytes != spec.nbytes:
        raise CodecError(
            f"tensor {header.name!r}: header says {header.nbytes} bytes but {header.dtype}{list(shape)} "
            f"needs {spec.nbytes}"
        )
    return spec


class TensorAssembler:
    """Rebuilds tensors from TensorHeader/data chunks into preallocated buffers, one tensor at a time.

    With a `sink`, a tensor goes straight into the array the sink offers for it (no buffer of its own, no copy);
    a stream that breaks off leaves that array partly overwritten.
    """

    def __init__(self, sink: TensorSink | None = None) -> None:
        self._sink = sink
        self._spec: TensorSpec | None = None
        self._target: np.ndarray | None = None  # the sink's array the current tensor goes into
        self._buf: np.ndarray | None = None
        self._filled = 0

    @property
    def in_tensor(self) -> bool:
        """True while a tensor's data is still expected."""
        return self._spec is not None

    def start(self, header: pb.TensorHeader, spec: TensorSpec | None = None) -> tuple[str, np.ndarray] | None:
        """Begin a tensor; returns it at once when it has no bytes."""
        if self._spec is not None:
            raise CodecError(
                f"tensor {header.name!r} started before tensor {self._spec.name!r} was complete "
                f"({self._filled} of {self._spec.nbytes} bytes)"
            )
        spec = spec or spec_from_header(header)
        self._spec, self._filled = spec, 0
        target = self._sink(spec) if self._sink is not None else None
        if fits(target, spec):
            self._target, self._buf = target, target.reshape(-1).view(np.uint8)
        else:
            self._buf = np.empty(spec.nbytes, dtype=np.uint8)
        return self._finish() if spec.nbytes == 0 else None

    def feed(self, data: bytes | memoryview) -> tuple[str, np.ndarray] | None:
        """Add a data chunk; returns (name, array) when the tensor is complete."""
        if self._spec is None or self._buf is None:
            raise CodecError("data chunk outside a tensor (no tensor header before it)")
        end = self._filled + len(data)
        if end > self._spec.nbytes:
            raise CodecError(f"tensor {self._spec.name!r}: more data than the {self._spec.nbytes} bytes announced")
        self._buf[self._filled : end] = np.frombuffer(data, dtype=np.uint8)
        self._filled = end
        return self._finish() if end == self._spec.nbytes else None

    def _finish(self) -> tuple[str, np.ndarray]:
        assert self._spec is not None and self._buf is not None
        arr = self._target if self._target is not None else self._buf.view(self._spec.dtype).reshape(self._spec.shape)
        name = self._spec.name
        self._spec, self._target, self._buf, self._filled = None, None, None, 0
        return name, arr

    def pending_description(self) -> str:
        """Words for an incomplete tensor, for error messages."""
        if self._spec is None:
            return "no tensor in progress"
        return f"tensor {self._spec.name!r} has {self._filled} of {self._spec.nbytes} bytes"


def decode_tensors(
    chunks: Iterable[pb.ModelChunk | DataChunk],
    sink: TensorSink | None = None,
    on_tensor: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Tensors from a stream of TensorHeader/data chunks (header chunks are refused here).

    With `sink`, each tensor is decoded into the array the sink offers for it (that array is returned as the
    tensor); a stream that fails part-way leaves the arrays offered so far overwritten, some of them partly.
    `on_tensor(name, array)` is told of each tensor as soon as it is whole and passed the checks (before the stream
    ends); what it raises ends the decoding.
    """
    out: dict[str, np.ndarray] = {}
    asm = TensorAssembler(sink)
    for chunk in chunks:
        part = chunk.WhichOneof("part")
        if part == "tensor":
            done = asm.start(chunk.tensor)
        elif part == "data":
            done = asm.feed(chunk.data)
        else:
            raise CodecError(f"unexpected {part!r} chunk inside a tensor stream")
        if done is not None:
            if done[0] in out:
                raise CodecError(f"tensor {done[0]!r} appears twice")
            out[done[0]] = done[1]
            if on_tensor is not None:
                on_tensor(*done)
    if asm.in_tensor:
        raise CodecError(f"stream ended early: {asm.pending_description()}")
    return out

"""An upload written into its own staging file as it arrives, chunk by chunk, every check on the way: memory
O(chunk), never O(model) (DESIGN §4). Written with direct I/O where the file system allows it, so a model-sized
upload costs no page-cache pages (fedcommon.direct_io)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fedcommon.direct_io import BLOCK, DirectWriter, io_block_bytes
from fedcommon.dtypes import accumulator_dtype
from fedcommon.model_file import allocate_model_file
from fedcommon.run_folder import make_folders
from fedcommon.tensor_codec import CodecError, TensorAssembler, TensorSpec, spec_from_header
from fedcommon.wire import training_pb2 as pb
from fedserver.aggregator import ContributionError, UpdateAccumulator, VarSpec
from fedserver.memory_sum import SumWriter

# What the receiver does with a tensor, as a route callback decides after checking its header.
STAGE = "stage"  # an aggregated variable: into the staging file
KEEP = "keep"  # held in memory (SCAFFOLD's delta c)
DROP = "drop"  # checked, then dropped (an excluded variable)


class StagedUpload:
    """One contribution's aggregated variables in a model file laid out in their accumulator dtypes.

    Every aggregated variable has its place (zeros until written, each starting at a block); `received` names
    those the upload carried. The owner either hands the file on (`taken`) or calls `discard`.
    """

    def __init__(
        self,
        folder: Path,
        specs: dict[str, VarSpec],
        excluded: frozenset[str] = frozenset(),
        mirror: SumWriter | None = None,
    ):
        """mirror: where the values also go as they are written (the open round's sum in memory, if it has one)."""
        make_folders(folder)
        self.mirror = mirror
        self.path = folder / f"upload-{secrets.token_hex(8)}.fl"
        self.received: set[str] = set()
        self.extra: dict[str, np.ndarray] = {}  # tensors kept in memory (SCAFFOLD's delta c)
        self.taken = False
        layout = [(n, accumulator_dtype(s.dtype), s.shape) for n, s in specs.items() if n not in excluded]
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._writer: DirectWriter | None = None
        self.direct = False
        try:
            with open(os.dup(self._fd), "r+b") as f:
                self.index = allocate_model_file(f, layout, {"kind": "staged upload"}, BLOCK)
            end = max((e.offset + e.nbytes for e in self.index.entries), default=0)
            self._writer = DirectWriter(self._fd, io_block_bytes(end))
            self.direct = self._writer.direct  # False where the file system refuses direct I/O
        except BaseException:
            self.discard()
            raise
        self._entries = self.index.by_name()

    @classmethod
    def from_arrays(
        cls, folder: Path, specs: dict[str, VarSpec], excluded: frozenset[str], update: dict[str, np.ndarray]
    ) -> StagedUpload:
        """An update given as arrays, staged; empties `update` (what is not an aggregated variable goes to `extra`)."""
        staged = cls(folder, specs, excluded)
        try:
            for name in list(update):
                arr = np.asarray(update.pop(name))
                if name in staged._entries:
                    staged.write(name, 0, arr.reshape(-1))
                else:
                    staged.extra[name] = arr
            staged.close()
        except BaseException:
            staged.discard()
            raise
        return staged

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Write the flat `values` of variable `name` from element `start` on, in its accumulator dtype."""
        entry = self._entries[name]
        if values.dtype.kind == "u":  # an unsigned update that went down wrapped around on the site: signed
            values = values.view(values.dtype.str.replace("u", "i"))
        if values.dtype != entry.dtype:
            values = values.astype(entry.dtype)
        if self._writer is None:
            raise ValueError(f"{self.path.name}: written after close")
        values = np.ascontiguousarray(values).reshape(-1)
        self._writer.pwrite(values.view(np.uint8), entry.offset + start * entry.dtype.itemsize)
        if self.mirror is not None:
            self.mirror.add(name, start, values)
        self.received.add(name)

    def close(self) -> None:
        """Done writing: what is buffered goes to the file (which stays)."""
        if self._fd < 0:
            return
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
                self.direct = writer.direct
        finally:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Close, and delete the file unless it was taken; safe to call more than once."""
        try:
            if not self.taken and self.mirror is not None:
                self.mirror.drop()
            if not self.taken and self._writer is not None:  # its buffered bytes are of no use: not written
                self._writer.abandon()
                self._writer = None
            self.close()
        finally:
            if not self.taken:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


def stage_tensors(
    chunks: Iterable[pb.ModelChunk], route: Callable[[TensorSpec], str], staged: StagedUpload, what: str
) -> tuple[int, int]:
    """Write an upload's tensors into `staged` chunk by chunk; returns (tensors received, bytes received).

    `route` checks each header and says where the tensor goes (STAGE, KEEP or DROP). Every value is checked
    (NaN, Inf, value bound) as it arrives. ContributionError or CodecError for a variable sent twice, a second
    header, more data than announced, or an upload that ends mid-tensor.
    """
    seen: set[str] = set()
    received = size = 0
    spec: TensorSpec | None = None
    mode, filled, carry = DROP, 0, b""
    keep = TensorAssembler()
    for chunk in chunks:
        part = chunk.WhichOneof("part")
        if part == "tensor":
            if spec is not None:
                raise CodecError(
                    f"tensor {chunk.tensor.name!r} started before tensor {spec.name!r} was complete "
                    f"({filled} of {spec.nbytes} bytes)"
                )
            new = spec_from_header(chunk.tensor)
            if new.name in seen:
                raise ContributionError(f"variable {new.name!r} appears twice")
            seen.add(new.name)
            mode = route(new)
            if mode == KEEP:
                done = keep.start(chunk.tensor, new)
                if done is not None:
                    staged.extra[done[0]] = done[1]
                    received += 1
                else:
                    spec = new
                continue
            if new.nbytes == 0:
                received += 1
                if mode == STAGE:
                    staged.received.add(new.name)
                continue
            spec, filled, carry = new, 0, b""
        elif part == "data":
            if spec is None:
                raise CodecError("data chunk outside a tensor (no tensor header before it)")
            data = chunk.data
            size += len(data)
            if mode == KEEP:
                done = keep.feed(data)
                if done is not None:
                    staged.extra[done[0]] = done[1]
                    received, spec = received + 1, None
                continue
            if filled + len(data) > spec.nbytes:
                raise CodecError(f"tensor {spec.name!r}: more data than the {spec.nbytes} bytes announced")
            item = spec.dtype.itemsize
            if carry:  # an element split across chunks
                data = carry + bytes(data)
            whole = len(data) - len(data) % item
            start = (filled - len(carry)) // item
            values = np.frombuffer(data, spec.dtype, whole // item)
            UpdateAccumulator.check_finite(spec.name, values)
            if mode == STAGE and whole:
                staged.write(spec.name, start, values)
            carry = bytes(data[whole:])
            filled += len(chunk.data)
            if filled == spec.nbytes:
                if mode == STAGE:
                    staged.received.add(spec.name)
                received, spec = received + 1, None
        else:
            raise ContributionError(f"a second header inside {what}")
    if spec is not None:
        shown = (
            keep.pending_description() if mode == KEEP else f"tensor {spec.name!r} has {filled} of {spec.nbytes} bytes"
        )
        raise ContributionError(f"{what} ended early: {shown}")
    return received, size

"""Files operators upload (deployed MMAR zips): checked by size and sha256, kept as <sha256>.zip."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcommon import commands
from fedcommon.wire import admin_pb2 as pb

log = logging.getLogger(__name__)

MAX_BLOB_BYTES = 2 << 30
CHUNK_BYTES = 1 << 20


class BlobError(Exception):
    """An upload or fetch refused; `code` is "invalid_argument", "resource_exhausted" or "not_found"."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> grpc.StatusCode:
        """The gRPC status a peer sees."""
        return _STATUS[self.code]


_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its id (= sha256 hex), size in bytes and path."""

    blob_id: str
    size: int
    path: Path


def check_blob_id(value: str) -> str:
    """The id if it is a lowercase sha256 hex digest, else BlobError (ids become file names)."""
    try:
        return commands.blob_id(value, "blob id")
    except commands.ArgumentError as e:
        raise BlobError("invalid_argument", str(e)) from None


class BlobStore:
    """Uploads under one folder; each is written to a .part file and renamed once size and sha256 match."""

    def __init__(self, root: Path, max_bytes: int = MAX_BLOB_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def receive(self, chunks: Iterable[pb.BlobChunk]) -> BlobInfo:
        """Store a stream of one BlobHeader then data chunks; raise BlobError naming what differed."""
        it = iter(chunks)
        first = next(it, None)
        if first is None or first.WhichOneof("part") != "header":
            raise BlobError("invalid_argument", "an upload must start with a BlobHeader")
        header = first.header
        expected_sha = header.sha256.lower()
        check_blob_id(expected_sha)
        if header.size > self.max_bytes:
            raise BlobError(
                "resource_exhausted", f"upload {header.name!r} is {header.size} bytes; the limit is {self.max_bytes}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{expected_sha}.", suffix=".part", dir=self.root)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in it:
                    if chunk.WhichOneof("part") != "data":
                        raise BlobError("invalid_argument", "a second BlobHeader inside an upload")
                    size += len(chunk.data)
                    if size > header.size:
                        raise BlobError(
                            "invalid_argument",
                            f"upload {header.name!r} carries more than the {header.size} bytes its header announced",
                        )
                    digest.update(chunk.data)
                    f.write(chunk.data)
                f.flush()
                os.fsync(f.fileno())
            if size != header.size:
                raise BlobError(
                    "invalid_argument", f"upload {header.name!r}: size {size} differs from the header's {header.size}"
                )
            actual = digest.hexdigest()
            if actual != expected_sha:
                raise BlobError(
                    "invalid_argument",
                    f"upload {header.name!r}: sha256 {actual} differs from the header's {expected_sha}",
                )
            final = self.root / f"{expected_sha}.zip"
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        log.info("stored upload %s (%d bytes) as %s", header.name, size, final.name)
        return BlobInfo(expected_sha, size, final)

    def get(self, blob_id: str) -> BlobInfo:
        """The stored blob `blob_id`, or BlobError not_found."""
        path = self.root / f"{check_blob_id(blob_id)}.zip"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BlobError("not_found", f"blob {blob_id} is not uploaded (upload it first)") from None
        return BlobInfo(blob_id, size, path)

    def iter_chunks(self, blob_id: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.BlobChunk]:
        """A BlobHeader, then the content in `chunk_bytes` pieces."""
        info = self.get(blob_id)
        with open(info.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            yield pb.BlobChunk(header=pb.BlobHeader(name=info.path.name, size=size, sha256=blob_id))
            while data := f.read(chunk_bytes):
                yield pb.BlobChunk(data=data)

"""Files operators upload (deployed MMAR zips): checked by size, sha256 and zip signature, kept as <sha256>.zip
until the targets it was deployed to have taken it (or a timeout), and fetchable by those targets only."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedcommon import commands
from fedcommon.wire import admin_pb2 as pb

log = logging.getLogger(__name__)

MAX_BLOB_BYTES = 2 << 30
# Everything kept and being uploaded at once; an upload past it is refused before its data is sent.
MAX_TOTAL_BYTES = 8 << 30
# An upload not deployed within this long is deleted; a target has this long after the deploy to fetch it.
BLOB_TTL_S = 3600.0
CHUNK_BYTES = 1 << 20
# A zip starts with a local file header, or (an empty archive) with the end of central directory.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")


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


@dataclass
class _Kept:
    """What the store remembers of a stored blob: when it expires, and who may still take it."""

    size: int
    expires: float
    takers: set[str] = field(default_factory=set)  # deploy targets that have not taken it yet ("server" too)
    deployed: bool = False


def check_blob_id(value: str) -> str:
    """The id if it is a lowercase sha256 hex digest, else BlobError (ids become file names)."""
    try:
        return commands.blob_id(value, "blob id")
    except commands.ArgumentError as e:
        raise BlobError("invalid_argument", str(e)) from None


class BlobStore:
    """Uploads under one folder; each is written to a .part file and renamed once size, sha256 and zip match.

    A blob lives until every target of its deploy took it (a site by fetching it whole, the server by deploying
    it), or ttl_s after its upload or its last deploy; all blobs, kept and arriving, stay under max_total_bytes.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int = MAX_BLOB_BYTES,
        max_total_bytes: int = MAX_TOTAL_BYTES,
        ttl_s: float = BLOB_TTL_S,
    ):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._kept: dict[str, _Kept] = {}
        self._arriving = 0  # bytes announced by uploads in progress
        self._adopt()

    def _adopt(self) -> None:
        """Uploads left by an earlier server: broken ones are removed, whole ones kept for ttl_s from now."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name.endswith(".part"):
                path.unlink(missing_ok=True)
            elif path.suffix == ".zip" and path.is_file():
                self._kept[path.stem] = _Kept(path.stat().st_size, time.monotonic() + self.ttl_s)

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
        self._reserve(header.name, header.size)
        try:
            return self._store(it, header, expected_sha)
        finally:
            with self._lock:
                self._arriving -= header.size

    def _reserve(self, name: str, size: int) -> None:
        self.sweep()
        with self._lock:
            held = sum(k.size for k in self._kept.values()) + self._arriving
            if held + size > self.max_total_bytes:
                raise BlobError(
                    "resource_exhausted",
                    f"upload {name!r} ({size} bytes) does not fit: {held} bytes of uploads are kept or "
                    f"arriving, the limit is {self.max_total_bytes}; retry once a deploy has taken them",
                )
            self._arriving += size

    def _store(self, it: Iterator[pb.BlobChunk], header: pb.BlobHeader, expected_sha: str) -> BlobInfo:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{expected_sha}.", suffix=".part", dir=self.root)
        try:
            digest = hashlib.sha256()
            size = 0
            start = b""
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
                    if len(start) < 4:
                        start = (start + chunk.data)[:4]
                        _check_zip_start(header.name, start, size == header.size)
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
            _check_zip_start(header.name, start, True)
            if not zipfile.is_zipfile(tmp):
                raise BlobError("invalid_argument", f"upload {header.name!r} is not a zip archive (an MMAR is one)")
            final = self.root / f"{expected_sha}.zip"
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            kept = self._kept.setdefault(expected_sha, _Kept(size, 0.0))
            kept.expires = max(kept.expires, time.monotonic() + self.ttl_s)
        log.info("stored upload %s (%d bytes) as %s", header.name, size, final.name)
        return BlobInfo(expected_sha, size, final)

    def add(self, path: Path, blob_id: str) -> BlobInfo:
        """Keep a file the server already holds (a job's archive, sha256 `blob_id`) as a blob for its sites to fetch."""
        check_blob_id(blob_id)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{blob_id}.zip"
        if not final.exists():
            fd, tmp = tempfile.mkstemp(prefix=f"{blob_id}.", suffix=".part", dir=self.root)
            os.close(fd)
            try:
                os.unlink(tmp)
                try:
                    os.link(path, tmp)
                except OSError:
                    shutil.copyfile(path, tmp)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        size = final.stat().st_size
        with self._lock:
            kept = self._kept.setdefault(blob_id, _Kept(size, 0.0))
            kept.expires = max(kept.expires, time.monotonic() + self.ttl_s)
        return BlobInfo(blob_id, size, final)

    # ---- who may take a blob, and when it goes ---------------------------------------------------

    def grant(self, blob_id: str, takers: Iterable[str]) -> None:
        """A deploy sends `blob_id` to `takers` (sites, and "server" when it deploys it too): only they may fetch
        it, and it is deleted once each has taken it (or ttl_s from now)."""
        with self._lock:
            kept = self._kept.get(blob_id)
            if kept is None:
                return
            kept.takers.update(takers)
            kept.deployed = True
            kept.expires = time.monotonic() + self.ttl_s
            if not kept.takers:
                self._delete(blob_id)

    def check_fetch(self, site: str, blob_id: str) -> BlobInfo:
        """The blob if a deploy sent it to `site` and `site` has not taken it yet; else BlobError not_found."""
        check_blob_id(blob_id)
        with self._lock:
            kept = self._kept.get(blob_id)
            allowed = kept is not None and site in kept.takers
        if not allowed:
            raise BlobError("not_found", f"no blob {blob_id} is deployed to {site}")
        return self.get(blob_id)

    def taken(self, taker: str, blob_id: str) -> None:
        """`taker` has the blob (fetched it whole, or deployed it); the last taker's take deletes it."""
        with self._lock:
            kept = self._kept.get(blob_id)
            if kept is None:
                return
            kept.takers.discard(taker)
            if kept.deployed and not kept.takers:
                self._delete(blob_id)

    def sweep(self) -> None:
        """Delete the blobs whose time is up (never deployed, or some target never took it)."""
        now = time.monotonic()
        with self._lock:
            for blob_id in [b for b, k in self._kept.items() if k.expires <= now]:
                self._delete(blob_id)

    def _delete(self, blob_id: str) -> None:
        """Call with the lock held. A site still reading the file keeps its open copy."""
        self._kept.pop(blob_id, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / f"{blob_id}.zip")
        log.info("upload %s deleted", blob_id)

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


def _check_zip_start(name: str, start: bytes, complete: bool) -> None:
    """Refuse an upload as soon as its first bytes show it is not a zip (complete: no more bytes will come)."""
    if len(start) < 4 and not complete:
        if not any(sig.startswith(start) for sig in _ZIP_SIGNATURES):
            raise BlobError("invalid_argument", f"upload {name!r} is not a zip archive (an MMAR is one)")
        return
    if start[:4] not in _ZIP_SIGNATURES:
        raise BlobError("invalid_argument", f"upload {name!r} is not a zip archive (an MMAR is one)")

"""Files operators upload (deployed MMAR zips): checked by size, sha256, zip magic and the uploading admin's
signature, kept as <sha256>.zip (its signature beside it, <sha256>.sig) until the targets it was deployed to have
taken it (or a timeout), and fetchable by those targets only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedcommon import commands
from fedcommon.archive_signature import ArchiveSignature, SignatureChecks, SignatureError
from fedcommon.atomic import atomic_write_json
from fedcommon.identity import PeerIdentity
from fedcommon.wire import admin_pb2 as pb

log = logging.getLogger(__name__)

MAX_BLOB_BYTES = 2 << 30
# Everything kept and being uploaded at once; an upload past it is refused before its data is sent.
MAX_TOTAL_BYTES = 8 << 30
# An upload not deployed within this long is deleted; a target has this long after the deploy to fetch it.
BLOB_TTL_S = 3600.0
CHUNK_BYTES = 1 << 20
SIGNATURE_SUFFIX = ".sig"
_MAX_SIGNATURE_FILE = 32 << 10
# A zip starts with a local file header, or (an empty archive) with the end of central directory.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")


class BlobError(Exception):
    """An upload or fetch refused; `code` is "invalid_argument", "permission_denied", "resource_exhausted" or
    "not_found"."""

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
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its id (= sha256 hex), size in bytes, path, and the signature of its latest uploader."""

    blob_id: str
    size: int
    path: Path
    signature: ArchiveSignature | None = None


@dataclass
class _Kept:
    """What the store remembers of a stored blob: when it expires, and who may still take it."""

    size: int
    expires: float
    takers: set[str] = field(default_factory=set)  # deploy targets that have not taken it yet ("server" too)
    deployed: bool = False
    # Uses still to come: each upload (and each job archive added) is one, until a deploy grants it or a submit
    # takes it. The same archive uploaded again while an earlier deploy of it is being fetched is not deleted under
    # the new upload's command when that deploy's last target takes it.
    holds: int = 0


def check_blob_id(value: str) -> str:
    """The id if it is a lowercase sha256 hex digest, else BlobError (ids become file names)."""
    try:
        return commands.blob_id(value, "blob id")
    except commands.ArgumentError as e:
        raise BlobError("invalid_argument", str(e)) from None


class BlobStore:
    """Uploads under one folder; each is written to a .part file and renamed once size, sha256, zip and the
    uploader's signature (checked by `verifier`) match.

    A blob lives until every target of its deploy took it (a site by fetching it whole, the server by deploying
    it), or ttl_s after its upload or its last deploy; all blobs, kept and arriving, stay under max_total_bytes.
    """

    def __init__(
        self,
        root: Path,
        verifier: SignatureChecks,
        max_bytes: int = MAX_BLOB_BYTES,
        max_total_bytes: int = MAX_TOTAL_BYTES,
        ttl_s: float = BLOB_TTL_S,
    ):
        self.root = Path(root)
        self.verifier = verifier
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._kept: dict[str, _Kept] = {}
        self._arriving = 0  # bytes announced by uploads in progress
        self._adopt()

    def _adopt(self) -> None:
        """Uploads left by an earlier server: broken or unsigned ones are removed, whole ones kept for ttl_s."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name.endswith((".part", ".tmp")):
                path.unlink(missing_ok=True)
            elif path.suffix == ".zip" and path.is_file():
                if self._signature(path.stem) is None:
                    log.warning("upload %s has no signature beside it; deleted", path.name)
                    self._remove_files(path.stem)
                else:
                    self._kept[path.stem] = _Kept(path.stat().st_size, time.monotonic() + self.ttl_s)
            elif path.suffix == SIGNATURE_SUFFIX and not path.with_suffix(".zip").exists():
                path.unlink(missing_ok=True)

    def receive(self, chunks: Iterable[pb.BlobChunk], uploader: str) -> BlobInfo:
        """Store a stream of one BlobHeader then data chunks, signed by the admin named `uploader`; raise BlobError
        naming what differed (an unsigned or untrusted upload is refused at its header, before its data)."""
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
        signature = None
        if header.signature or header.signer_certificate:
            signature = ArchiveSignature(header.signature, header.signer_certificate)
        self._verify(header.name, lambda: self.verifier.check_signer(signature, uploader))
        self._reserve(header.name, header.size)
        try:
            return self._store(it, header, expected_sha, signature, uploader)
        finally:
            with self._lock:
                self._arriving -= header.size

    @staticmethod
    def _verify(name: str, check: Callable[[], object]) -> None:
        """check(), its SignatureError refused as this upload's BlobError (PERMISSION_DENIED for a signer)."""
        try:
            check()
        except SignatureError as e:
            code = "permission_denied" if e.permission else "invalid_argument"
            raise BlobError(code, f"upload {name!r} refused: {e}") from None

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

    def _store(
        self,
        it: Iterator[pb.BlobChunk],
        header: pb.BlobHeader,
        expected_sha: str,
        signature: ArchiveSignature | None,
        uploader: str,
    ) -> BlobInfo:
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
            # The digest is the one computed above from the bytes received, not the header's claim.
            self._verify(header.name, lambda: self.verifier.verify_digest(signature, actual, size, uploader))
            final = self.root / f"{expected_sha}.zip"
            # The signature is written first: a zip is never on disk without the signature it was accepted with.
            atomic_write_json(self.root / f"{expected_sha}{SIGNATURE_SUFFIX}", signature.to_text())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            kept = self._kept.setdefault(expected_sha, _Kept(size, 0.0))
            kept.expires = max(kept.expires, time.monotonic() + self.ttl_s)
            kept.holds += 1
        log.info("stored upload %s (%d bytes) as %s", header.name, size, final.name)
        return BlobInfo(expected_sha, size, final)

    def add(self, path: Path, blob_id: str, signature: ArchiveSignature) -> BlobInfo:
        """Keep a file the server already holds (a job's archive, sha256 `blob_id`, signed by its submitter) as a
        blob for its sites to fetch; the signature is written beside it first, as an upload's is."""
        check_blob_id(blob_id)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{blob_id}.zip"
        atomic_write_json(self.root / f"{blob_id}{SIGNATURE_SUFFIX}", signature.to_text())
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
            kept.holds += 1
        return BlobInfo(blob_id, size, final, signature)

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
            kept.holds = max(0, kept.holds - 1)
            kept.expires = time.monotonic() + self.ttl_s
            if not kept.takers and not kept.holds:
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
            if kept.deployed and not kept.takers and not kept.holds:
                self._delete(blob_id)

    def used(self, blob_id: str) -> None:
        """A command other than a deploy (a job's submit, which copied the archive) is done with its upload."""
        with self._lock:
            kept = self._kept.get(blob_id)
            if kept is None:
                return
            kept.holds = max(0, kept.holds - 1)
            if kept.deployed and not kept.takers and not kept.holds:
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
        self._remove_files(blob_id)
        log.info("upload %s deleted", blob_id)

    def _remove_files(self, blob_id: str) -> None:
        for suffix in (".zip", SIGNATURE_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / f"{blob_id}{suffix}")

    def _signature(self, blob_id: str) -> ArchiveSignature | None:
        """The signature kept beside blob_id, or None when there is none or it cannot be read (refused later)."""
        path = self.root / f"{blob_id}{SIGNATURE_SUFFIX}"
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read(_MAX_SIGNATURE_FILE + 1)[:_MAX_SIGNATURE_FILE])
            return ArchiveSignature.from_text(record.get("signature"), record.get("signer_certificate"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            log.error("%s: unreadable signature record (%s)", path, e)
            return None

    def get(self, blob_id: str) -> BlobInfo:
        """The stored blob `blob_id` with its signature, or BlobError not_found."""
        path = self.root / f"{check_blob_id(blob_id)}.zip"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BlobError("not_found", f"blob {blob_id} is not uploaded (upload it first)") from None
        return BlobInfo(blob_id, size, path, self._signature(blob_id))

    def verify(self, blob_id: str) -> PeerIdentity:
        """The signer of the stored blob, its signature checked again over the file as it is now (a revocation
        since the upload counts); SignatureError says why it is refused."""
        blob = self.get(blob_id)
        signer = self.verifier.verify_file(blob.path, blob.signature)
        log.info("upload %s: signed by %s", blob_id, signer.describe())
        return signer

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

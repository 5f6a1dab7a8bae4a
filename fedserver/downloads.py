"""Archives the server prepares for one admin to fetch once (job download): bound to that admin's certificate name,
gone once fetched or after TTL_S, at most MAX_PER_ADMIN waiting per admin."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedcommon.admin_defs import AdminIdentity
from fedcommon.wire import admin_pb2 as pb

log = logging.getLogger(__name__)

DOWNLOADS_DIR = "downloads"
TTL_S = 600.0
MAX_PER_ADMIN = 4
CHUNK_BYTES = 1 << 20


class DownloadError(Exception):
    """A download that is not there for this caller, or one too many waiting."""


@dataclass
class Download:
    download_id: str
    owner: str
    name: str
    path: Path
    expires: float
    size: int = 0
    ready: bool = False


class Downloads:
    """The waiting downloads, each a file under <ws>/downloads/."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._waiting: dict[str, Download] = {}
        if self.root.is_dir():  # what an earlier server prepared is nobody's now
            for path in self.root.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()

    def create(self, owner: AdminIdentity, name: str) -> Download:
        """A new, empty download for `owner` to write into; `ready` when written."""
        self.sweep()
        with self._lock:
            mine = [d for d in self._waiting.values() if d.owner == owner.name]
            if len(mine) >= MAX_PER_ADMIN:
                raise DownloadError(
                    f"{owner.name} has {len(mine)} downloads waiting to be fetched; fetch them or wait {TTL_S:g}s"
                )
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            download_id = secrets.token_hex(16)
            path = self.root / f"{download_id}.zip"
            download = Download(download_id, owner.name, name, path, time.monotonic() + TTL_S)
            self._waiting[download_id] = download
        return download

    def ready(self, download: Download) -> None:
        """The download's file is complete: it may be fetched."""
        os.chmod(download.path, 0o600)
        download.size = download.path.stat().st_size
        download.ready = True

    def discard(self, download: Download) -> None:
        """Drop a download that could not be made, and its file."""
        with self._lock:
            self._waiting.pop(download.download_id, None)
        with contextlib.suppress(FileNotFoundError):
            download.path.unlink()

    def fetch(self, caller: AdminIdentity, download_id: str) -> Iterator[pb.BlobChunk]:
        """A BlobHeader and the content; the download is gone afterwards. DownloadError unless it is the caller's."""
        with self._lock:
            download = self._waiting.get(download_id)
            if download is None or download.owner != caller.name or not download.ready:
                raise DownloadError(f"no download {download_id[:40]!r} is waiting for {caller.name}")
            del self._waiting[download_id]
        try:
            with open(download.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                yield pb.BlobChunk(header=pb.BlobHeader(name=download.name, size=size))
                while data := f.read(CHUNK_BYTES):
                    yield pb.BlobChunk(data=data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                download.path.unlink()

    def sweep(self) -> None:
        """Delete the downloads nobody fetched in time."""
        now = time.monotonic()
        with self._lock:
            expired = [d for d in self._waiting.values() if d.expires <= now]
            for d in expired:
                del self._waiting[d.download_id]
        for d in expired:
            with contextlib.suppress(FileNotFoundError):
                d.path.unlink()

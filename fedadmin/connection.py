"""The console's mutual-TLS connection to the server's admin port: Execute, Upload, and errors as exit codes."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# gRPC's core writes its own lines (a failed handshake, a dropped connection) to stderr; the console says what went
# wrong itself. `fedadmin --debug` lets them through.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc

from fedadmin.errors import CommandTimeout, NotConnected, RemoteError
from fedcommon.admin_serde import outcome_from_wire
from fedcommon.commands import command as declared
from fedcommon.kit import Kit, KitError, channel_credentials, load_kit
from fedcommon.outcome import CommandOutcome
from fedcommon.wire import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
# Seconds the server may take beyond the time it waits for the sites' replies.
DEADLINE_MARGIN = 5.0
# The sites' reply wait assumed when the console leaves it to the server's setting (set-timeout).
UNKNOWN_SERVER_WAIT = 60.0
# Uploads get this long plus one second per MiB (a link slower than 1 MiB/s needs --timeout).
UPLOAD_BASE_DEADLINE = 60.0
_MAX_REPLY = 64 << 20
# Short reconnect backoff: polling loops (poc start, wait) see a restarted server within a second or two.
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


# The console's names for fedadmin.errors' NotConnected (exit 3) and RemoteError (exit 1).
ConnectionFailed = NotConnected


@dataclass(frozen=True)
class Uploaded:
    """A file the server holds now, under blob_id (its sha256)."""

    blob_id: str
    size: int
    sha256: str


class AdminConnection:
    """A channel to the admin port of the server named in an admin kit; use as a context manager."""

    def __init__(self, kit_folder: Path, timeout: float | None = None) -> None:
        """Load the admin kit (ConnectionFailed if unusable); connect lazily on the first call."""
        self.kit = _load_admin_kit(kit_folder)
        self.timeout = timeout
        self.target = self.kit.admin_target
        self._channel = grpc.secure_channel(
            self.target,
            channel_credentials(self.kit),
            options=[("grpc.max_receive_message_length", _MAX_REPLY), *_RECONNECT],
        )
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> AdminConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def execute(self, command: str, targets: list[str], args: dict[str, Any] | None = None) -> CommandOutcome:
        """Run one command at targets; one reply per target (a named target the server left out is a failure).

        The arguments are checked with the command's declaration first (fedcommon.commands.ArgumentError).
        """
        declared(command).check_args(args or {})
        request = admin_pb2.CommandRequest(
            command=command, targets=targets, args_json=json.dumps(args or {}), timeout=self.timeout or 0.0
        )
        deadline = (self.timeout if self.timeout is not None else UNKNOWN_SERVER_WAIT) + DEADLINE_MARGIN
        started = time.monotonic()
        try:
            reply = self._stub.Execute(request, timeout=deadline)
        except grpc.RpcError as err:
            raise self._failure(err, command, deadline) from None
        log.debug("%s %s at %s: answered in %.3fs", command, targets, self.target, time.monotonic() - started)
        return outcome_from_wire(reply, command).expecting(targets)

    def upload(self, path: Path, name: str, progress: Callable[[int], None] | None = None) -> Uploaded:
        """Stream a file to the server (header, then 1 MiB chunks), signed with the kit's key; progress(n) after
        each chunk is sent. The server and every site it is deployed to refuse it unless that signature holds."""
        from fedcommon.archive_signature import SignatureError, file_digest, sign_digest

        sha256, size = file_digest(path)
        try:
            signed = sign_digest(sha256, size, self.kit.key_pem, self.kit.cert_pem)
        except SignatureError as e:
            raise ConnectionFailed(f"cannot sign {name} with the admin kit {self.kit.folder}: {e}") from None

        def chunks() -> Iterator[admin_pb2.BlobChunk]:
            header = admin_pb2.BlobHeader(
                name=name,
                size=size,
                sha256=sha256,
                signature=signed.signature,
                signer_certificate=signed.signer_certificate,
            )
            yield admin_pb2.BlobChunk(header=header)
            with open(path, "rb") as f:
                while data := f.read(CHUNK_SIZE):
                    yield admin_pb2.BlobChunk(data=data)
                    if progress is not None:
                        progress(len(data))

        deadline = UPLOAD_BASE_DEADLINE + size / CHUNK_SIZE + (self.timeout or 0.0)
        try:
            reply = self._stub.Upload(chunks(), timeout=deadline)
        except grpc.RpcError as err:
            raise self._failure(err, f"upload of {name}", deadline) from None
        if reply.sha256 != sha256 or reply.size != size:
            raise RemoteError(
                f"upload of {name}: the server stored {reply.size} bytes with sha256 {reply.sha256[:12]}…, "
                f"sent {size} bytes with sha256 {sha256[:12]}…"
            )
        return Uploaded(reply.blob_id or sha256, size, sha256)

    def download(self, download_id: str, folder: Path) -> Path:
        """Fetch an archive the server prepared for this admin and extract it into `folder` (new or empty)."""
        import tempfile

        from fedcommon.safe_zip import UnsafeArchiveError, extract_zip_safely

        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise RemoteError(f"{folder} exists and is not an empty folder: nothing was downloaded")
        folder.parent.mkdir(parents=True, exist_ok=True)
        deadline = UPLOAD_BASE_DEADLINE + (self.timeout or 0.0)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder.parent) as tmp:
            archive = Path(tmp) / "download.zip"
            try:
                with open(archive, "wb") as f:
                    for chunk in self._stub.Download(admin_pb2.BlobRequest(blob_id=download_id), timeout=deadline):
                        if chunk.WhichOneof("part") == "data":
                            f.write(chunk.data)
            except grpc.RpcError as err:
                raise self._failure(err, "download", deadline) from None
            try:
                extract_zip_safely(archive, folder)
            except UnsafeArchiveError as e:
                raise RemoteError(f"the server's download is not a safe archive: {e}") from None
        return folder

    def _failure(self, err: grpc.RpcError, what: str, deadline: float) -> Exception:
        try:  # the kit's certificates were not checked up front: a broken kit is the likeliest cause
            load_kit(self.kit.folder)
        except KitError as exc:
            return ConnectionFailed(f"cannot use the admin kit: {exc}")
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        details = (err.details() if callable(getattr(err, "details", None)) else "") or code.name
        where = f"the server's admin port at {self.target}"
        if code is grpc.StatusCode.UNAVAILABLE:
            return ConnectionFailed(f"cannot connect to {where}: {_why_unavailable(details)}")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return ConnectionFailed(f"{where} refused admin {self.kit.name!r} ({self.kit.folder}): {details}")
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return ConnectionFailed(
                f"{self.target} does not serve the admin plane ({details}): is server.admin_port in "
                f"{self.kit.folder}/startup/fed.json the server's admin port?"
            )
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            if not self._connected():
                return ConnectionFailed(f"cannot connect to {where}: no TLS connection within {deadline:.0f}s")
            return CommandTimeout(f"{what}: no answer from {where} within {deadline:.0f}s")
        return RemoteError(f"{what} refused by the server at {self.target}: {details}")

    def _connected(self) -> bool:
        """Whether the channel has (or gets within a moment) a TLS connection; only asked after a failure."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=1.0)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()


def _why_unavailable(details: str) -> str:
    lowered = details.lower()
    if "connection refused" in lowered:
        return "connection refused (is fedserver running, and is server.admin_port in the kit its admin port?)"
    if "handshake" in lowered or "certificate" in lowered or "ssl" in lowered or "tls" in lowered:
        return (
            "the TLS handshake failed: the server and this kit are not from the same project CA, "
            f"or the server refused the kit's certificate ({details})"
        )
    return details


def _load_admin_kit(folder: Path) -> Kit:
    try:  # certificates are checked only if a call fails (_failure): a one-shot command starts ~90 ms sooner
        kit = load_kit(folder, check_certificates=False)
    except KitError as exc:
        raise ConnectionFailed(f"cannot use the admin kit: {exc}") from None
    if kit.role != "admin":
        raise ConnectionFailed(
            f"{kit.folder} is the kit of {kit.name!r} ({kit.role}), not an admin's: "
            "pass the admin's participant folder with --kit or FEDADMIN_KIT"
        )
    return kit

"""The admin-plane gRPC service on admin_port: operators' commands and uploads, admin certificates only."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from fedcommon.admin_defs import AdminIdentity
from fedcommon.admin_serde import outcome_to_wire
from fedcommon.wire import admin_pb2 as pb
from fedcommon.wire import admin_pb2_grpc as pb_grpc
from fedserver.admin_hub import AdminHub
from fedserver.authorization import Refused
from fedserver.blob_store import BlobError, BlobStore
from fedserver.downloads import DownloadError, Downloads
from fedserver.identity_gate import require_peer
from fedserver.stream_watch import stop_reason

log = logging.getLogger(__name__)


class AdminService(pb_grpc.AdminServiceServicer):
    """Serves operators; the caller's name, role and org come from its certificate (CN, OU, O) only."""

    def __init__(self, hub: AdminHub, blobs: BlobStore, downloads: Downloads | None = None):
        self._hub = hub
        self._blobs = blobs
        self._downloads = downloads

    @staticmethod
    def _caller(context: grpc.ServicerContext) -> AdminIdentity:
        peer = require_peer(context, "admin", "admin plane")
        return AdminIdentity(peer.name, peer.role, peer.org)

    def Execute(self, request: pb.CommandRequest, context: grpc.ServicerContext) -> pb.CommandReply:
        """Run one command on its targets; one reply per target."""
        caller = self._caller(context)
        outcome = self._hub.execute(
            caller, request.command, list(request.targets), request.args_json, request.timeout, context.is_active
        )
        return outcome_to_wire(outcome)

    def Upload(self, request_iterator: Iterator[pb.BlobChunk], context: grpc.ServicerContext) -> pb.UploadReply:
        """Store a BlobHeader and its data chunks, signed by the caller; the id is the content's sha256.

        An unsigned upload, or one whose signature or signer is not trusted, is refused and audited, and not kept.
        """
        caller = self._caller(context)
        try:
            self._hub.policy.precheck(caller, "upload")
        except Refused as e:
            self._hub.audit.record(caller, "upload", [], False, error=str(e))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        try:
            blob = self._blobs.receive(request_iterator, caller.name)
        except BlobError as e:
            self._hub.audit.record(caller, "upload", [], False, error=str(e))
            context.abort(e.status, str(e))
        except BaseException as e:
            # Cancelled by the console, stalled past its deadline, or refused at its end (revoked meanwhile).
            why = stop_reason(request_iterator) or (str(e) if not isinstance(e, grpc.RpcError) else "")
            self._hub.audit.record(
                caller, "upload", [], False, error=f"upload broke off: {why or 'the console cancelled it or went away'}"
            )
            raise
        self._hub.audit.record(caller, "upload", [], True, {"blob_id": blob.blob_id, "size": blob.size})
        return pb.UploadReply(blob_id=blob.blob_id, size=blob.size, sha256=blob.blob_id)

    def Download(self, request: pb.BlobRequest, context: grpc.ServicerContext) -> Iterator[pb.BlobChunk]:
        """Stream an archive a command prepared for this caller (job download); it is gone afterwards."""
        caller = self._caller(context)
        if self._downloads is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server prepares no downloads")
        try:
            chunks = self._downloads.fetch(caller, request.blob_id)
            first = next(chunks)
        except DownloadError as e:
            self._hub.audit.record(caller, "download", [], False, error=str(e))
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        self._hub.audit.record(caller, "download", [], True, {"name": first.header.name, "size": first.header.size})
        yield first
        yield from chunks

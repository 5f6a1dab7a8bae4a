"""The admin-plane gRPC service on admin_port: operators' commands and uploads, admin certificates only."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc

from fedcommon.kit import peer_admin_role, peer_name
from fedcommon.pki import ADMIN_ROLES
from fedcommon.wire import admin_pb2 as pb
from fedcommon.wire import admin_pb2_grpc as pb_grpc
from fedserver.admin_hub import AdminHub, CommandResult
from fedserver.blob_store import BlobError, BlobStore

log = logging.getLogger(__name__)


def command_reply(result: CommandResult) -> pb.CommandReply:
    """The wire CommandReply for a CommandResult."""
    return pb.CommandReply(
        command=result.command, ok=result.ok, error=result.error,
        replies=[
            pb.TargetReply(target=r.target, ok=r.ok, data_json=json.dumps(r.data) if r.ok else "", error=r.error)
            for r in result.replies
        ],
    )


class AdminService(pb_grpc.AdminServiceServicer):
    """Serves operators; the caller is the admin named in its certificate, its role in the certificate's OU."""

    def __init__(self, hub: AdminHub, blobs: BlobStore):
        self._hub = hub
        self._blobs = blobs

    @staticmethod
    def _admin(context: grpc.ServicerContext) -> tuple[str, str]:
        name = peer_name(context)
        role = peer_admin_role(context)
        if role is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{name!r} is not an admin certificate")
        if role not in ADMIN_ROLES:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{name!r} has admin role {role!r}, not one of {', '.join(ADMIN_ROLES)}")
        return name or "", role

    def Execute(self, request: pb.CommandRequest, context: grpc.ServicerContext) -> pb.CommandReply:
        """Run one command on its targets; one reply per target."""
        admin, role = self._admin(context)
        result = self._hub.execute(admin, role, request.command, list(request.targets), request.args_json,
                                   request.timeout)
        return command_reply(result)

    def Upload(self, request_iterator: Iterator[pb.BlobChunk], context: grpc.ServicerContext) -> pb.UploadReply:
        """Store a BlobHeader and its data chunks; the id is the content's sha256."""
        admin, _ = self._admin(context)
        try:
            blob = self._blobs.receive(request_iterator)
        except BlobError as e:
            self._hub.audit.record(admin, "upload", [], False, error=str(e))
            context.abort(e.status, str(e))
        self._hub.audit.record(admin, "upload", [], True, {"blob_id": blob.blob_id, "size": blob.size})
        return pb.UploadReply(blob_id=blob.blob_id, size=blob.size, sha256=blob.blob_id)

"""The agent-plane gRPC service on fl_port: a site's long-poll for requests, its replies, results and blobs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from fedcommon.admin_serde import message_from_wire, message_to_wire
from fedcommon.audit import RefusalLimiter
from fedcommon.commands import LONG_POLL_S, wait_seconds
from fedcommon.identity import PeerIdentity
from fedcommon.wire import admin_pb2 as pb
from fedcommon.wire import admin_pb2_grpc as pb_grpc
from fedcommon.wire import training_pb2 as tpb
from fedserver.blob_store import BlobError, BlobStore
from fedserver.identity_gate import require_peer
from fedserver.mailbox import SiteMailbox

log = logging.getLogger(__name__)

MAX_REPLIES_PER_CALL = 256  # a site has replies to at most the requests it was sent, a few at a time


def _suppressed(count: int) -> str:
    return f" ({count} more such lines left out)" if count else ""


class SiteAgentService(pb_grpc.SiteAgentServicer):
    """Serves site agents; the caller is the site named in its certificate."""

    def __init__(self, mailbox: SiteMailbox, blobs: BlobStore):
        self._mailbox = mailbox
        self._blobs = blobs
        self._log_limit = RefusalLimiter(burst=10, per_second=0.2)

    def _not_taken(self, site: str, reasons: list[str], dropped: int) -> None:
        """One log line for the replies of one call the server did not take, if the site's share allows it."""
        if not reasons and dropped <= 0:
            return
        logged, suppressed = self._log_limit.admit(site)
        if logged:
            extra = f"; {dropped} more past the {MAX_REPLIES_PER_CALL} one call may carry" if dropped > 0 else ""
            log.info(
                "%d replies from %s not taken (first: %s)%s%s",
                len(reasons),
                site,
                reasons[0] if reasons else "-",
                extra,
                _suppressed(suppressed),
            )

    @staticmethod
    def _peer(context: grpc.ServicerContext) -> PeerIdentity:
        return require_peer(context, "client", "agent plane")

    @classmethod
    def _site(cls, context: grpc.ServicerContext) -> str:
        return cls._peer(context).name

    def Retrieve(self, request: pb.RetrieveRequest, context: grpc.ServicerContext) -> pb.RetrieveReply:
        """Hold until requests for the calling site are queued or wait_seconds (at most 60) pass."""
        peer = self._peer(context)
        site = peer.name
        # Replies that came with this call rather than by SendReply: at most MAX_REPLIES_PER_CALL are looked at,
        # and what was not taken is one log line per call at most (rate-limited per site), so no site can flood
        # the server's log and rotate its history away.
        refused = [
            self._mailbox.post_reply(site, message_from_wire(wire)) for wire in request.replies[:MAX_REPLIES_PER_CALL]
        ]
        self._not_taken(site, [r for r in refused if r], len(request.replies) - MAX_REPLIES_PER_CALL)
        wait = wait_seconds(request.wait_seconds, LONG_POLL_S)
        context.add_callback(lambda: self._mailbox.wake(site))  # a site that hangs up frees its long-poll at once
        requests = self._mailbox.retrieve(site, wait, context.is_active, org=peer.org, serial=peer.serial)
        if requests:
            log.debug("%s retrieved %s", site, ", ".join(m.topic for m in requests))
        return pb.RetrieveReply(requests=[message_to_wire(m) for m in requests])

    def SendReply(self, request: pb.AdminMessage, context: grpc.ServicerContext) -> tpb.Ack:
        """Hand a site's reply to the command waiting for it."""
        site = self._site(context)
        refused = self._mailbox.post_reply(site, message_from_wire(request))
        if refused:
            self._not_taken(site, [refused], 0)
            return tpb.Ack(ok=False, message=refused)
        return tpb.Ack(ok=True)

    def SendResult(self, request: pb.AdminMessage, context: grpc.ServicerContext) -> tpb.Ack:
        """Keep a site's progress or training_ended report."""
        site = self._site(context)
        refused = self._mailbox.post_result(site, message_from_wire(request))
        if refused:
            logged, suppressed = self._log_limit.admit(site)
            if logged:
                log.warning("result from %s refused: %s%s", site, refused, _suppressed(suppressed))
            return tpb.Ack(ok=False, message=refused)
        return tpb.Ack(ok=True)

    def FetchBlob(self, request: pb.BlobRequest, context: grpc.ServicerContext) -> Iterator[pb.BlobChunk]:
        """Stream a blob deployed to the calling site: its header, then 1 MiB chunks."""
        site = self._site(context)
        try:
            self._blobs.check_fetch(site, request.blob_id)
        except BlobError as e:
            context.abort(e.status, str(e))
        log.info("%s fetches blob %s", site, request.blob_id)
        yield from self._blobs.iter_chunks(request.blob_id)
        self._blobs.taken(site, request.blob_id)

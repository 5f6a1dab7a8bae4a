"""One check in front of every RPC of a port: the caller's certificate is of the right kind and not revoked."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from fedcommon.identity import PeerIdentity, peer_identity
from fedcommon.revocation import RevocationList

log = logging.getLogger(__name__)

# A refused peer that keeps retrying is recorded once a minute, not once per attempt.
_REPEAT_S = 60.0

RefusalRecorder = Callable[[PeerIdentity | None, str, str], None]  # (peer, method, reason)
_CERTIFICATE = {"client": "a site", "admin": "an admin"}


def require_peer(context: grpc.ServicerContext, kind: str, plane: str) -> PeerIdentity:
    """The caller's identity if its certificate is of `kind` ("client" or "admin"); else the call is aborted.

    The port's identity gate refuses these first; this guards a servicer set up without it.
    """
    peer = peer_identity(context)
    if peer is None or peer.kind != kind or not peer.name or (kind == "admin" and peer.role is None):
        shown = peer.describe() if peer else "a caller without a certificate"
        what = _CERTIFICATE[kind]
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"{shown} is not {what} certificate; the {plane} takes {what.split()[-1]} certificates only")
    return peer


class IdentityGate(grpc.ServerInterceptor):
    """Refuses, before any servicer runs, callers whose certificate is revoked or of a kind this port does not serve."""

    def __init__(self, port_name: str, kinds: tuple[str, ...], revocations: RevocationList,
                 record: RefusalRecorder):
        self._port_name = port_name
        self._kinds = kinds
        self._revocations = revocations
        self._record = record
        self._recent: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def refusal(self, peer: PeerIdentity | None) -> tuple[grpc.StatusCode, str] | None:
        """Why `peer` may not use this port, or None."""
        if peer is None:
            return grpc.StatusCode.UNAUTHENTICATED, "no client certificate: connect with a startup kit"
        if self._revocations.is_revoked(peer.serial):
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"the certificate of {peer.name!r} (serial {peer.serial:x}) is revoked")
        if peer.kind not in self._kinds:
            wanted = " or ".join("site" if k == "client" else k for k in self._kinds)
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"{peer.describe()} may not use the {self._port_name}: it serves {wanted} certificates only")
        return None

    def _refuse(self, peer: PeerIdentity | None, method: str, code: grpc.StatusCode, reason: str,
                context: grpc.ServicerContext) -> None:
        key = (peer.fingerprint if peer else "-", reason)
        now = time.monotonic()
        with self._lock:
            fresh = now - self._recent.get(key, -_REPEAT_S) >= _REPEAT_S
            if fresh:
                self._recent[key] = now
                if len(self._recent) > 4096:
                    self._recent = {k: t for k, t in self._recent.items() if now - t < _REPEAT_S}
        if fresh:
            log.warning("%s: refused %s: %s", self._port_name, method, reason)
            self._record(peer, method, reason)
        context.abort(code, reason)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        gate = self

        def checked(behaviour):
            def run(request_or_iterator, context):
                peer = peer_identity(context)
                refused = gate.refusal(peer)
                if refused is not None:
                    gate._refuse(peer, method, *refused, context)
                return behaviour(request_or_iterator, context)
            return run

        if handler.unary_unary:
            factory, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        elif handler.unary_stream:
            factory, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        elif handler.stream_unary:
            factory, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        else:
            factory, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        return factory(checked(behaviour), request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

"""One check in front of every RPC of a port: the caller's certificate is of the right kind and not revoked, the
caller is within its share of the port's calls, and a stream it sends is watched (idle deadline, minimum rate,
revocation re-checked before its end is accepted)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedcommon.identity import PeerIdentity, peer_identity
from fedcommon.revocation import RevocationList
from fedserver.stream_watch import StreamWatchdog, WatchedStream

log = logging.getLogger(__name__)

# A refused peer that keeps retrying is recorded once a minute, not once per attempt.
_REPEAT_S = 60.0

RefusalRecorder = Callable[[PeerIdentity | None, str, str], None]  # (peer, method, reason)
_CERTIFICATE = {"client": "a site", "admin": "an admin"}
_CALLER = {"client": "site", "admin": "admin"}

# A site holds its agent's long-poll (the mailbox keeps at most two per site), its worker's GetModel long-poll,
# a heartbeat, an upload, replies and a blob fetch; several times that leaves room for a restarting agent.
CALLS_PER_SITE = 32
# A console makes one call at a time; `logs --follow` or `status --watch` in another terminal one more.
CALLS_PER_ADMIN = 6


class RepeatFilter:
    """Says whether a refusal is fresh: the first of its (caller, reason) in a minute is logged and audited."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: dict[tuple[str, str], float] = {}

    def fresh(self, caller: str, reason: str) -> bool:
        key, now = (caller, reason), time.monotonic()
        with self._lock:
            if now - self._recent.get(key, -_REPEAT_S) < _REPEAT_S:
                return False
            self._recent[key] = now
            if len(self._recent) > 4096:
                self._recent = {k: t for k, t in self._recent.items() if now - t < _REPEAT_S}
            return True


@dataclass(frozen=True)
class CallLimits:
    """How many calls one caller may have in flight on a port, and how many all callers but `privileged_role` may.

    `total` keeps the port's last threads for the privileged role, so no group of callers can lock it out.
    """

    per_caller: int
    total: int | None = None
    privileged_role: str | None = None


def require_peer(context: grpc.ServicerContext, kind: str, plane: str) -> PeerIdentity:
    """The caller's identity if its certificate is of `kind` ("client" or "admin"); else the call is aborted.

    The port's identity gate refuses these first; this guards a servicer set up without it.
    """
    peer = peer_identity(context)
    if peer is None or peer.kind != kind or not peer.name or (kind == "admin" and peer.role is None):
        shown = peer.describe() if peer else "a caller without a certificate"
        what = _CERTIFICATE[kind]
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{shown} is not {what} certificate; the {plane} takes {what.split()[-1]} certificates only",
        )
    return peer


class IdentityGate(grpc.ServerInterceptor):
    """Refuses, before any servicer runs, callers whose certificate is revoked or of a kind this port does not serve."""

    def __init__(
        self,
        port_name: str,
        kinds: tuple[str, ...],
        revocations: RevocationList,
        record: RefusalRecorder,
        limits: CallLimits | None = None,
        watchdog: StreamWatchdog | None = None,
    ):
        self._port_name = port_name
        self._kinds = kinds
        self._revocations = revocations
        self._record = record
        self._limits = limits
        self._watchdog = watchdog
        self._repeats = RepeatFilter()
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], int] = {}  # (kind, name) -> calls admitted and not yet ended
        self._unprivileged = 0  # calls in flight of callers outside the privileged role

    def in_flight(self, kind: str, name: str) -> int:
        """Calls of the caller `name` (certificate kind `kind`) in flight on this port."""
        with self._lock:
            return self._in_flight.get((kind, name), 0)

    def refusal(self, peer: PeerIdentity | None) -> tuple[grpc.StatusCode, str] | None:
        """Why `peer` may not use this port, or None."""
        if peer is None:
            return grpc.StatusCode.UNAUTHENTICATED, "no client certificate: connect with a startup kit"
        if self._revocations.is_revoked(peer.serial):
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of {peer.name!r} (serial {peer.serial:x}) is revoked",
            )
        if peer.kind not in self._kinds:
            wanted = " or ".join("site" if k == "client" else k for k in self._kinds)
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{peer.describe()} may not use the {self._port_name}: it serves {wanted} certificates only",
            )
        return None

    def _privileged(self, peer: PeerIdentity) -> bool:
        role = self._limits.privileged_role if self._limits is not None else None
        return role is not None and peer.role == role

    def _admit(self, peer: PeerIdentity) -> tuple[grpc.StatusCode, str] | None:
        """Count one more call of `peer` in flight, or say why it is over its share (nothing counted then)."""
        limits = self._limits
        if limits is None:
            return None
        key = (peer.kind, peer.name)
        privileged = self._privileged(peer)
        with self._lock:
            held = self._in_flight.get(key, 0)
            if held >= limits.per_caller:
                return (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{peer.name} already has {held} calls in flight on the {self._port_name}; the limit is "
                    f"{limits.per_caller} per {_CALLER.get(peer.kind, 'caller')}: retry once one has ended",
                )
            if not privileged and limits.total is not None and self._unprivileged >= limits.total:
                return (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the {self._port_name} is busy: {self._unprivileged} calls in flight, the limit is "
                    f"{limits.total} for callers other than {limits.privileged_role}; retry shortly",
                )
            self._in_flight[key] = held + 1
            if not privileged:
                self._unprivileged += 1
        return None

    def _release(self, peer: PeerIdentity) -> None:
        key = (peer.kind, peer.name)
        privileged = self._privileged(peer)
        with self._lock:
            left = self._in_flight.get(key, 0) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
            if not privileged:
                self._unprivileged -= 1

    @contextlib.contextmanager
    def _admitted(self, method: str, context: grpc.ServicerContext, request: Any, streamed: bool) -> Iterator[Any]:
        """The call's request (a stream under the watchdog) while the call counts as in flight; a refused call is
        aborted."""
        peer = peer_identity(context)
        refused = self.refusal(peer)
        if refused is not None:
            self._refuse(peer, method, *refused, context)
        assert peer is not None
        refused = self._admit(peer)
        if refused is not None:
            self._refuse(peer, method, *refused, context)
        watched = self._watched(request, peer, method, context) if streamed else None
        try:
            yield request if watched is None else watched
        finally:
            if watched is not None:
                self._watchdog.release(watched)
            if self._limits is not None:
                self._release(peer)

    def _watched(
        self, chunks: Iterator[Any], peer: PeerIdentity, method: str, context: grpc.ServicerContext
    ) -> WatchedStream:
        """The request stream under the watchdog; its end is accepted only while the caller is still allowed."""

        def at_end(stream: WatchedStream) -> None:
            refused = self.refusal(peer)
            if refused is not None:
                stream.stopped = refused[1]
                self._refuse(peer, method, *refused, context)

        def recheck() -> str | None:
            refused = self.refusal(peer)
            return refused[1] if refused is not None else None

        what = f"{peer.name}'s {method.rsplit('/', 1)[-1]} on the {self._port_name}"
        return self._watchdog.watch(chunks, context, what, at_end, recheck)

    def _refuse(
        self, peer: PeerIdentity | None, method: str, code: grpc.StatusCode, reason: str, context: grpc.ServicerContext
    ) -> None:
        if self._repeats.fresh(peer.fingerprint if peer else "-", reason):
            log.warning("%s: refused %s: %s", self._port_name, method, reason)
            self._record(peer, method, reason)
        context.abort(code, reason)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        gate = self
        streamed = handler.request_streaming and self._watchdog is not None

        def checked(behaviour):
            def run(request, context):
                with gate._admitted(method, context, request, streamed) as request:
                    return behaviour(request, context)

            return run

        def checked_stream(behaviour):
            # A response stream holds its thread until its generator ends: it counts as in flight until then.
            def run(request, context):
                with gate._admitted(method, context, request, streamed) as request:
                    yield from behaviour(request, context)

            return run

        if handler.unary_unary:
            factory, behaviour = grpc.unary_unary_rpc_method_handler, checked(handler.unary_unary)
        elif handler.unary_stream:
            factory, behaviour = grpc.unary_stream_rpc_method_handler, checked_stream(handler.unary_stream)
        elif handler.stream_unary:
            factory, behaviour = grpc.stream_unary_rpc_method_handler, checked(handler.stream_unary)
        else:
            factory, behaviour = grpc.stream_stream_rpc_method_handler, checked_stream(handler.stream_stream)
        return factory(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

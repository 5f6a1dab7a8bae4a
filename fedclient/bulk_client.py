"""The site's end of the bulk channel: redeem a ticket over mutual TLS, then take a model or send an update."""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator

from fedcommon import bulk_wire
from fedcommon.bulk_wire import BulkError, FrameReader, FrameWriter
from fedcommon.chunk_wire import DataChunk
from fedcommon.escape import for_log
from fedcommon.wire import training_pb2 as pb

log = logging.getLogger(__name__)

CONNECT_S = 5.0
HANDSHAKE_S = 10.0
# A read or write that makes no progress for this long ends the transfer. As long as a gRPC transfer may take: the
# server may hold an upload's bytes while another upload has its slot, and may close the round before it replies.
IDLE_S = 900.0
# After the channel could not be reached, transfers use gRPC for this long before the channel is tried again
# (a firewall that drops the port would otherwise cost a connect timeout per transfer).
RETRY_AFTER_S = 300.0


class BulkUnavailable(Exception):
    """The bulk connection could not be made or its ticket was refused: nothing was transferred; use gRPC."""


def split_target(target: str) -> str:
    """The host of a gRPC target "host:port" or "[v6]:port"."""
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class _Answered(Exception):
    """The server replied before the upload's end."""


class BulkConnection:
    """One redeemed ticket's connection; a context manager that closes it."""

    def __init__(self, conn: ssl.SSLSocket):
        self._conn = conn
        self._reader = FrameReader(conn)
        self._writer = FrameWriter(conn)

    def __enter__(self) -> BulkConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass

    def redeem(self, ticket: str, op: str) -> pb.Ack:
        """Send the ticket; the server's answer (ok, or why not)."""
        self._writer.message(bulk_wire.OPEN, pb.BulkOpen(ticket=ticket, op=op))
        return self._reader.message(bulk_wire.ACK)

    def chunks(self) -> Iterator[pb.ModelChunk | DataChunk]:
        """A download's tensor chunks, as GetModel's stream would carry them; BulkError when it breaks off."""
        return self._reader.chunks()

    def submit(self, header: pb.ModelHeader, chunks: Iterable[pb.ModelChunk | DataChunk]) -> pb.SubmitReply:
        """Send an update (its header, then its tensors) and return the server's reply, which may come before the
        last tensor when the server refuses the update early (a stale round, an unknown variable)."""
        self._writer.message(bulk_wire.MODEL_HEADER, header)
        try:
            self._writer.chunks(self._until_answered(chunks))
            self._writer.end()
        except _Answered:
            pass
        return self._reader.message(bulk_wire.REPLY)

    def _until_answered(self, chunks: Iterable[pb.ModelChunk | DataChunk]) -> Iterator[pb.ModelChunk | DataChunk]:
        for chunk in chunks:
            # After the ticket's Ack the server sends nothing but the reply: readable means answered.
            if self._conn.pending() or select.select([self._conn], [], [], 0)[0]:
                raise _Answered
            yield chunk


class BulkClient:
    """Opens bulk connections to a server with the site's TLS files; remembers servers whose channel failed."""

    def __init__(self, context: ssl.SSLContext, enabled: bool = True):
        """enabled: False keeps every transfer on the gRPC stream."""
        self._context = context
        self.enabled = enabled
        self._lock = threading.Lock()
        self._failed: dict[str, float] = {}  # gRPC target -> when its channel last could not be reached
        self._told: set[str] = set()

    def usable(self, target: str) -> bool:
        """Whether to ask `target` for the bulk channel now."""
        with self._lock:
            failed = self._failed.get(target)
            return self.enabled and (failed is None or time.monotonic() - failed > RETRY_AFTER_S)

    def open(self, target: str, port: int, ticket: str, op: str) -> BulkConnection:
        """Connect to the bulk channel of the server at gRPC `target` and redeem `ticket` for `op`.

        BulkUnavailable (logged once per server, the channel then left alone for a while) when that fails.
        """
        host = split_target(target)
        try:
            raw = socket.create_connection((host, port), timeout=CONNECT_S)
        except OSError as e:
            raise self._unavailable(target, f"cannot connect to {host}:{port}: {e}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
            raw.settimeout(HANDSHAKE_S)
            conn = self._context.wrap_socket(raw, server_hostname=host)
        except (OSError, ValueError) as e:
            raw.close()
            raise self._unavailable(target, f"TLS with {host}:{port} failed: {e}") from None
        connection = BulkConnection(conn)
        try:
            ack = connection.redeem(ticket, op)
        except BulkError as e:
            connection.close()
            raise self._unavailable(target, f"{host}:{port} did not answer the ticket: {e}") from None
        if not ack.ok:
            connection.close()
            raise self._unavailable(target, f"{host}:{port} refused the ticket: {ack.message}", fault=False)
        conn.settimeout(IDLE_S)
        return connection

    def _unavailable(self, target: str, why: str, fault: bool = True) -> BulkUnavailable:
        """The error for a connection that failed; a channel that cannot be reached is left alone for a while."""
        with self._lock:
            if fault:
                self._failed[target] = time.monotonic()
            first = target not in self._told
            self._told.add(target)
        (log.warning if first else log.debug)(
            "bulk channel of %s: %s; using the gRPC stream%s",
            target,
            for_log(why),
            f" for {RETRY_AFTER_S:.0f}s" if fault else " for this transfer",
        )
        return BulkUnavailable(why)

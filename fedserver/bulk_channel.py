"""The bulk channel: a mutual-TLS port of its own that moves a model's tensor bytes outside gRPC messages.

A site redeems a one-time ticket it got over its authenticated gRPC session (fedserver.bulk_tickets); the
connection's certificate must be the ticket's site's and its session still valid. Then a download's tensors go
out straight from the open model file, or an upload's come in through the same receive, check and commit code
as SubmitUpdate's. See docs/bulk-channel.md.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from fedcommon import bulk_wire
from fedcommon.bulk_wire import BulkError, FrameReader, FrameWriter
from fedcommon.cert_fields import CertificateFieldError
from fedcommon.chunk_wire import DataChunk
from fedcommon.escape import for_log
from fedcommon.identity import PeerIdentity, identity_of
from fedcommon.wire import training_pb2 as pb
from fedserver.bulk_tickets import Ticket, TicketBook, TicketError
from fedserver.identity_gate import RepeatFilter
from fedserver.registry import ClientRegistry, RegistryError, SiteSession
from fedserver.stream_watch import StreamDeadlines

log = logging.getLogger(__name__)

HANDSHAKE_S = 10.0
# A connection sends its ticket right after the handshake.
OPEN_S = 10.0
# A download's whole transfer; past it the connection is cut (the site's own transfer deadline is as long).
TRANSFER_S = 900.0
# A refused upload's remaining bytes are read and dropped for at most this long before the connection is closed.
DRAIN_S = 30.0
# An upload's data is read and staged in pieces of this, whatever the size of the site's frames: the uploads in
# their slots hold a few of them, not megabytes each.
READ_PIECE_BYTES = 256 << 10
CONNECTIONS_PER_SITE = 4
CONNECTIONS_TOTAL = 256

RefusalRecorder = Callable[[PeerIdentity | None, str, str], None]  # (peer, what, reason)


class BulkService(Protocol):
    """What the bulk channel needs of the training plane (TrainingService is one)."""

    @property
    def registry(self) -> ClientRegistry: ...

    def submit_bulk(
        self, ticket: Ticket, session: SiteSession, head: pb.ModelHeader, chunks: Iterator
    ) -> pb.SubmitReply: ...

    def bulk_done(self, op: str, nbytes: int) -> None: ...


@dataclass(frozen=True)
class BulkLimits:
    """Connections per site certificate and in all; the idle deadline and minimum rate of every read."""

    per_site: int = CONNECTIONS_PER_SITE
    total: int = CONNECTIONS_TOTAL
    deadlines: StreamDeadlines = StreamDeadlines()
    handshake_s: float = HANDSHAKE_S


class BulkChannel:
    """A listener thread and a thread per connection; `start()` binds, `stop()` closes every connection."""

    def __init__(
        self,
        bind_host: str,
        port: int,
        context: ssl.SSLContext,
        tickets: TicketBook,
        service: BulkService,
        refusal: Callable[[PeerIdentity], str | None],
        record: RefusalRecorder,
        limits: BulkLimits | None = None,
    ):
        """refusal: why a certificate may not use the channel (revoked, not a site's), or None; record: audits a
        refusal."""
        self._bind = (bind_host, port)
        self._context = context
        self.tickets = tickets
        self._service = service
        self._refusal = refusal
        self._record = record
        self._limits = limits or BulkLimits()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._per_site: dict[str, int] = {}
        self._repeats = RepeatFilter()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Listen; returns the bound port. OSError when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self._bind[0] else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self._bind)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="bulk-listener", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop listening and cut every connection (their transfers fail; the sites fall back or retry)."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def connections(self) -> int:
        with self._lock:
            return len(self._open)

    # ---- connections ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # out of descriptors, say: do not spin
                continue
            with self._lock:
                full = len(self._open) >= self._limits.total
                if not full:
                    self._open.add(sock)
            if full:
                sock.close()
                self._refuse(None, f"{addr[0]}", "connect", f"{self._limits.total} connections open, the limit")
                continue
            threading.Thread(target=self._serve, args=(sock, addr), name="bulk-conn", daemon=True).start()

    def _serve(self, sock: socket.socket, addr: tuple) -> None:
        site = None
        conn: ssl.SSLSocket | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
            sock.settimeout(self._limits.handshake_s)
            try:
                conn = self._context.wrap_socket(sock, server_side=True)
            except (OSError, ValueError) as e:
                self._refuse(None, addr[0], "handshake", f"TLS handshake failed: {e}")
                return
            with self._lock:
                self._open.discard(sock)
                self._open.add(conn)
            try:
                peer = identity_of(conn.getpeercert(binary_form=True) or b"")
            except CertificateFieldError as e:  # the handshake checked it against the CA; this is never expected
                self._refuse(None, addr[0], "handshake", f"the peer's certificate cannot be read: {e}")
                return
            writer = FrameWriter(conn)
            reason = self._refusal(peer)
            if reason is None:
                with self._lock:
                    held = self._per_site.get(peer.name, 0)
                    if held >= self._limits.per_site:
                        reason = (
                            f"{peer.name} already has {held} bulk connections; the limit is {self._limits.per_site}"
                        )
                    else:
                        site = peer.name
                        self._per_site[site] = held + 1
            if reason is not None:
                self._refuse(peer, peer.fingerprint, "connect", reason)
                _tell(writer, bulk_wire.ACK, pb.Ack(ok=False, message=reason))
                return
            self._transfer(conn, peer, writer)
        except BulkError as e:
            log.warning("bulk channel: connection from %s: %s", addr[0], for_log(str(e)))
        except Exception:
            log.exception("bulk channel: connection from %s failed", addr[0])
        finally:
            with self._lock:
                self._open.discard(sock)
                if conn is not None:
                    self._open.discard(conn)
                if site is not None:
                    left = self._per_site.get(site, 1) - 1
                    if left > 0:
                        self._per_site[site] = left
                    else:
                        self._per_site.pop(site, None)
            _close(conn if conn is not None else sock)

    def _transfer(self, conn: ssl.SSLSocket, peer: PeerIdentity, writer: FrameWriter) -> None:
        deadlines = self._limits.deadlines
        conn.settimeout(OPEN_S)
        reader = FrameReader(
            conn,
            min_bytes_per_s=deadlines.min_bytes_per_s,
            window_s=deadlines.window_s,
            piece_bytes=READ_PIECE_BYTES,
        )
        try:
            opening = reader.message(bulk_wire.OPEN)
        except BulkError as e:
            self._refuse(peer, peer.fingerprint, "open", str(e))
            _tell(writer, bulk_wire.ACK, pb.Ack(ok=False, message=str(e)))
            return
        op = opening.op if opening.op in ("download", "upload") else "unknown"
        try:
            ticket = self.tickets.redeem(opening.ticket, op, peer.name)
            try:
                session = self._service.registry.authenticate(ticket.token, peer.name, peer.fingerprint)
            except RegistryError as e:
                ticket.finish(f"the session is no longer valid: {e}")
                raise
        except (TicketError, RegistryError) as e:
            self._refuse(peer, peer.fingerprint, f"bulk {op}", str(e))
            _tell(writer, bulk_wire.ACK, pb.Ack(ok=False, message=f"bulk {op} refused: {e}"))
            return
        conn.settimeout(deadlines.idle_s)
        try:
            if op == "download":
                self._download(ticket, writer)
            else:
                self._upload(ticket, session, peer, reader, writer)
        finally:
            ticket.close()  # an upload's slot, if one was kept and the upload did not take it

    def _download(self, ticket: Ticket, writer: FrameWriter) -> None:
        assert ticket.serve is not None
        began = time.monotonic()
        try:
            writer.message(bulk_wire.ACK, pb.Ack(ok=True))
            sent = ticket.serve(_Deadline(writer, began + TRANSFER_S))
            writer.end()
        except BaseException as e:
            ticket.finish(str(e) or type(e).__name__)
            raise
        ticket.finish()
        self._service.bulk_done("download", sent)
        log.info(
            "%s: round %d's model sent over the bulk channel (%d bytes in %.2fs)",
            ticket.site,
            ticket.round,
            sent,
            time.monotonic() - began,
        )

    def _upload(
        self, ticket: Ticket, session: SiteSession, peer: PeerIdentity, reader: FrameReader, writer: FrameWriter
    ) -> None:
        began = time.monotonic()
        writer.message(bulk_wire.ACK, pb.Ack(ok=True))
        received, ended = 0, False

        def chunks() -> Iterator[pb.ModelChunk | DataChunk]:
            nonlocal received, ended
            for chunk in reader.chunks():
                if isinstance(chunk, DataChunk):
                    received += chunk.data.nbytes
                yield chunk
            ended = True
            # The commit may wait behind other sites' (a round's last one aggregates and saves): with a hundred
            # uploads ending at once, their frame buffers would otherwise be most of the server's memory.
            reader.release()
            # As on fl_port: the end of an upload is accepted only while the certificate is still good.
            reason = self._refusal(peer)
            if reason is not None:
                self._refuse(peer, peer.fingerprint, "bulk upload", reason)
                raise BulkError(reason)

        try:
            head = reader.message(bulk_wire.MODEL_HEADER)
            reply = self._service.submit_bulk(ticket, session, head, chunks())
        except BulkError as e:
            log.warning("%s: bulk upload for round %d broke off: %s", ticket.site, ticket.round, for_log(str(e)))
            _tell(writer, bulk_wire.REPLY, pb.SubmitReply(accepted=False, reason=str(e)))
            return
        if reply.accepted:  # committed, whether or not the reply reaches the site: counted before it goes out
            self._service.bulk_done("upload", received)
        writer.message(bulk_wire.REPLY, reply)
        if not ended:
            _drain(reader)
        if reply.accepted:
            log.info(
                "%s: round %d's update received over the bulk channel (%d bytes in %.2fs)",
                ticket.site,
                ticket.round,
                received,
                time.monotonic() - began,
            )

    def _refuse(self, peer: PeerIdentity | None, who: str, what: str, reason: str) -> None:
        """Audit and log a refusal, once a minute per caller and reason (audited first: whoever reads the log line
        finds the audit entry written)."""
        if self._repeats.fresh(who, reason):
            shown = peer.name if peer is not None else who
            self._record(peer, f"bulk {what}" if not what.startswith("bulk") else what, reason)
            log.warning("bulk channel: refused %s of %s: %s", what, for_log(shown), for_log(reason))


class _Deadline:
    """A FrameWriter whose transfer must end by `deadline` (monotonic): a reader too slow to finish is cut off."""

    def __init__(self, writer: FrameWriter, deadline: float):
        self._writer = writer
        self._deadline = deadline

    def chunks(self, chunks) -> int:
        def timed():
            for chunk in chunks:
                if time.monotonic() > self._deadline:
                    raise BulkError(f"the transfer took over {TRANSFER_S:.0f}s")
                yield chunk

        return self._writer.chunks(timed())


def _drain(reader: FrameReader) -> None:
    """Take what a refused upload still sends (up to its end, or DRAIN_S) so that the site reads the reply, which it
    looks for between its chunks, instead of a reset connection."""
    deadline = time.monotonic() + DRAIN_S
    try:
        while time.monotonic() < deadline and reader.frame()[0] != bulk_wire.END:
            pass
    except BulkError:
        pass


def _tell(writer: FrameWriter, kind: int, message: pb.Ack | pb.SubmitReply) -> None:
    """Tell the peer why, if it still listens."""
    try:
        writer.message(kind, message)
    except (BulkError, OSError):
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass

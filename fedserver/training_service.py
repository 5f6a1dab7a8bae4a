"""The training-plane gRPC service: register, heartbeat, model download, update upload, quit; each session's calls
go to the run it registered in, so that runs training at once never mix."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc

from fedcommon import bulk_wire
from fedcommon.commands import wait_seconds
from fedcommon.dtypes import DTypeError
from fedcommon.identity import PeerIdentity
from fedcommon.metrics import MetricsError
from fedcommon.model_file import iter_model_chunks, read_index
from fedcommon.tensor_codec import DEFAULT_CHUNK_BYTES, CodecError, encode_tensors
from fedcommon.wire import training_pb2 as pb
from fedcommon.wire import training_pb2_grpc as pb_grpc
from fedserver import bulk_channel
from fedserver.aggregator import ContributionError
from fedserver.bulk_tickets import Ticket, TicketBook
from fedserver.cross_site import CrossSiteError, CrossSiteValidation
from fedserver.errors import ServerError
from fedserver.identity_gate import require_peer
from fedserver.registry import UNBOUND, ClientRegistry, RegistryError, SiteSession
from fedserver.run import FederatedRun, Offer
from fedserver.staged_upload import StagedUpload, stage_tensors
from fedserver.stream_watch import StreamWatchdog
from fedserver.telemetry import Telemetry
from fedserver.transfer_slots import SlotTimeout, TransferSlots

log = logging.getLogger(__name__)

TOKEN_KEY = "fl-token"
# Smaller models stay on the gRPC stream: a bulk transfer pays a TCP connect and a TLS handshake (a few ms), which
# is about what gRPC takes to move a mebibyte.
BULK_MIN_BYTES = 1 << 20
MAX_LONG_POLL_S = 20.0
# Uploads stream into their own files (memory O(chunk)): several at once, one per site.
MAX_CONCURRENT_UPLOADS = 4
# How long OpenUpload waits for an upload slot to keep for its ticket (within the site's own deadline, 30 s).
OPEN_UPLOAD_WAIT_S = 20.0
# Model downloads sending bytes at once: each holds a read buffer and a message in flight (2 chunks).
DOWNLOAD_SLOTS = 8

_STATUS = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class TrainingHost(Protocol):
    """What the training plane needs of the server (FederationServer is one)."""

    registry: ClientRegistry
    telemetry: Telemetry
    runs: dict[int, FederatedRun]

    def heartbeat_interval(self, run_number: int = UNBOUND) -> float: ...
    def wait_for_run(self, timeout: float, run_number: int = UNBOUND) -> FederatedRun | None: ...
    def run_for_unnamed(self) -> FederatedRun | None: ...
    def run_for_register(self, run_number: int) -> tuple[int, FederatedRun | None]: ...
    def run_sites(self, run_number: int) -> set[str]: ...
    def notice_run_ends(self) -> None: ...
    def cross_site(self, run_number: int) -> CrossSiteValidation: ...


def send_chunk_bytes(model_bytes: int, most: int) -> int:
    """The pieces a download of a `model_bytes` model is sent in: a sixty-fourth of it, between 64 KiB and `most`.
    Eight downloads of a 10 MiB model at once then hold 160 KiB each; a model of 64 MiB and more goes in `most`."""
    return min(most, max(64 << 10, model_bytes // 64))


class TrainingService(pb_grpc.FederatedTrainingServicer):
    """Maps training-plane RPCs onto the server's registry and each session's run."""

    def __init__(
        self,
        server: TrainingHost,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        download_slots: TransferSlots | None = None,
        upload_slots: TransferSlots | None = None,
        watchdog: StreamWatchdog | None = None,
    ):
        """download_slots, upload_slots: the server's (shared with any other path that moves models); watchdog:
        times the downloads' sends (a stalled receiver loses its slot)."""
        self._server = server
        self._upload_slots = upload_slots or TransferSlots(MAX_CONCURRENT_UPLOADS, 1, "upload")
        self._download_slots = download_slots or TransferSlots(DOWNLOAD_SLOTS, 2, "download")
        self._watchdog = watchdog
        self._chunk_bytes = chunk_bytes
        self._bulk: tuple[int, TicketBook] | None = None  # (port, tickets) while the bulk channel serves
        self._bulk_min_bytes = BULK_MIN_BYTES

    def offer_bulk(self, port: int, tickets: TicketBook, min_bytes: int = BULK_MIN_BYTES) -> None:
        """Offer sites the bulk channel on `port`: GetModel with bulk (for a model of `min_bytes` or more) and
        OpenUpload hand out `tickets`."""
        self._bulk, self._bulk_min_bytes = (port, tickets), min_bytes

    @property
    def registry(self) -> ClientRegistry:
        return self._server.registry

    @staticmethod
    def _peer(context: grpc.ServicerContext) -> PeerIdentity:
        return require_peer(context, "client", "training plane")

    def _authenticate(self, context: grpc.ServicerContext) -> SiteSession:
        token = dict(context.invocation_metadata()).get(TOKEN_KEY)
        peer = self._peer(context)
        return self._server.registry.authenticate(token, peer.name, peer.fingerprint)

    def _session(self, context: grpc.ServicerContext) -> SiteSession:
        try:
            return self._authenticate(context)
        except RegistryError as e:
            context.abort(_STATUS[e.code], str(e))
            raise  # unreachable: abort raises

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        peer = self._peer(context)
        try:
            number, run = self._server.run_for_register(request.run_number)
        except ServerError as e:
            log.warning("registration of %s refused: %s", peer.name, e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"registration refused: {e}")
        try:
            session = self._server.registry.register(
                request.client_name,
                peer.name,
                run.config.max_num_clients if run else None,
                peer.fingerprint,
                number,
            )
        except RegistryError as e:
            log.warning("registration refused: %s", e)
            context.abort(_STATUS[e.code], str(e))
        return pb.RegisterReply(
            token=session.token,
            run_number=number,
            heartbeat_interval=self._server.heartbeat_interval(number),
            task_name=run.config.task_name if run else "",
        )

    def _bind(self, session: SiteSession, run: FederatedRun | None) -> None:
        """A session opened while no run was live joins `run`, the run it was then given."""
        if session.run_number == UNBOUND and run is not None:
            self._server.registry.bind(session, run.run_number)

    def _run_of(self, session: SiteSession) -> FederatedRun | None:
        """The live run of the session (one opened while no run was live joins the run it would be given now)."""
        if session.run_number == UNBOUND:
            try:
                self._bind(session, self._server.run_for_unnamed())
            except ServerError:
                return None
        return self._server.runs.get(session.run_number)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        try:
            session = self._authenticate(context)
        except RegistryError as e:
            if e.code == "unauthenticated":
                return pb.HeartbeatReply(known=False)
            context.abort(_STATUS[e.code], str(e))
        run = self._run_of(session)  # no run when several train: GetModel tells the worker why
        return pb.HeartbeatReply(
            known=True, run_number=session.run_number, current_round=run.current_round if run else 0
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        session = self._session(context)
        wait = wait_seconds(request.wait_seconds, MAX_LONG_POLL_S)
        try:
            run = self._server.wait_for_run(wait, session.run_number)
        except ServerError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if run is None:
            number = session.run_number
            message = f"run {number} has not started yet" if number else "no run is deployed yet"
            yield pb.ModelChunk(header=pb.ModelHeader(status=pb.WAIT, message=message))
            return
        self._bind(session, run)
        offer = run.offer(session.name, wait)
        header = pb.ModelHeader(
            run_number=run.run_number,
            round=offer.round,
            start_round=run.config.start_round,
            num_rounds=run.config.num_rounds,
            kind="model",
        )
        if offer.phase == "wait":
            header.status = pb.WAIT
            header.message = f"round {offer.round} already has this site's contribution"
            yield pb.ModelChunk(header=header)
            return
        assert offer.model is not None and offer.index is not None
        with offer.model:
            header.status = pb.TRAIN if offer.phase == "train" else pb.END
            header.num_tensors = len(offer.index.entries) + len(offer.control)
            nbytes = sum(e.nbytes for e in offer.index.entries)
            if request.bulk and self._bulk is not None and nbytes >= self._bulk_min_bytes:
                port, tickets = self._bulk
                # The slot is taken before the ticket is issued and held until its transfer ends: a site connects to
                # the bulk channel only when its bytes can move, so a hundred sites waiting for the model hold no
                # connection, thread or TLS state there meanwhile.
                with self._download_slot(session.name, context):
                    secret, ticket = tickets.issue(
                        "download",
                        session.name,
                        session.token,
                        run.run_number,
                        offer.round,
                        self._model_sender(offer, send_chunk_bytes(nbytes, bulk_wire.CHUNK_BYTES)),
                    )
                    header.bulk_port, header.bulk_ticket = port, secret
                    yield pb.ModelChunk(header=header)
                    self._await_bulk(ticket, tickets, context)
                return
            yield pb.ModelChunk(header=header)
            chunk = send_chunk_bytes(nbytes, self._chunk_bytes)
            with self._download_slot(session.name, context):
                yield from self._sends(
                    context,
                    f"{session.name}'s model download",
                    iter_model_chunks(offer.model, offer.index, chunk),
                    encode_tensors(offer.control, chunk),  # SCAFFOLD's c, when the run uses it
                )
            self._server.telemetry.sent(nbytes)

    @staticmethod
    def _model_sender(offer: Offer, chunk: int):
        """What a download ticket's connection runs: the offer's tensors, from its open file, as bulk frames of
        `chunk` bytes (the GetModel call that issued the ticket holds a download slot for it)."""

        def send(writer) -> int:
            assert offer.model is not None and offer.index is not None
            sent = writer.chunks(iter_model_chunks(offer.model, offer.index, chunk))
            return sent + writer.chunks(encode_tensors(offer.control, chunk))

        return send

    def _await_bulk(self, ticket: Ticket, tickets: TicketBook, context: grpc.ServicerContext) -> None:
        """Hold the call (and the model file open) until the ticket's transfer has ended; a ticket not redeemed in
        time, or whose site has gone, is withdrawn."""
        # The bulk channel ends a redeemed ticket's transfer within its own deadlines; this bound is a backstop.
        latest = ticket.expires + bulk_channel.TRANSFER_S + bulk_channel.HANDSHAKE_S + bulk_channel.OPEN_S
        while not ticket.done.wait(0.25):
            if ticket.redeemed:
                if time.monotonic() > latest:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the bulk download did not end in time")
                continue
            if not context.is_active():
                tickets.withdraw(ticket, "withdrawn: the site ended its GetModel call")
            elif time.monotonic() > ticket.expires:
                tickets.withdraw(ticket, f"expired: not redeemed within {tickets.ttl_s:.0f}s")
        if ticket.error is not None:
            context.abort(grpc.StatusCode.ABORTED, f"bulk download of round {ticket.round}: {ticket.error}")

    @contextlib.contextmanager
    def _download_slot(self, site: str, context: grpc.ServicerContext) -> Iterator[None]:
        """One of the download slots while a model's bytes are sent; waits within the call's deadline."""
        left = context.time_remaining()
        try:
            with self._download_slots.hold(site, None if left is None else max(0.0, left - 1.0), context.is_active):
                yield
        except SlotTimeout as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    def _sends(self, context: grpc.ServicerContext, what: str, *parts: Iterator) -> Iterator:
        chunks = itertools.chain(*parts)
        return chunks if self._watchdog is None else self._watchdog.watch_sends(chunks, context, what)

    def SubmitUpdate(self, request_iterator: Iterator[pb.ModelChunk], context: grpc.ServicerContext) -> pb.SubmitReply:
        session = self._session(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            return self._refuse(session, 0, "a contribution must start with its header")
        return self.submit(session, first.header, request_iterator, context.is_active)

    def OpenUpload(self, request: pb.OpenUploadRequest, context: grpc.ServicerContext) -> pb.OpenUploadReply:
        session = self._session(context)
        if self._bulk is None:
            return pb.OpenUploadReply(message="this server has no bulk channel: use SubmitUpdate")
        port, tickets = self._bulk
        # An upload slot is kept for the ticket before it is issued, so the site connects when its bytes can move: a
        # hundred sites that finish at once then wait here, in calls the server serves anyway, instead of each
        # holding a bulk connection, its thread and its TLS state. Past the wait, the ticket comes without a slot
        # and its connection waits for one, as a gRPC upload does.
        left = context.time_remaining()
        wait = OPEN_UPLOAD_WAIT_S if left is None else max(0.0, min(OPEN_UPLOAD_WAIT_S, left - 1.0))
        try:
            lease = self._upload_slots.lease(session.name, tickets.ttl_s, wait, context.is_active)
        except SlotTimeout:
            lease = None
        secret, _ = tickets.issue(
            "upload",
            session.name,
            session.token,
            request.run_number,
            request.round,
            release=None if lease is None else functools.partial(self._upload_slots.release, lease),
        )
        return pb.OpenUploadReply(bulk_port=port, ticket=secret)

    def submit_bulk(
        self, ticket: Ticket, session: SiteSession, head: pb.ModelHeader, chunks: Iterator
    ) -> pb.SubmitReply:
        """A contribution that came over the bulk channel with `ticket`: it must be for the ticket's run and round."""
        if (head.run_number, head.round) != (ticket.run_number, ticket.round):
            return self._refuse(
                session,
                head.round,
                f"the upload ticket is for run {ticket.run_number} round {ticket.round}, the contribution for "
                f"run {head.run_number} round {head.round}",
            )
        return self.submit(session, head, chunks)

    def bulk_done(self, op: str, nbytes: int) -> None:
        """Count a transfer the bulk channel completed (an upload's bytes were counted as they came)."""
        if op == "download":
            self._server.telemetry.sent(nbytes)
        self._server.telemetry.bulk_transfer(op)

    def submit(
        self, session: SiteSession, head: pb.ModelHeader, chunks: Iterator, alive: Callable[[], bool] | None = None
    ) -> pb.SubmitReply:
        """Receive, check and commit `session`'s contribution (`head`, then its tensor chunks): SubmitUpdate's body,
        which the bulk channel's uploads run too. alive: False once the caller has gone (stops waiting for a slot)."""
        run = self._run_of(session)
        if run is None:
            return self._refuse(session, head.round, "no run is active")
        if head.run_number != run.run_number:
            return self._refuse(
                session,
                head.round,
                f"contribution is for run {head.run_number}, the active run is {run.run_number}",
            )
        if head.kind != "delta_w":
            return self._refuse(session, head.round, f"contribution kind must be 'delta_w', got {head.kind!r}")
        try:
            run.begin_contribution(session.name, head.round)
        except ContributionError as e:
            return self._refuse(session, head.round, str(e))
        try:
            with self._upload_slots.hold(session.name, alive=alive):
                update = self._receive(chunks, run, head.num_tensors, session.name, head.weight)
            run.commit_contribution(
                session.name,
                head.round,
                update,
                head.weight,
                dict(head.metrics),
                lambda: self._server.run_sites(run.run_number),
                head.privacy_protocol,
                head.privacy_epsilon,
                on_accepted=lambda: self._server.telemetry.contribution(accepted=True),
            )
        except (ContributionError, CodecError, DTypeError) as e:
            run.abandon_contribution(session.name, head.round, str(e))
            return self._refuse(session, head.round, str(e), noted=True)
        except BaseException:
            run.abandon_contribution(session.name, head.round, "upload broke off")
            raise
        self._server.notice_run_ends()  # this contribution may have closed the run's last round
        return pb.SubmitReply(accepted=True, round=head.round)

    def _receive(
        self, chunks: Iterator[pb.ModelChunk], run, num_tensors: int, site: str, weight: float
    ) -> StagedUpload:
        """The upload, staged in its own file as it arrives (deleted again when it breaks or is refused); what
        `site` claims as its `weight` scales it in the round's sum in memory, where the run keeps one."""
        staged = run.stage_upload(site, weight)
        size = 0
        try:
            received, size = stage_tensors(chunks, run.route_tensor, staged, "a contribution")
            if received != num_tensors:
                raise ContributionError(f"contribution announced {num_tensors} variables but carried {received}")
            # Written out now, inside the upload's slot: a hundred uploads may wait for their commit at once, and
            # none may hold its write buffers (megabytes each) meanwhile.
            staged.close()
        except OSError as e:  # the server's disk, not the site's upload: said without the server's paths
            staged.discard()
            raise ContributionError(f"the server could not stage the upload: {e.strerror or e}") from None
        except BaseException:
            staged.discard()
            raise
        finally:
            self._server.telemetry.received(size)
        return staged

    def _refuse(self, session: SiteSession, round_number: int, reason: str, noted: bool = False) -> pb.SubmitReply:
        log.warning("refused contribution from %s for round %d: %s", session.name, round_number, reason)
        self._server.telemetry.contribution(accepted=False)
        run = self._server.runs.get(session.run_number)
        if run is not None and not noted:
            run.note_refusal(session.name, reason)
        return pb.SubmitReply(accepted=False, reason=reason, round=round_number)

    def ReportMetrics(self, request: pb.MetricsReport, context: grpc.ServicerContext) -> pb.Ack:
        session = self._session(context)
        run = self._run_of(session)
        if run is None:
            return pb.Ack(ok=False, message="no run is active")
        try:
            run.report_final_metrics(session.name, dict(request.metrics))
        except MetricsError as e:
            return pb.Ack(ok=False, message=str(e))
        self._server.site_finished()
        return pb.Ack(ok=True)

    # ---- cross-site validation (DESIGN §9) -----------------------------------------------------------

    def _cross_site(self, run_number: int, context: grpc.ServicerContext) -> CrossSiteValidation:
        try:
            return self._server.cross_site(run_number)
        except CrossSiteError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            raise  # unreachable: abort raises

    def SubmitBestModel(
        self, request_iterator: Iterator[pb.ModelChunk], context: grpc.ServicerContext
    ) -> pb.SubmitReply:
        session = self._session(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            return pb.SubmitReply(accepted=False, reason="a best model must start with its header")
        head = first.header
        number = head.run_number or session.run_number
        store = self._cross_site(number, context)
        try:
            if head.kind == "not_participating":
                message = store.decline(session.name)
            elif head.kind == "best_model":
                # Streamed to disk a tensor at a time: no model-sized buffer, so no upload slot is taken.
                message = store.submit_best_model(session.name, dict(head.metrics), request_iterator, head.num_tensors)
            else:
                raise CrossSiteError(f"kind must be 'best_model' or 'not_participating', got {head.kind!r}")
        except (CrossSiteError, OSError) as e:
            log.warning("refused the best model of %s for run %d: %s", session.name, number, e)
            return pb.SubmitReply(accepted=False, reason=str(e))
        return pb.SubmitReply(accepted=True, reason=message)

    def GetValidationModels(
        self, request: pb.ValidationModelsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        session = self._session(context)
        number = request.run_number or session.run_number
        store = self._cross_site(number, context)
        wait = wait_seconds(request.wait_seconds, MAX_LONG_POLL_S)
        try:
            offer = store.next_model(session.name, set(request.validated), wait)
        except CrossSiteError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        header = pb.ModelHeader(run_number=number, more_models=offer.more, message=offer.message)
        if offer.status != "model":
            header.status = pb.WAIT if offer.status == "wait" else pb.END
            yield pb.ModelChunk(header=header)
            return
        with open(offer.path or "", "rb") as f:
            index = read_index(f, offer.path)
            header.status, header.kind, header.owner = pb.VALIDATE, "best_model", offer.owner
            header.num_tensors = len(index.entries)
            header.metrics.update(
                {k: v for k, v in index.meta.get("metrics", {}).items() if isinstance(v, (int, float))}
            )
            yield pb.ModelChunk(header=header)
            yield from iter_model_chunks(f, index, self._chunk_bytes)
            self._server.telemetry.sent(sum(e.nbytes for e in index.entries))

    def SubmitValidationResults(self, request: pb.ValidationResults, context: grpc.ServicerContext) -> pb.Ack:
        session = self._session(context)
        number = request.run_number or session.run_number
        store = self._cross_site(number, context)
        results: dict[str, dict[str, float]] = {}
        for result in request.results:
            if result.model_owner in results:
                return pb.Ack(ok=False, message=f"two results for {result.model_owner!r}'s model")
            results[result.model_owner] = dict(result.metrics)
        try:
            n = store.record_results(session.name, results)
        except CrossSiteError as e:
            log.warning("refused validation results of %s for run %d: %s", session.name, number, e)
            return pb.Ack(ok=False, message=str(e))
        return pb.Ack(ok=True, message=f"{n} result(s) recorded")

    def Quit(self, request: pb.QuitRequest, context: grpc.ServicerContext) -> pb.Ack:
        session = self._session(context)
        self._server.registry.remove(session.name, session.run_number)
        return pb.Ack(ok=True, message=f"{session.name} removed")

"""Communicator: the site's gRPC calls to the server's training plane, with retries and clear errors."""

from __future__ import annotations

import collections
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from fedclient.bulk_client import BulkClient, BulkUnavailable
from fedclient.data_assembler import DataAssembler
from fedcommon.bulk_wire import BulkError
from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import client_ssl_context, tls_channel_credentials
from fedcommon.model_meta import FLContext, FLContextKey
from fedcommon.tensor_codec import (
    DEFAULT_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    decode_tensors,
    encode_tensors,
)
from fedcommon.wire import training_pb2 as pb

if TYPE_CHECKING:
    from fedclient.model_manager import GlobalModelDownload

log = logging.getLogger(__name__)

TOKEN_KEY = "fl-token"
LONG_POLL_S = 20.0
# Deadline for moving one model either way; large models on slow links need minutes.
TRANSFER_DEADLINE_S = 900.0
SHORT_DEADLINE_S = 30.0
# After a bulk upload broke off: a moment for the server to see it and release the site's claim on the round.
BULK_RETRY_PAUSE_S = 0.5
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

T = TypeVar("T")


class CommunicationError(Exception):
    """A call to the server failed in a way retrying will not fix; the message names the call and cause."""


class RegistrationRequired(CommunicationError):
    """The server no longer knows this site's token: register again."""


def mutual_tls_required(who: str, flag: str, files: str) -> str:
    """Why `flag`=False (the seed's default) is refused, and what to pass instead."""
    return (
        f"{who}: {flag}=False (plaintext) is not supported: the server accepts only mutual TLS, because the "
        f"site's certificate is its identity and its session token and model updates must not travel in the "
        f"clear. Pass {flag}=True and {files}, the files of the site's startup kit "
        f"(<workspace>/startup/rootCA.pem, cert.pem and key.pem)"
    )


@dataclass
class ClientState:
    """The site's meta data for calls to a task's server (seed: the ClientState message): who, where, which session.

    `meta` is free for client_state_processors to add to; the token authenticates the calls made with this state.
    """

    task_name: str
    token: str | None
    client_name: str = ""
    run_number: int = 0
    round: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RemoteModel:
    """What GetModel returned: a round to train, the end of the run (both with the model), or wait."""

    status: str  # "train", "wait" or "end"
    run_number: int
    round: int
    start_round: int
    num_rounds: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    message: str = ""


@dataclass
class ValidationModel:
    """What GetValidationModels returned: a model to validate ("validate"), nothing yet ("wait") or "end"."""

    status: str
    owner: str = ""
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the owner's own scores of its model
    more: bool = False
    message: str = ""


_STATUS_NAMES = {pb.TRAIN: "train", pb.WAIT: "wait", pb.END: "end"}


def server_target(server: dict[str, Any]) -> str:
    """The host:port of a server entry ({"target": ...} or Clara's {"service": {"target": ...}})."""
    target = server.get("target") or server.get("service", {}).get("target")
    if not target:
        raise ValueError(f"server entry {server!r} has no target (host:port)")
    return target


class Communicator:
    """Makes the training-plane calls; retries transient failures for up to retry_timeout seconds."""

    def __init__(
        self,
        model_manager,
        ssl_args: dict[str, str] | None = None,
        secure_train: bool = False,
        retry_timeout: float = 30,
        pre_processors: list | None = None,
        post_processors: list | None = None,
        client_state_processors: list | None = None,
        compression: grpc.Compression | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        if not secure_train:
            raise ValueError(
                mutual_tls_required(
                    "Communicator",
                    "secure_train",
                    "ssl_args={'ssl_root_cert': ..., 'ssl_cert': ..., 'ssl_private_key': ...}",
                )
            )
        if not ssl_args:
            raise ValueError(
                "Communicator: the server accepts only mutual TLS: ssl_args must name ssl_root_cert, "
                "ssl_cert and ssl_private_key (fedclient.worker.kit_ssl_args(kit) names the kit's)"
            )
        self.model_manager = model_manager
        self.ssl_args = ssl_args
        self.secure_train = secure_train
        self.retry_timeout = retry_timeout
        self.pre_processors = list(pre_processors or [])
        self.post_processors = list(post_processors or [])
        self.client_state_processors = list(client_state_processors or [])
        self.compression = compression
        self.chunk_bytes = chunk_bytes
        files = {key: ssl_args.get(key) for key in ("ssl_root_cert", "ssl_cert", "ssl_private_key")}
        self._credentials = tls_channel_credentials(files, "ssl_args")
        # Tensor bytes go over the server's bulk channel when it offers one (docs/bulk-channel.md).
        self.bulk = BulkClient(client_ssl_context(files, "ssl_args"))
        # Targets whose last model came over the bulk channel: their server finds the model large enough for it,
        # so the update goes there too.
        self._bulk_sized: set[str] = set()
        self._channels: dict[str, grpc.Channel] = {}
        self._session_runs: dict[str, int] = {}  # token -> the run its server last named

    # ---- channels -------------------------------------------------------------------------------

    def set_up_channel(self, channel_dict: dict[str, Any], token: str | None = None) -> grpc.Channel:
        """A mutual-TLS channel to the server entry `channel_dict` (one per target, reused).

        With `token`, every call on the returned channel carries it (unless the call names a token itself);
        close the channel with close().
        """
        target = server_target(channel_dict)
        channel = self._channels.get(target)
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
            channel = grpc.secure_channel(target, self._credentials, options=options, compression=self.compression)
            self._channels[target] = channel
        return channel if token is None else grpc.intercept_channel(channel, _TokenInterceptor(token))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def _stub(self, servers: dict, task_name: str) -> TrainingStub:
        if task_name not in servers:
            raise CommunicationError(f"no server configured for task {task_name!r}")
        return TrainingStub(self.set_up_channel(servers[task_name]))

    # ---- error handling -------------------------------------------------------------------------

    def grpc_error_handler(
        self,
        service: str,
        grpc_error: grpc.RpcError,
        action: str,
        start_time: float,
        retry: bool,
        verbose: bool = False,
    ) -> None:
        """Return when the call should be retried; raise a CommunicationError otherwise."""
        code = grpc_error.code() if hasattr(grpc_error, "code") else grpc.StatusCode.UNKNOWN
        details = grpc_error.details() if hasattr(grpc_error, "details") else str(grpc_error)
        elapsed = time.monotonic() - start_time
        if code in _RETRYABLE and retry and elapsed < self.retry_timeout:
            (log.info if verbose else log.debug)("%s to %s: %s (%s); retrying", action, service, code.name, details)
            return
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise RegistrationRequired(f"{action} refused by {service}: {details}")
        if code in _RETRYABLE:
            raise CommunicationError(
                f"{action}: server {service} not reachable for {elapsed:.0f}s ({code.name}: {details})"
            )
        raise CommunicationError(f"{action} refused by {service}: {code.name}: {details}")

    def _call(self, servers: dict, task_name: str, action: str, fn: Callable[[], T], retry: bool = True) -> T:
        service = server_target(servers[task_name]) if task_name in servers else task_name
        start, pause = time.monotonic(), 0.2
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                self.grpc_error_handler(service, e, action, start, retry)
                # Capped exponential backoff with jitter: sites that lost the server together do not all
                # come back in the same instant when it returns.
                time.sleep(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, 5.0)

    @staticmethod
    def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_KEY, token),) if token else ()

    def _note_run(self, token: str | None, run_number: int) -> None:
        if token and run_number:
            self._session_runs[token] = run_number

    def _run_number(self, run_number: int | None, state: ClientState, action: str) -> int:
        if run_number is not None:
            return run_number
        if not state.run_number:
            raise ValueError(
                f"{action}: no run_number given and the session names no run: register first "
                f"(the server names its run) or pass run_number=N"
            )
        return state.run_number

    # ---- calls ----------------------------------------------------------------------------------

    def get_client_state(
        self, task_name: str, token: str | None, app_ctx=None, *, client_name: str | None = None
    ) -> ClientState:
        """The site's meta data for calls to the task's server, passed through each client_state_processor.

        A processor is called as processor(state, app_ctx) and returns the state to use. The run number and
        round come from app_ctx (a Mapping or an object with those attributes), else from the session.
        """
        run = _context_value(app_ctx, "run_number")
        state = ClientState(
            task_name,
            token,
            client_name=client_name or str(_context_value(app_ctx, "client_name") or ""),
            run_number=int(run) if run else self._session_runs.get(token or "", 0),
            round=_context_value(app_ctx, "round"),
        )
        for processor in self.client_state_processors:
            state = processor(state, app_ctx)
            if not isinstance(state, ClientState):
                raise TypeError(
                    f"client_state_processor {getattr(processor, '__name__', processor)!r} returned "
                    f"{type(state).__name__}; it must return the ClientState it was given (or a new one)"
                )
        return state

    def client_registration(self, uid: str, servers: dict, task_name: str, run_number: int = 0) -> pb.RegisterReply:
        """Register site `uid` for run `run_number` (0: the server's current run) with the task's server; the reply
        carries the session token and the run."""
        stub = self._stub(servers, task_name)
        request = pb.RegisterRequest(client_name=uid, run_number=run_number)
        reply = self._call(servers, task_name, "register", lambda: stub.Register(request, timeout=SHORT_DEADLINE_S))
        self._note_run(reply.token, reply.run_number)
        return reply

    def getModel(
        self, servers: dict, task_name: str, token: str, app_ctx=None, wait_seconds: float = LONG_POLL_S
    ) -> RemoteModel:
        """Fetch the global model for the next round (long-poll: returns status "wait" when there is none)."""
        state = self.get_client_state(task_name, token, app_ctx)
        stub = self._stub(servers, task_name)
        target = server_target(servers[task_name])

        def fetch(bulk: bool) -> RemoteModel:
            stream = stub.GetModel(
                pb.GetModelRequest(wait_seconds=wait_seconds, bulk=bulk),
                metadata=self._metadata(state.token),
                timeout=wait_seconds + TRANSFER_DEADLINE_S,
            )
            first = next(stream, None)
            head = first.header if first is not None and first.WhichOneof("part") == "header" else None
            if head is None or not head.bulk_ticket:
                if head is not None and head.status != pb.WAIT:
                    self._bulk_sized.discard(target)
                return self._read_model_stream(
                    itertools.chain([first] if first is not None else [], stream), self._global_download(task_name)
                )
            self._bulk_sized.add(target)
            download = self._global_download(task_name)
            try:
                with self.bulk.open(target, head.bulk_port, head.bulk_ticket, "download") as connection:
                    remote = self._read_model_stream(itertools.chain([first], connection.chunks()), download)
                if next(stream, None) is not None:  # the call ends once the server has sent the tensors
                    raise CommunicationError("get model: the server sent chunks besides the bulk download")
            except (BulkUnavailable, BulkError) as e:
                stream.cancel()
                _abort(download)
                if isinstance(e, BulkError):
                    log.warning("get model: the bulk download broke off (%s); fetching over gRPC", e)
                return fetch(False)
            except BaseException:
                stream.cancel()
                _abort(download)
                raise
            return remote

        remote = self._call(servers, task_name, "get model", lambda: fetch(self.bulk.usable(target)))
        self._note_run(state.token, remote.run_number)
        for processor in self.post_processors:
            remote.tensors = processor(remote.tensors, app_ctx)
        return remote

    def _global_download(self, task_name: str) -> GlobalModelDownload | None:
        """The model manager's download of the task's global model (it decodes into the local model's own arrays
        and writes the global copy as the variables arrive); None, for fresh buffers, when it offers none or
        post_processors are to change the model before it is loaded."""
        offer = getattr(self.model_manager, "global_model_download", None)
        return offer(task_name) if offer is not None and not self.post_processors else None

    @staticmethod
    def _read_model_stream(stream: Iterator[pb.ModelChunk], download: GlobalModelDownload | None = None) -> RemoteModel:
        try:
            first = next(stream, None)
            if first is None or first.WhichOneof("part") != "header":
                raise CommunicationError("get model: the server's reply did not start with a header")
            h = first.header
            remote = RemoteModel(
                _STATUS_NAMES.get(h.status, "wait"),
                h.run_number,
                h.round,
                h.start_round,
                h.num_rounds,
                message=h.message,
            )
            if download is None:
                remote.tensors = decode_tensors(stream)
            else:
                remote.tensors = decode_tensors(stream, download.sink, download.on_tensor)
            if remote.status != "wait" and len(remote.tensors) != h.num_tensors:
                raise CommunicationError(
                    f"get model: the server announced {h.num_tensors} tensors but sent {len(remote.tensors)}"
                )
        except BaseException:
            _abort(download)
            raise
        if download is not None:
            download.complete()
        return remote

    def submitUpdate(
        self, servers: dict, task_name: str, token: str, fl_ctx: FLContext, app_ctx, uid: str
    ) -> pb.SubmitReply:
        """Send this round's update (delta_w) with its weight and the metrics of the global model."""
        state = self.get_client_state(task_name, token, app_ctx, client_name=uid)
        contribution = DataAssembler.get_contribution_data(
            self.model_manager, task_name, state, self.pre_processors, fl_ctx, app_ctx
        )
        extra = fl_ctx.get_prop(FLContextKey.EXTRA_TENSORS)
        if extra:  # a site algorithm's tensors: not model variables, so past the privacy filter and processors
            contribution = collections.ChainMap(dict(extra), contribution)
        header = pb.ModelHeader(
            run_number=int(fl_ctx.get_prop(FLContextKey.RUN_NUMBER, 0)),
            round=int(fl_ctx.get_prop(FLContextKey.ROUND, 0)),
            kind="delta_w",
            weight=float(fl_ctx.get_prop(FLContextKey.WEIGHT, 1.0)),
            metrics=dict(fl_ctx.get_prop(FLContextKey.METRICS, {}) or {}),
            num_tensors=len(contribution),
            privacy_protocol=str(fl_ctx.get_prop(FLContextKey.PRIVACY_PROTOCOL, "") or ""),
            privacy_epsilon=float(fl_ctx.get_prop(FLContextKey.PRIVACY_EPSILON, 0.0) or 0.0),
        )
        stub = self._stub(servers, task_name)
        target = server_target(servers[task_name])
        if target in self._bulk_sized and self.bulk.usable(target):
            reply = self._submit_over_bulk(servers, task_name, stub, state.token, header, contribution)
            if reply is not None:
                return reply

        def chunks() -> Iterator[pb.ModelChunk]:
            yield pb.ModelChunk(header=header)
            yield from encode_tensors(_in_order(contribution), self.chunk_bytes)

        return self._call(
            servers,
            task_name,
            "submit update",
            lambda: stub.SubmitUpdate(chunks(), metadata=self._metadata(state.token), timeout=TRANSFER_DEADLINE_S),
        )

    def _submit_over_bulk(
        self,
        servers: dict,
        task_name: str,
        stub: TrainingStub,
        token: str | None,
        header: pb.ModelHeader,
        contribution: Mapping[str, np.ndarray],
    ) -> pb.SubmitReply | None:
        """Send the update over the server's bulk channel; None when it has none or cannot be reached (then nothing
        was sent: the caller uses SubmitUpdate) or when the upload broke off (the server dropped what came)."""
        request = pb.OpenUploadRequest(run_number=header.run_number, round=header.round)
        try:
            ticket = self._call(
                servers,
                task_name,
                "open upload",
                lambda: stub.OpenUpload(request, metadata=self._metadata(token), timeout=SHORT_DEADLINE_S),
            )
        except RegistrationRequired:
            raise
        except CommunicationError as e:
            log.debug("submit update: no bulk upload (%s)", e)
            return None
        if not ticket.bulk_port:
            return None
        try:
            with self.bulk.open(
                server_target(servers[task_name]), ticket.bulk_port, ticket.ticket, "upload"
            ) as connection:
                return connection.submit(header, encode_tensors(_in_order(contribution), self.chunk_bytes))
        except BulkUnavailable:
            return None
        except BulkError as e:
            log.warning("submit update: the bulk upload broke off (%s); sending over gRPC", e)
            time.sleep(BULK_RETRY_PAUSE_S)  # the server drops the broken upload's claim on the round first
            return None

    # ---- cross-site validation ----------------------------------------------------------------------

    def submit_best_local_model(
        self,
        uid: str,
        servers: dict,
        task_name: str,
        token: str,
        disable: bool = False,
        *,
        run_number: int | None = None,
    ) -> pb.SubmitReply:
        """Share this site's best local model of run `run_number` (default: the session's run); with `disable`,
        say it is not shared."""
        state = self.get_client_state(task_name, token, client_name=uid)
        run_number = self._run_number(run_number, state, "submit best model")
        tensors, metrics = DataAssembler.get_best_local_model(self.model_manager, task_name, state, disable)
        header = pb.ModelHeader(
            run_number=run_number,
            kind="not_participating" if disable else "best_model",
            num_tensors=len(tensors),
            metrics=metrics,
        )
        stub = self._stub(servers, task_name)

        def chunks() -> Iterator[pb.ModelChunk]:
            yield pb.ModelChunk(header=header)
            yield from encode_tensors(tensors, self.chunk_bytes)

        return self._call(
            servers,
            task_name,
            "submit best model",
            lambda: stub.SubmitBestModel(chunks(), metadata=self._metadata(state.token), timeout=TRANSFER_DEADLINE_S),
        )

    def get_validation_models(
        self,
        uid: str,
        servers: dict,
        task_name: str,
        token: str,
        *,
        run_number: int | None = None,
        validated: set[str] | None = None,
        wait_seconds: float = LONG_POLL_S,
    ) -> ValidationModel:
        """The next model of run `run_number` (default: the session's run) this site has not validated
        (long-poll: "wait" while none is ready)."""
        state = self.get_client_state(task_name, token, client_name=uid)
        run_number = self._run_number(run_number, state, "get validation models")
        stub = self._stub(servers, task_name)
        request = pb.ValidationModelsRequest(
            run_number=run_number, validated=sorted(validated or ()), wait_seconds=wait_seconds
        )

        def fetch() -> ValidationModel:
            stream = stub.GetValidationModels(
                request, metadata=self._metadata(state.token), timeout=wait_seconds + TRANSFER_DEADLINE_S
            )
            first = next(stream, None)
            if first is None or first.WhichOneof("part") != "header":
                raise CommunicationError("get validation models: the server's reply did not start with a header")
            h = first.header
            status = {pb.VALIDATE: "validate", pb.END: "end"}.get(h.status, "wait")
            model = ValidationModel(status, h.owner, metrics=dict(h.metrics), more=h.more_models, message=h.message)
            model.tensors = decode_tensors(stream)
            if status == "validate" and len(model.tensors) != h.num_tensors:
                raise CommunicationError(
                    f"get validation models: {h.owner}'s model announced {h.num_tensors} "
                    f"tensors but {len(model.tensors)} came"
                )
            return model

        return self._call(servers, task_name, "get validation models", fetch)

    def submit_cross_site_validation_results(
        self,
        uid: str,
        servers: dict,
        task_name: str,
        token: str,
        client_names: list[str],
        client_metrics: list[dict[str, float]],
        *,
        run_number: int | None = None,
    ) -> pb.Ack:
        """Report this site's metrics of each named owner's model (client_names[i] scored client_metrics[i])
        in run `run_number` (default: the session's run)."""
        if len(client_names) != len(client_metrics):
            raise ValueError("client_names and client_metrics must have the same length")
        state = self.get_client_state(task_name, token, client_name=uid)
        run_number = self._run_number(run_number, state, "submit validation results")
        request = pb.ValidationResults(
            run_number=run_number,
            results=[
                pb.ValidationResult(model_owner=name, metrics=metrics)
                for name, metrics in zip(client_names, client_metrics, strict=True)
            ],
        )
        stub = self._stub(servers, task_name)
        return self._call(
            servers,
            task_name,
            "submit validation results",
            lambda: stub.SubmitValidationResults(
                request, metadata=self._metadata(state.token), timeout=SHORT_DEADLINE_S
            ),
        )

    def send_heartbeat(self, servers: dict, task_name: str, token: str) -> pb.HeartbeatReply:
        stub = self._stub(servers, task_name)
        reply = self._call(
            servers,
            task_name,
            "heartbeat",
            lambda: stub.Heartbeat(pb.HeartbeatRequest(), metadata=self._metadata(token), timeout=SHORT_DEADLINE_S),
        )
        if reply.known:
            self._note_run(token, reply.run_number)
        return reply

    def report_metrics(
        self, servers: dict, task_name: str, token: str, round_number: int, metrics: dict[str, float]
    ) -> pb.Ack:
        """Report what this site measured on the run's final global model."""
        stub = self._stub(servers, task_name)
        request = pb.MetricsReport(round=round_number, metrics=metrics)
        return self._call(
            servers,
            task_name,
            "report metrics",
            lambda: stub.ReportMetrics(request, metadata=self._metadata(token), timeout=SHORT_DEADLINE_S),
        )

    def quit_remote(self, servers: dict, task_name: str, token: str) -> pb.Ack:
        """Tell the server this site leaves; no retries (the server drops silent sites anyway)."""
        state = self.get_client_state(task_name, token)
        stub = self._stub(servers, task_name)
        self._session_runs.pop(token or "", None)
        return self._call(
            servers,
            task_name,
            "quit",
            lambda: stub.Quit(
                pb.QuitRequest(reason="done"), metadata=self._metadata(state.token), timeout=SHORT_DEADLINE_S
            ),
            retry=False,
        )


def _abort(download: GlobalModelDownload | None) -> None:
    if download is not None:
        download.abort()


def _in_order(contribution: Mapping[str, np.ndarray]) -> Iterable[tuple[str, np.ndarray]]:
    """The update's tensors in order: its stream() where it has one (the model manager's update reads ahead), each
    tensor sent before the next is taken."""
    stream = getattr(contribution, "stream", None)
    return stream() if callable(stream) else contribution.items()


def _context_value(app_ctx: Any, name: str) -> Any:
    """app_ctx[name] of a Mapping, or the attribute of another object; None when it has neither."""
    if app_ctx is None:
        return None
    if isinstance(app_ctx, Mapping):
        return app_ctx.get(name)
    return getattr(app_ctx, name, None)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the session token to each call that does not carry one (set_up_channel's `token`)."""

    def __init__(self, token: str):
        self._token = token

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ())
        if not any(key == TOKEN_KEY for key, _ in metadata):
            metadata.append((TOKEN_KEY, self._token))
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

"""The site's admin agent: takes requests from the server's long-poll, runs their processors, sends the replies."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import grpc

from fedclient.communicator import mutual_tls_required, server_target
from fedclient.local_policy import LocalPolicy
from fedcommon.admin_defs import AdminIdentity, Message, MsgHeader, ReturnCode, body_text, error_reply
from fedcommon.admin_serde import message_from_wire, message_to_wire
from fedcommon.audit import JsonLinesLog
from fedcommon.commands import LONG_POLL_S, Topic
from fedcommon.kit import tls_channel_credentials
from fedcommon.wire import admin_pb2 as pb
from fedcommon.wire import admin_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# The Retrieve's hold is fedcommon.commands.LONG_POLL_S (60 s): a held Retrieve costs the server nothing, a
# returned one about a millisecond of CPU, so a thousand idle sites cost it ~2.5% of a core (20 s: ~6%;
# benchmarks/scale_bench.py). The server's keepalive pings find a dead site's connection in under a minute either way.
RETRIEVE_DEADLINE_S = LONG_POLL_S + 15
SEND_DEADLINE_S = 30.0
SEND_ATTEMPTS = 3
FETCH_DEADLINE_S = 1800.0
DEFAULT_WORKERS = 5
SHUTDOWN_WAIT_S = 10.0
# How long the retrieve loop waits for the replies of the batch it just took, to carry them with its next
# long-poll instead of a SendReply call each; a slower request's reply is sent on its own when ready.
PIGGYBACK_WAIT_S = 0.1
MAX_RETRY_PAUSE_S = 2.0
# While the server is unreachable (not started yet, restarting) the channel tries again after 100 ms, growing to
# MAX_RETRY_PAUSE_S: gRPC's own first back-off (1 s, up to 120 s) would keep a site away from a server that is up.
# The retrieve loop waits for that connection in slices this long, so a site long-polls as soon as the server listens.
RECONNECT_BACKOFF_MS = (100, int(MAX_RETRY_PAUSE_S * 1000))
RECONNECT_SLICE_S = 0.02
MAX_MESSAGE_BYTES = 16 << 20
# Polled every second while an operator follows a run: logged only at debug level when they succeed.
QUIET_TOPICS = (Topic.CHECK_STATUS, Topic.SYS_INFO)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RequestProcessor:
    """Handles the requests of some topics; one small class per topic family."""

    def get_topics(self) -> list[str]:
        """The topics this processor handles."""
        raise NotImplementedError

    def process(self, req: Message, app_ctx) -> Message:
        """Handle `req` and return the reply; raising makes the agent reply an error naming the topic."""
        raise NotImplementedError


class Sender:
    """Connects the agent to the messaging system; every method must be exception-proof."""

    def retrieve_requests(self) -> list[Message]:
        """The pending requests for this site ([] when none, or on an error)."""
        raise NotImplementedError

    def send_reply(self, reply: Message) -> None:
        """Send the reply to a request."""
        raise NotImplementedError

    def retrieve_requests_with_replies(self, replies: list[Message]) -> list[Message]:
        """Deliver `replies`, then long-poll as retrieve_requests; a Sender may carry both in one call."""
        for reply in replies:
            self.send_reply(reply)
        return self.retrieve_requests()

    def send_result(self, message: Message) -> None:
        """Send a message the site sends on its own (progress, training_ended)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection; a retrieve in flight returns at once."""


class FedAdminAgent:
    """Retrieves requests, runs them on a small pool (a slow one never blocks the others) and replies to each."""

    def __init__(
        self,
        client_name: str,
        sender: Sender,
        app_ctx,
        req_poll_interval: float = 0.5,
        process_poll_interval: float = 0.1,
        *,
        workers: int = DEFAULT_WORKERS,
        audit_log: Path | None = None,
        policy: LocalPolicy | None = None,
    ):
        self.client_name = client_name
        self.sender = sender
        self.app_ctx = app_ctx
        self.req_poll_interval = req_poll_interval
        self.process_poll_interval = process_poll_interval
        self.processors: dict[str, RequestProcessor] = {}
        self.audit_log = Path(audit_log) if audit_log is not None else None
        self.policy = policy
        self._workers = workers
        self._incoming: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: set[Future] = set()
        self._in_flight_lock = threading.Lock()
        self._audit_writer = JsonLinesLog(self.audit_log) if self.audit_log is not None else None
        self._threads: list[threading.Thread] = []
        # Replies to the last retrieved batch that are ready before the next long-poll travel with it.
        self._batch_lock = threading.Condition()
        self._batch: set[str] = set()  # ids of the last batch's requests still being handled
        self._outbox: list[Message] = []

    def register_processor(self, processor: RequestProcessor) -> None:
        """Route the processor's topics to it; a topic may have one processor only."""
        topics = processor.get_topics()
        if not topics:
            raise ValueError(f"{type(processor).__name__} handles no topic")
        for topic in topics:
            if topic in self.processors:
                raise ValueError(f"topic {topic!r} already has the processor {type(self.processors[topic]).__name__}")
        for topic in topics:
            self.processors[topic] = processor

    def start(self) -> None:
        """Start retrieving and processing requests in background threads."""
        if self._pool is not None:
            raise RuntimeError("the agent is already started")
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="admin-request")
        for target, name in ((self._retrieve_loop, "admin-retrieve"), (self._dispatch_loop, "admin-dispatch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("admin agent of %s started with topics %s", self.client_name, ", ".join(sorted(self.processors)))

    def shutdown(self) -> None:
        """Stop taking requests, let those in progress finish and reply (up to 10 s), and close the sender."""
        self._stop.set()
        with self._in_flight_lock:
            in_flight = set(self._in_flight)
        if in_flight:
            _, pending = wait_futures(in_flight, timeout=SHUTDOWN_WAIT_S)
            if pending:
                log.warning("%d request(s) still running at shutdown; their replies are lost", len(pending))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.sender.close()
        for thread in self._threads:
            thread.join(timeout=5)
        log.info("admin agent of %s stopped", self.client_name)

    def is_running(self) -> bool:
        """Whether the agent takes requests."""
        return self._pool is not None and not self._stop.is_set()

    # ---- loops ----------------------------------------------------------------------------------

    def _retrieve_loop(self) -> None:
        replies: list[Message] = []
        failures = 0  # long-polls in a row that failed at once: the server is away
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if replies:
                    requests = self.sender.retrieve_requests_with_replies(replies)
                else:
                    requests = self.sender.retrieve_requests()
            except Exception:  # a Sender should not raise; the agent survives one that does
                log.exception("retrieving requests failed")
                requests = []
            if self._stop.is_set():
                if requests:
                    log.warning("shutting down: %d retrieved request(s) dropped", len(requests))
                return
            with self._batch_lock:
                self._batch = {request.id for request in requests}
            for request in requests:
                self._incoming.put(request)
            replies = self._batch_replies() if requests else []
            # An empty answer long before the long-poll's end means the call failed: space the retries, doubling
            # the pause up to MAX_RETRY_PAUSE_S, with jitter so that sites do not all return in the same instant.
            if not requests and time.monotonic() - started < self.req_poll_interval:
                failures += 1
                self._pause(retry_pause(failures, self.req_poll_interval) * random.uniform(0.5, 1.0))
            else:
                failures = 0

    def _pause(self, seconds: float) -> None:
        """Wait before the next long-poll; one that failed while the server was unreachable goes again as soon as
        the connection is up (a sender that can tell), not after the whole pause."""
        connected = getattr(self.sender, "wait_connected", None)
        if connected is None or connected(0):
            self._stop.wait(seconds)
            return
        until = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < until:
            if connected(RECONNECT_SLICE_S):
                return

    def _batch_replies(self) -> list[Message]:
        """The replies to the batch just retrieved that are ready within PIGGYBACK_WAIT_S; later ones are sent."""
        deadline = time.monotonic() + PIGGYBACK_WAIT_S
        with self._batch_lock:
            while self._batch and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._batch_lock.wait(left)
            self._batch = set()
            replies, self._outbox = self._outbox, []
        return replies

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                request = self._incoming.get(timeout=self.process_poll_interval)
            except queue.Empty:
                continue
            try:
                future = self._pool.submit(self._handle, request)
            except RuntimeError:  # pool shut down under us
                return
            with self._in_flight_lock:
                self._in_flight.add(future)
            future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)

    # ---- one request ----------------------------------------------------------------------------

    def _handle(self, req: Message) -> None:
        started = time.monotonic()
        reply = self._process(req)
        reply.set_ref_id(req.id)
        if reply.get_header(MsgHeader.RETURN_CODE) not in (ReturnCode.OK, ReturnCode.ERROR):
            reply.set_header(MsgHeader.RETURN_CODE, ReturnCode.OK)
        ok = reply.get_header(MsgHeader.RETURN_CODE) == ReturnCode.OK
        error = "" if ok else body_text(reply.body)
        self._audit(req, ok, error)
        with self._batch_lock:
            if req.id in self._batch:  # the retrieve loop is waiting for it: it goes with the next long-poll
                self._batch.discard(req.id)
                self._outbox.append(reply)
                self._batch_lock.notify_all()
                reply = None
        try:
            if reply is not None:
                self.sender.send_reply(reply)
        except Exception:
            log.exception("sending the reply to %s (%s) failed", req.topic, req.id)
        level = logging.DEBUG if ok and req.topic in QUIET_TOPICS else logging.INFO
        log.log(
            level,
            "request %s (%s): %s in %.2fs%s",
            req.topic,
            req.id,
            "ok" if ok else "error",
            time.monotonic() - started,
            f": {error}" if error else "",
        )

    def _process(self, req: Message) -> Message:
        if self.policy is not None:
            refused = self.policy.refusal(_sender(req), req.get_header(MsgHeader.COMMAND) or req.topic)
            if refused:
                log.warning("request %s (%s) from %s: %s", req.topic, req.id, req.get_header(MsgHeader.ADMIN), refused)
                return error_reply(f"{self.client_name}: {refused}", req)
        processor = self.processors.get(req.topic)
        if processor is None:
            return error_reply(f"{self.client_name}: unknown topic {req.topic!r}", req)
        try:
            reply = processor.process(req, self.app_ctx)
        except Exception as e:
            log.exception("processor %s failed on %s", type(processor).__name__, req.topic)
            return error_reply(f"{self.client_name}: {req.topic} failed: {type(e).__name__}: {e}", req)
        if not isinstance(reply, Message):
            return error_reply(f"{self.client_name}: {req.topic}: the processor returned no reply", req)
        return reply

    def _audit(self, req: Message, ok: bool, error: str) -> None:
        if self._audit_writer is None:
            return
        sender = _sender(req)
        entry: dict[str, Any] = {
            "admin": sender.name,
            "role": sender.role,
            "org": sender.org,
            "command": req.get_header(MsgHeader.COMMAND) or req.topic,
            "site": self.client_name,
            "topic": req.topic,
            "id": req.id,
            "ok": ok,
        }
        if req.get_header("run_number") is not None:
            entry["run_number"] = req.get_header("run_number")
        if req.topic == Topic.SHELL:
            with contextlib.suppress(ValueError, AttributeError):
                entry["argv"] = json.loads(body_text(req.body)).get("argv")
        if error:
            entry["error"] = error[:500]
        self._audit_writer.append(entry)


class BlobFetchError(Exception):
    """A deployed file could not be fetched or did not match; the message says what differed."""


class AdminMessageSender(Sender):
    """The agent plane over gRPC (service SiteAgent on fl_port) with mutual TLS.

    With is_multi_gpu, only rank 0 talks to the server: the other ranks retrieve nothing and send nothing.
    """

    def __init__(
        self,
        client_name: str,
        root_cert: str | None = None,
        ssl_cert: str | None = None,
        private_key: str | None = None,
        server_args=None,
        secure: bool = False,
        is_multi_gpu: bool = False,
        rank: int = 0,
    ):
        if not secure:
            raise ValueError(
                mutual_tls_required("AdminMessageSender", "secure", "root_cert=..., ssl_cert=..., private_key=...")
            )
        if rank != 0 and not is_multi_gpu:
            raise ValueError(
                f"AdminMessageSender: rank {rank} without is_multi_gpu=True: only a multi-GPU site has "
                f"ranks other than 0 (rank 0 talks to the server, the others send nothing)"
            )
        credentials = tls_channel_credentials(
            {"root_cert": root_cert, "ssl_cert": ssl_cert, "private_key": private_key},
            "AdminMessageSender (mutual TLS)",
        )
        if server_args is None:
            raise ValueError("AdminMessageSender: server_args must name the server: {'target': 'host:fl_port'}")
        entry = server_args[0] if isinstance(server_args, (list, tuple)) else server_args
        self.client_name = client_name
        self.target = server_target(entry)
        self.task_name = entry.get("name", "admin") if isinstance(entry, dict) else "admin"
        self.is_multi_gpu = is_multi_gpu
        self.rank = rank
        self._silent = is_multi_gpu and rank != 0
        first, most = RECONNECT_BACKOFF_MS
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", first),
            ("grpc.min_reconnect_backoff_ms", first),
            ("grpc.max_reconnect_backoff_ms", most),
        ]
        self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._stub = pb_grpc.SiteAgentStub(self._channel)
        self._ready = threading.Event()
        if not self._silent:
            self._channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._failing: str | None = None

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            self._ready.set()
        else:
            self._ready.clear()

    def wait_connected(self, timeout: float) -> bool:
        """Whether the mutual-TLS connection to the server is up (waiting up to `timeout` seconds)."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Close the channel; a Retrieve in flight ends at once."""
        with contextlib.suppress(Exception):
            self._channel.unsubscribe(self._on_connectivity)
        self._channel.close()

    # ---- the seed's calls ------------------------------------------------------------------------

    def retrieve_client_requests(
        self, taskname: str, wait_seconds: float = LONG_POLL_S, replies: list[Message] = ()
    ) -> list[Message]:
        """Long-poll the server for this site's requests, delivering `replies` with the call (raises grpc.RpcError)."""
        if self._silent:
            return []
        request = pb.RetrieveRequest(wait_seconds=wait_seconds, replies=[message_to_wire(m) for m in replies])
        reply = self._stub.Retrieve(request, timeout=RETRIEVE_DEADLINE_S)
        return [message_from_wire(m) for m in reply.requests]

    def retrieve_requests(self) -> list[Message]:
        """Long-poll for requests; [] on any error (logged once per kind of failure)."""
        return self.retrieve_requests_with_replies([])

    def retrieve_requests_with_replies(self, replies: list[Message]) -> list[Message]:
        """Long-poll for requests, carrying `replies`; on an error they are sent one by one, and [] is returned."""
        try:
            requests = self.retrieve_client_requests(self.task_name, replies=replies)
        except grpc.RpcError as e:
            self._failed("retrieving requests", e)
            for reply in replies:  # the server may not have them: SendReply retries; a duplicate is refused
                self.send_reply(reply)
            return []
        except Exception:
            log.exception("retrieving requests failed")
            return []
        if self._failing is not None:
            log.info("connected to the server at %s again", self.target)
            self._failing = None
        return requests

    def send_client_reply(self, message: Message, taskname: str) -> bool:
        """Send a reply to a request (raises grpc.RpcError); False when the server did not take it."""
        if self._silent:
            return True
        ack = self._stub.SendReply(message_to_wire(message), timeout=SEND_DEADLINE_S)
        if not ack.ok:
            log.warning("%s: the server did not take the reply to %s: %s", taskname, message.get_ref_id(), ack.message)
        return ack.ok

    def send_reply(self, message: Message) -> None:
        """Send a reply, retrying a transient failure a few times; failures are logged, never raised."""
        self._send("reply", lambda: self.send_client_reply(message, self.task_name))

    def send_result(self, message: Message) -> None:
        """Send a progress or training_ended result; failures are logged, never raised."""
        if self._silent:
            return

        def call() -> bool:
            ack = self._stub.SendResult(message_to_wire(message), timeout=SEND_DEADLINE_S)
            if not ack.ok:
                log.warning("the server did not take the %s result: %s", message.topic, ack.message)
            return ack.ok

        self._send(f"{message.topic} result", call)

    def _send(self, what: str, call) -> None:
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                call()
                return
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE or attempt == SEND_ATTEMPTS:
                    log.error("sending the %s to %s failed: %s: %s", what, self.target, e.code().name, e.details())
                    return
                time.sleep(0.5 * attempt)
            except Exception:
                log.exception("sending the %s failed", what)
                return

    def _failed(self, action: str, error: grpc.RpcError) -> None:
        code = error.code()
        if code == grpc.StatusCode.CANCELLED:
            return  # closed by us
        kind = code.name
        level = logging.WARNING if self._failing != kind else logging.DEBUG
        log.log(level, "%s from the server at %s failed: %s: %s", action, self.target, kind, error.details())
        self._failing = kind

    def fetch_blob(self, blob_id: str, dest_path: Path, expected_sha256: str, expected_size: int) -> Path:
        """Download blob `blob_id` to dest_path, checking its size and sha256; raise BlobFetchError on a mismatch."""
        dest_path = Path(dest_path)
        part = dest_path.with_name(dest_path.name + ".part")
        expected_sha256 = expected_sha256.lower()
        digest = hashlib.sha256()
        size = 0
        try:
            stream = self._stub.FetchBlob(pb.BlobRequest(blob_id=blob_id), timeout=FETCH_DEADLINE_S)
            first = next(stream, None)
            if first is None or first.WhichOneof("part") != "header":
                raise BlobFetchError(f"blob {blob_id}: the server's reply did not start with a header")
            header = first.header
            if header.size != expected_size:
                raise BlobFetchError(
                    f"blob {blob_id}: the server sends {header.size} bytes, "
                    f"the deploy request announced {expected_size}"
                )
            if header.sha256.lower() != expected_sha256:
                raise BlobFetchError(
                    f"blob {blob_id}: the server announces sha256 {header.sha256}, the deploy request {expected_sha256}"
                )
            with open(part, "wb") as out:
                for chunk in stream:
                    if chunk.WhichOneof("part") != "data":
                        raise BlobFetchError(f"blob {blob_id}: a second header inside the stream")
                    size += len(chunk.data)
                    if size > expected_size:
                        raise BlobFetchError(f"blob {blob_id}: more than the announced {expected_size} bytes")
                    digest.update(chunk.data)
                    out.write(chunk.data)
            if size != expected_size:
                raise BlobFetchError(f"blob {blob_id}: received {size} bytes, expected {expected_size}")
            if digest.hexdigest() != expected_sha256:
                raise BlobFetchError(f"blob {blob_id}: sha256 {digest.hexdigest()} differs from {expected_sha256}")
            os.replace(part, dest_path)
        except grpc.RpcError as e:
            part.unlink(missing_ok=True)
            raise BlobFetchError(f"fetching blob {blob_id} failed: {e.code().name}: {e.details()}") from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        log.info("fetched blob %s (%d bytes)", blob_id, size)
        return dest_path


def retry_pause(failures: int, interval: float) -> float:
    """Seconds before the next long-poll after `failures` in a row failed at once (before jitter): doubling, capped."""
    return min(interval * 2 ** min(failures - 1, 16), MAX_RETRY_PAUSE_S)


def _sender(req: Message) -> AdminIdentity:
    """Who sent a request, as the server stated it (empty when it did not)."""
    return AdminIdentity(
        req.get_header(MsgHeader.ADMIN) or "",
        req.get_header(MsgHeader.ADMIN_ROLE) or "",
        req.get_header(MsgHeader.ADMIN_ORG) or "",
    )

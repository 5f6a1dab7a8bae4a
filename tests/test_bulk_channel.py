"""The bulk channel for tensor bytes: rounds over it against a real `fedserver` over mutual TLS on 127.0.0.1, tickets
and frames that must be refused, and the fall back to the gRPC stream."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from conftest import prepare_workspace, server_process, start_training_run, training_run_files

from fedclient.direct_client import DirectFederatedClient
from fedclient.worker import kit_ssl_args
from fedcommon import bulk_wire
from fedcommon.bulk_wire import BulkError, FrameReader, FrameWriter
from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import channel_credentials, client_ssl_context, load_kit, server_ssl_context
from fedcommon.model_file import load_model
from fedcommon.tensor_codec import encode_tensors
from fedcommon.wire import training_pb2 as pb
from fedserver import bulk_channel
from fedserver.bulk_tickets import TicketBook, TicketError
from fedserver.run import FederatedRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TASK = "digits"
# Several data frames per tensor (1 MiB frames), and a tensor of another dtype.
W0 = {
    "w": np.random.default_rng(0).standard_normal((700, 1024)).astype(np.float32),
    "b": np.arange(5, dtype=np.float64),
}
D1 = {"w": np.full((700, 1024), 0.5, np.float32), "b": np.ones(5)}
D2 = {"w": np.full((700, 1024), -1.5, np.float32), "b": np.full(5, 3.0)}


def _expected(*deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Uniform weights: w + mean(d)."""
    return {k: W0[k] + sum(d[k] for d in deltas) / len(deltas) for k in W0}


class Federation:
    """A `fedserver` process training run 1 (one round, two sites) and the sites' kits."""

    def __init__(self, ws: Path, proc):
        self.ws = ws
        self.proc = proc
        self.target = f"127.0.0.1:{load_kit(ws / 'server').fl_port}"
        self.clients: list[DirectFederatedClient] = []

    def client(self, site: str, bulk: bool = True) -> DirectFederatedClient:
        c = DirectFederatedClient(
            site,
            kit_ssl_args(load_kit(self.ws / site)),
            True,
            server_args=[{"name": TASK, "target": self.target}],
            retry_timeout=5,
        )
        c.communicator.bulk.enabled = bulk
        self.clients.append(c)
        c.connect_to_server({"heart_beat": False})
        return c

    def log(self) -> str:
        return (self.ws / "server" / "log.txt").read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} never appeared in the server's log:\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def audit(self) -> list[dict]:
        path = self.ws / "server" / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def summary(self, timeout: float = 30) -> dict:
        path = self.ws / "server" / "run_1" / "summary.json"
        deadline = time.monotonic() + timeout
        while True:
            try:
                summary = json.loads(path.read_text())
                if summary.get("status") == "completed":
                    return summary
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, f"run 1 did not complete:\n{self.log()[-3000:]}"
            time.sleep(0.1)

    def global_model(self) -> dict[str, np.ndarray]:
        return load_model(self.ws / "server" / "run_1" / "models" / "global_model.fl")[0]


@pytest.fixture
def federation(tmp_path) -> Iterator:
    """start(*server_args) -> a Federation; its server process and clients are stopped after the test."""
    started: list[Federation] = []
    contexts = []

    def start(*args: str) -> Federation:
        ws, mmar = training_run_files(
            tmp_path,
            W0,
            clients=3,
            client={"weight_by": "uniform"},
            min_num_clients=2,
            num_rounds=1,
            wait_after_min_clients=0,
            heart_beat_timeout=60,
        )
        context = server_process(ws / "server", "--mmar", str(mmar), *args)
        proc = context.__enter__()
        contexts.append(context)
        fed = Federation(ws, proc)
        started.append(fed)
        return fed

    yield start
    for fed in started:
        for c in fed.clients:
            c.close()
    for context in contexts:
        context.__exit__(None, None, None)


def _push(client: DirectFederatedClient, delta: dict[str, np.ndarray]) -> pb.SubmitReply:
    pulled = client.pull_models_from_server()
    assert pulled["status"] == "train", pulled
    return client.push_models_to_server({k: pulled["model"][k] + delta[k] for k in W0}, {"weight": 1.0})


def _assert_model(model: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(model) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(model[k], v, rtol=1e-6, atol=1e-6, err_msg=k)  # float32 rounding of local - global


# ---- a raw site: its own gRPC session and bulk connections -------------------------------------------


class RawSite:
    """A site's session made by hand, to ask for tickets and redeem them the way a hostile peer might."""

    def __init__(self, ws: Path, site: str, target: str):
        kit = load_kit(ws / site)
        self.name = site
        self._channel = grpc.secure_channel(target, channel_credentials(kit))
        self.stub = TrainingStub(self._channel)
        self.token = self.stub.Register(pb.RegisterRequest(client_name=site), timeout=10).token
        self.metadata = (("fl-token", self.token),)
        self.context = client_ssl_context(kit_ssl_args(kit), site)

    def close(self) -> None:
        self._channel.close()

    def download_ticket(self) -> tuple[pb.ModelHeader, grpc.Call]:
        """A GetModel call's header with its ticket; the call stays open (cancel it)."""
        stream = self.stub.GetModel(pb.GetModelRequest(wait_seconds=5, bulk=True), metadata=self.metadata, timeout=90)
        head = next(stream).header
        assert head.bulk_ticket and head.bulk_port, head
        return head, stream

    def upload_ticket(self) -> pb.OpenUploadReply:
        reply = self.stub.OpenUpload(pb.OpenUploadRequest(run_number=1, round=0), metadata=self.metadata, timeout=10)
        assert reply.ticket and reply.bulk_port, reply
        return reply


@contextmanager
def bulk_socket(context: ssl.SSLContext, port: int) -> Iterator[tuple[FrameReader, FrameWriter, ssl.SSLSocket]]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        yield FrameReader(conn), FrameWriter(conn), conn
    finally:
        conn.close()


@contextmanager
def upload_socket(raw: RawSite) -> Iterator[tuple[FrameReader, FrameWriter, ssl.SSLSocket]]:
    """A bulk upload of `raw`'s, its ticket redeemed and its header (two tensors, run 1 round 0) sent."""
    upload = raw.upload_ticket()
    with bulk_socket(raw.context, upload.bulk_port) as (reader, writer, conn):
        writer.message(bulk_wire.OPEN, pb.BulkOpen(ticket=upload.ticket, op="upload"))
        assert reader.message(bulk_wire.ACK).ok
        writer.message(bulk_wire.MODEL_HEADER, pb.ModelHeader(run_number=1, round=0, kind="delta_w", num_tensors=2))
        yield reader, writer, conn


def honest_round(fed: Federation) -> None:
    """site-1 and site-2 contribute over bulk; the round completes with exactly their updates."""
    c1, c2 = fed.client("site-1"), fed.client("site-2")
    assert _push(c1, D1).accepted and _push(c2, D2).accepted
    fed.summary()
    _assert_model(fed.global_model(), _expected(D1, D2))


def _redeem(context: ssl.SSLContext, port: int, ticket: str, op: str) -> pb.Ack:
    with bulk_socket(context, port) as (reader, writer, _):
        writer.message(bulk_wire.OPEN, pb.BulkOpen(ticket=ticket, op=op))
        return reader.message(bulk_wire.ACK)


# ---- tests --------------------------------------------------------------------------------------


def test_a_round_over_bulk_moves_the_model_byte_identical_and_the_update_is_accepted(federation):
    fed = federation()
    c1, c2 = fed.client("site-1"), fed.client("site-2")
    for client, delta in ((c1, D1), (c2, D2)):
        pulled = client.pull_models_from_server()
        assert pulled["status"] == "train"
        for k, v in W0.items():
            got = pulled["model"][k]
            assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), k
        reply = client.push_models_to_server({k: pulled["model"][k] + delta[k] for k in W0}, {"weight": 1.0})
        assert reply.accepted, reply.reason
    fed.summary()
    _assert_model(fed.global_model(), _expected(D1, D2))
    # Over the bulk channel, not a silent fall back to the gRPC stream.
    for site in ("site-1", "site-2"):
        fed.wait_log(f"{site}: round 0's model sent over the bulk channel")
        fed.wait_log(f"{site}: round 0's update received over the bulk channel")


def test_reused_and_foreign_tickets_are_refused_and_the_round_completes(federation):
    fed = federation()
    raw1, raw2 = RawSite(fed.ws, "site-1", fed.target), RawSite(fed.ws, "site-3", fed.target)
    try:
        head, stream = raw1.download_ticket()
        # Another site's certificate cannot redeem site-1's ticket; the ticket is then spent.
        ack = _redeem(raw2.context, head.bulk_port, head.bulk_ticket, "download")
        assert not ack.ok and "ticket was issued to 'site-1', the certificate is 'site-3'" in ack.message
        ack = _redeem(raw1.context, head.bulk_port, head.bulk_ticket, "download")
        assert not ack.ok and "ticket already used" in ack.message
        with pytest.raises(grpc.RpcError) as info:  # the GetModel call learns its ticket is gone
            list(stream)
        assert info.value.code() == grpc.StatusCode.ABORTED and "site-3" in info.value.details()

        # A ticket redeemed for what it was not issued for, and a made-up ticket.
        upload = raw1.upload_ticket()
        ack = _redeem(raw1.context, upload.bulk_port, upload.ticket, "download")
        assert not ack.ok and "ticket is for upload, the connection asked for download" in ack.message
        ack = _redeem(raw1.context, upload.bulk_port, "A" * 32, "upload")
        assert not ack.ok and "unknown ticket" in ack.message
    finally:
        raw1.close()
        raw2.close()

    refused = [e for e in fed.audit() if e.get("port") == "bulk_port"]
    assert any("issued to 'site-1'" in e["error"] and e["peer"] == "site-3" for e in refused), refused
    assert any("already used" in e["error"] for e in refused), refused

    honest_round(fed)


def test_a_connection_without_a_client_certificate_is_refused_and_audited(federation):
    fed = federation()
    raw = RawSite(fed.ws, "site-1", fed.target)
    try:
        head, stream = raw.download_ticket()
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.load_verify_locations(fed.ws / "site-1" / "startup" / "rootCA.pem")
        with pytest.raises((ssl.SSLError, BulkError, OSError)):
            _redeem(anonymous, head.bulk_port, head.bulk_ticket, "download")
        stream.cancel()
    finally:
        raw.close()
    fed.wait_log("bulk channel: refused handshake")
    refused = [e for e in fed.audit() if e.get("port") == "bulk_port"]
    assert any("TLS handshake failed" in e["error"] and "CERTIFICATE" in e["error"].upper() for e in refused), refused


def test_oversized_and_malformed_frames_are_refused_and_the_honest_sites_complete_the_round(federation):
    fed = federation()
    raw = RawSite(fed.ws, "site-1", fed.target)
    try:
        port = raw.upload_ticket().bulk_port
        with bulk_socket(raw.context, port) as (reader, writer, conn):
            conn.sendall(bytes([99, 0, 0, 0, 0]))  # a frame kind that does not exist
            ack = reader.message(bulk_wire.ACK)
        assert not ack.ok and "malformed frame: unknown kind 99" in ack.message
        with bulk_socket(raw.context, port) as (reader, writer, conn):
            conn.sendall(bytes([bulk_wire.OPEN]) + (1 << 20).to_bytes(4, "little"))
            ack = reader.message(bulk_wire.ACK)
        assert not ack.ok and "open frame of 1048576 bytes; the limit is 65536" in ack.message
        with bulk_socket(raw.context, port) as (reader, writer, conn):
            conn.sendall(bytes([bulk_wire.OPEN, 3, 0, 0, 0]) + b"\xff\xff\xff")
            ack = reader.message(bulk_wire.ACK)
        assert not ack.ok and "malformed open frame" in ack.message

        # Mid-upload: a data frame over the bound ends the upload; the claim on the round is released.
        with upload_socket(raw) as (reader, writer, conn):
            writer.message(bulk_wire.TENSOR, pb.TensorHeader(name="b", dtype="float64", shape=[5], nbytes=40))
            conn.sendall(bytes([bulk_wire.DATA]) + (64 << 20).to_bytes(4, "little"))
            reply = reader.message(bulk_wire.REPLY)
        assert not reply.accepted and "data frame of 67108864 bytes; the limit is 16777216" in reply.reason
    finally:
        raw.close()
    fed.wait_log("bulk upload for round 0 broke off")
    honest_round(fed)


def test_an_upload_that_breaks_off_mid_tensor_loses_nothing(federation):
    fed = federation()
    raw = RawSite(fed.ws, "site-1", fed.target)
    try:
        with upload_socket(raw) as (reader, writer, conn):
            poison = {"w": np.full((700, 1024), 1e6, np.float32), "b": np.full(5, 1e6)}
            chunks = list(encode_tensors(poison, 1 << 20))
            writer.chunks(chunks[:2] + [chunks[2]])  # the w header and two of its data frames; then the site is gone
    finally:
        raw.close()
    fed.wait_log("site-1: bulk upload for round 0 broke off")
    # The site's retry and the other site's contribution are accepted; nothing of the broken upload is summed.
    honest_round(fed)


def test_an_update_with_nan_is_refused_over_bulk_with_the_reason_grpc_gives(federation):
    fed = federation()
    bulk, plain = fed.client("site-1"), fed.client("site-2", bulk=False)
    bad = {"w": np.full((700, 1024), np.nan, np.float32), "b": np.zeros(5)}
    over_bulk, over_grpc = _push(bulk, bad), _push(plain, bad)
    assert not over_bulk.accepted and not over_grpc.accepted
    assert over_bulk.reason == over_grpc.reason and "w" in over_bulk.reason
    fed.wait_log("site-1: round 0's model sent over the bulk channel")
    assert "site-2: round 0's model sent over the bulk channel" not in fed.log()
    # Refused, not lost: both sites may contribute again.
    assert _push(bulk, D1).accepted and _push(plain, D2).accepted
    fed.summary()
    _assert_model(fed.global_model(), _expected(D1, D2))


def test_with_bulk_port_off_the_round_completes_over_grpc(federation):
    fed = federation("--bulk-port", "-1")
    honest_round(fed)
    assert "no bulk channel" in fed.log() and "over the bulk channel" not in fed.log()


@pytest.fixture
def in_process(tmp_path) -> Iterator:
    """An in-process server training run 1 (its bulk channel at hand) and connect(site) for its sites; all stopped
    after the test."""
    server, ws = start_training_run(tmp_path, W0, clients=2, min_num_clients=2, num_rounds=1, wait_after_min_clients=0)
    clients: list[DirectFederatedClient] = []
    target = f"127.0.0.1:{server.fl_port}"

    def connect(site: str) -> DirectFederatedClient:
        c = DirectFederatedClient(
            site, kit_ssl_args(load_kit(ws / site)), True, server_args=[{"name": TASK, "target": target}]
        )
        clients.append(c)
        c.connect_to_server({"heart_beat": False})
        return c

    try:
        yield SimpleNamespace(server=server, connect=connect, ws=ws, target=target)
    finally:
        for c in clients:
            c.close()
        server.stop(0)


def test_an_unreachable_bulk_port_falls_back_to_grpc(in_process, caplog):
    server = in_process.server
    server.bulk.stop()  # the port is advertised but nothing listens there: as behind a firewall that rejects
    c1, c2 = in_process.connect("site-1"), in_process.connect("site-2")
    with caplog.at_level("WARNING", logger="fedclient.bulk_client"):
        assert _push(c1, D1).accepted and _push(c2, D2).accepted
    _assert_model(load_model(server.run.model_path)[0], _expected(D1, D2))
    assert server.telemetry.bulk_downloads == 0 and server.telemetry.bulk_uploads == 0
    assert server.telemetry.contributions_accepted == 2
    warnings = [r.getMessage() for r in caplog.records if "bulk channel of" in r.getMessage()]
    # Told once per site, and the channel is then left alone (no connect per transfer).
    assert len(warnings) == 2 and all("using the gRPC stream" in w for w in warnings), warnings


def _all_free(slots, timeout: float = 5) -> bool:
    """Whether every slot of `slots` is free within `timeout` seconds (the server frees them on its own threads)."""
    deadline = time.monotonic() + timeout
    while slots.in_use and time.monotonic() < deadline:
        time.sleep(0.02)
    return slots.in_use == 0


def test_a_download_ticket_is_issued_only_once_a_download_slot_is_kept_for_it(in_process):
    server = in_process.server
    slots = server.download_slots
    raw = RawSite(in_process.ws, "site-1", in_process.target)
    got: list = []
    try:
        with contextlib.ExitStack() as busy:
            for k in range(slots.limit):
                busy.enter_context(slots.hold(f"other-{k}"))
            waiter = threading.Thread(target=lambda: got.append(raw.download_ticket()))
            waiter.start()
            waiter.join(1.0)
            assert not got  # no ticket while every slot is busy: the site has nothing to connect with yet
        waiter.join(20)
        head, call = got[0]
        assert head.bulk_ticket and slots.in_use == 1  # the GetModel call keeps its slot for the transfer
        call.cancel()  # the site gives up: the ticket is withdrawn and the slot freed
        assert _all_free(slots)
    finally:
        raw.close()


def test_an_upload_ticket_keeps_its_upload_slot_so_its_site_never_waits_on_a_connection(in_process, monkeypatch):
    from fedserver import training_service

    server = in_process.server
    slots = server.upload_slots
    raw = RawSite(in_process.ws, "site-1", in_process.target)
    try:
        request = pb.OpenUploadRequest(run_number=1, round=0)
        # Every slot busy: OpenUpload waits, then gives a ticket without a slot (its connection would wait, as before).
        monkeypatch.setattr(training_service, "OPEN_UPLOAD_WAIT_S", 0.3)
        with contextlib.ExitStack() as busy:
            for k in range(slots.limit):
                busy.enter_context(slots.hold(f"other-{k}"))
            began = time.monotonic()
            unkept = raw.stub.OpenUpload(request, metadata=raw.metadata, timeout=10)
            assert unkept.ticket and time.monotonic() - began >= 0.3 and slots.in_use == slots.limit
        # A slot free: the ticket comes with it kept, and giving the ticket up frees it.
        kept = raw.stub.OpenUpload(request, metadata=raw.metadata, timeout=10)
        assert kept.ticket and slots.in_use == 1
        ack = _redeem(raw.context, kept.bulk_port, kept.ticket, "download")  # the wrong op: refused, used up
        assert not ack.ok
        assert _all_free(slots)
    finally:
        raw.close()
    # A real upload takes its kept slot and frees it when done.
    c1, c2 = in_process.connect("site-1"), in_process.connect("site-2")
    assert _push(c1, D1).accepted and _push(c2, D2).accepted
    assert server.telemetry.bulk_uploads == 2 and slots.in_use == 0


def test_an_expired_ticket_is_refused_and_the_round_completes(in_process):
    server = in_process.server
    server.bulk.tickets.ttl_s = 0.3
    raw = RawSite(in_process.ws, "site-1", in_process.target)
    try:
        upload = raw.upload_ticket()
        time.sleep(0.5)
        ack = _redeem(raw.context, upload.bulk_port, upload.ticket, "upload")
        assert not ack.ok and "ticket expired" in ack.message
    finally:
        raw.close()
    server.bulk.tickets.ttl_s = 60
    c1, c2 = in_process.connect("site-1"), in_process.connect("site-2")
    assert _push(c1, D1).accepted and _push(c2, D2).accepted
    _assert_model(load_model(server.run.model_path)[0], _expected(D1, D2))
    assert server.telemetry.bulk_uploads == 2 and server.telemetry.bulk_downloads == 2


def test_an_update_refused_before_its_end_gets_its_reason_over_bulk(in_process, caplog):
    c1 = in_process.connect("site-1")
    assert _push(c1, D1).accepted
    with caplog.at_level("WARNING", logger="fedclient"):
        again = c1.push_models_to_server({k: W0[k] + D1[k] for k in W0}, {"weight": 1.0})
    assert not again.accepted and "duplicate contribution: site-1 already contributed to round 0" in again.reason
    # Answered on the bulk connection itself: no broken upload, no second try over gRPC.
    assert not [r for r in caplog.records if "broke off" in r.getMessage()]
    assert in_process.server.telemetry.contributions_refused == 1


def test_an_upload_holds_no_frame_buffer_while_its_contribution_is_committed(in_process, monkeypatch):
    """A hundred uploads may end at once and wait to commit: none of them may still hold its data frame buffer."""
    alive: list[int] = []  # sizes of the framing's allocations still held when a commit starts
    commit = FederatedRun.commit_contribution

    def observed(self, *args, **kwargs):
        framing = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, bulk_wire.__file__)])
        alive.append(max((t.size for t in framing.traces), default=0))
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(FederatedRun, "commit_contribution", observed)
    c1 = in_process.connect("site-1")
    tracemalloc.start()
    try:
        assert _push(c1, D1).accepted
    finally:
        tracemalloc.stop()
    assert in_process.server.telemetry.bulk_uploads == 1  # the update came over the bulk channel
    # The upload's data frames were up to 2 MiB; what is left are message frames' bytes at most.
    assert len(alive) == 1 and alive[0] <= bulk_wire.MAX_MESSAGE_BYTES, alive


def test_the_server_reads_an_uploads_data_in_pieces_smaller_than_the_sites_frames(in_process, monkeypatch):
    """The site frames 2 MiB of data at a time; the server holds a quarter-MiB piece of it at a time."""
    from fedcommon.chunk_wire import DataChunk
    from fedserver.training_service import TrainingService

    largest: list[int] = []
    submit = TrainingService.submit_bulk

    def observed(self, ticket, session, head, chunks):
        def watched():
            for chunk in chunks:
                if isinstance(chunk, DataChunk):
                    largest.append(chunk.data.nbytes)
                yield chunk

        return submit(self, ticket, session, head, watched())

    monkeypatch.setattr(TrainingService, "submit_bulk", observed)
    c1, c2 = in_process.connect("site-1"), in_process.connect("site-2")
    assert _push(c1, D1).accepted and _push(c2, D2).accepted
    _assert_model(load_model(in_process.server.run.model_path)[0], _expected(D1, D2))
    assert in_process.server.telemetry.bulk_uploads == 2
    assert max(largest) == bulk_channel.READ_PIECE_BYTES < W0["w"].nbytes


def test_an_upload_holds_no_write_buffer_while_its_contribution_is_committed(in_process, monkeypatch):
    """Its staging file is written out before it waits for the commit: none of its write buffers is held then."""
    from fedserver import staged_upload

    held: list[int] = []  # bytes still allocated on the staging's behalf when a commit starts
    commit = FederatedRun.commit_contribution

    def observed(self, *args, **kwargs):
        staging = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, staged_upload.__file__, all_frames=True)]
        )
        held.append(sum(t.size for t in staging.traces))
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(FederatedRun, "commit_contribution", observed)
    c1 = in_process.connect("site-1")
    tracemalloc.start(8)  # frames enough to see the staging code under the buffers it allocated
    try:
        assert _push(c1, D1).accepted
    finally:
        tracemalloc.stop()
    assert in_process.server.telemetry.bulk_uploads == 1
    assert len(held) == 1 and held[0] < 64 * 1024, held  # small objects at most, no megabyte buffer


def test_a_model_under_the_bulk_threshold_stays_on_the_grpc_stream(tmp_path):
    tiny = {"w": np.ones((4, 4), np.float32)}
    server, ws = start_training_run(tmp_path, tiny, clients=2, min_num_clients=1, num_rounds=1)
    client = None
    try:
        client = DirectFederatedClient(
            "site-1",
            kit_ssl_args(load_kit(ws / "site-1")),
            True,
            server_args=[{"name": TASK, "target": f"127.0.0.1:{server.fl_port}"}],
        )
        client.connect_to_server({"heart_beat": False})
        pulled = client.pull_models_from_server()
        assert client.push_models_to_server({"w": pulled["model"]["w"] + 1}, {"weight": 1.0}).accepted
        assert server.telemetry.contributions_accepted == 1
        assert server.telemetry.bulk_downloads == 0 and server.telemetry.bulk_uploads == 0
    finally:
        if client is not None:
            client.close()
        server.stop(0)


def test_a_ticket_of_a_session_that_ended_is_refused(in_process):
    raw = RawSite(in_process.ws, "site-1", in_process.target)
    try:
        upload = raw.upload_ticket()
        raw.stub.Quit(pb.QuitRequest(reason="done"), metadata=raw.metadata, timeout=10)
        ack = _redeem(raw.context, upload.bulk_port, upload.ticket, "upload")
        assert not ack.ok and "unknown or expired session token" in ack.message
    finally:
        raw.close()


def test_a_site_gets_a_fair_share_of_bulk_connections(in_process):
    raw = RawSite(in_process.ws, "site-1", in_process.target)
    port = in_process.server.bulk_port
    held = []
    try:
        for _ in range(bulk_channel.CONNECTIONS_PER_SITE):
            conn = raw.context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1"
            )
            held.append(conn)
        deadline = time.monotonic() + 10
        while in_process.server.bulk.connections() < len(held):
            assert time.monotonic() < deadline, "the held connections were never counted"
            time.sleep(0.02)
        upload = raw.upload_ticket()
        ack = _redeem(raw.context, upload.bulk_port, upload.ticket, "upload")
        assert not ack.ok and f"site-1 already has {len(held)} bulk connections" in ack.message
    finally:
        for conn in held:
            conn.close()
        raw.close()
    # Once they are closed (and the server has seen them close), the site connects again.
    deadline = time.monotonic() + 10
    while in_process.server.bulk.connections() > 0:
        assert time.monotonic() < deadline, "the closed connections were never released"
        time.sleep(0.02)
    c1, c2 = in_process.connect("site-1"), in_process.connect("site-2")
    assert _push(c1, D1).accepted and _push(c2, D2).accepted
    assert in_process.server.telemetry.bulk_uploads == 2


# ---- units: tickets and frames --------------------------------------------------------------------------


def test_a_ticket_is_redeemed_once_by_its_site_for_its_op_only():
    book = TicketBook(ttl_s=60)
    secret, ticket = book.issue("download", "site-1", "tok", 1, 0)
    assert len(secret) >= 32  # 192 random bits, URL-safe
    assert book.redeem(secret, "download", "site-1") is ticket and ticket.redeemed
    with pytest.raises(TicketError, match="already used"):
        book.redeem(secret, "download", "site-1")
    secret, ticket = book.issue("download", "site-1", "tok", 1, 0)
    assert book.withdraw(ticket, "withdrawn: gone") and ticket.done.is_set()
    with pytest.raises(TicketError, match="withdrawn: gone"):
        book.redeem(secret, "download", "site-1")


def test_a_site_holds_a_bounded_number_of_open_tickets():
    book = TicketBook(ttl_s=60, per_site=3)
    issued = [book.issue("upload", "site-1", "tok", 1, 0) for _ in range(5)]
    for secret, _ in issued[:2]:
        with pytest.raises(TicketError, match="newer tickets"):
            book.redeem(secret, "upload", "site-1")
    for secret, ticket in issued[2:]:
        assert book.redeem(secret, "upload", "site-1") is ticket


def test_a_data_frame_is_read_in_pieces_whatever_size_the_sender_framed_it():
    a, b = socket.socketpair()
    payload = np.random.default_rng(5).integers(0, 256, (3 << 20) + 7, np.uint8).tobytes()
    try:
        writer, reader = FrameWriter(a), FrameReader(b, piece_bytes=1 << 20)
        sender = threading.Thread(target=lambda: (writer.data(payload), writer.message(bulk_wire.ACK, pb.Ack(ok=True))))
        sender.start()
        pieces = []
        while len(b"".join(pieces)) < len(payload):
            kind, data = reader.frame()
            assert kind == bulk_wire.DATA and data.nbytes <= 1 << 20
            pieces.append(bytes(data))
        assert b"".join(pieces) == payload and len(pieces) == 4
        assert reader.message(bulk_wire.ACK).ok  # the frame after the pieces is read as itself
        sender.join(10)
    finally:
        a.close()
        b.close()


def test_frames_round_trip_and_a_cut_off_stream_is_named():
    a, b = socket.socketpair()
    try:
        writer, reader = FrameWriter(a), FrameReader(b)

        def send() -> None:
            writer.chunks(encode_tensors(W0, 1 << 20))
            writer.end()

        sender = threading.Thread(target=send)
        sender.start()
        got = {}
        for chunk in reader.chunks():
            if chunk.WhichOneof("part") == "tensor":
                name, parts = chunk.tensor.name, []
                got[name] = parts
            else:
                parts.append(bytes(chunk.data))
        assert {k: b"".join(v) for k, v in got.items()} == {k: v.tobytes() for k, v in W0.items()}
        sender.join(10)
        a.sendall(bytes([bulk_wire.DATA]) + (10).to_bytes(4, "little") + b"abc")
        a.close()
        with pytest.raises(BulkError, match="closed the connection mid-frame"):
            reader.frame()
    finally:
        a.close()
        b.close()


@contextmanager
def _tls_pair(tmp_path: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A site's and the server's ends of one mutual-TLS connection on 127.0.0.1, with a PoC kit's contexts."""
    ws = prepare_workspace(tmp_path / "ws", 1)
    server_context = server_ssl_context(load_kit(ws / "server"))
    site_context = client_ssl_context(kit_ssl_args(load_kit(ws / "site-1")), "site-1")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[ssl.SSLSocket] = []
        acceptor = threading.Thread(
            target=lambda: accepted.append(server_context.wrap_socket(listener.accept()[0], server_side=True))
        )
        acceptor.start()
        site = site_context.wrap_socket(socket.create_connection(listener.getsockname()), server_hostname="127.0.0.1")
        acceptor.join(10)
    try:
        yield site, accepted[0]
    finally:
        site.close()
        accepted[0].close()


def test_frames_cross_mutual_tls_whole_and_a_peer_gone_mid_frame_is_named(tmp_path):
    payload = np.random.default_rng(6).integers(0, 256, (2 << 20) + 5, np.uint8).tobytes()
    with _tls_pair(tmp_path) as (site, server):
        server.settimeout(10)
        writer, reader = FrameWriter(site), FrameReader(server, piece_bytes=1 << 20)
        sender = threading.Thread(target=lambda: writer.data(payload))
        sender.start()
        got = b""
        while len(got) < len(payload):
            kind, data = reader.frame()
            assert kind == bulk_wire.DATA
            got += bytes(data)
        sender.join(10)
        assert got == payload  # every TLS record of it, read into the reader's buffer
        site.sendall(bytes([bulk_wire.DATA]) + (10).to_bytes(4, "little") + b"abc")
        site.shutdown(socket.SHUT_RDWR)  # the TCP connection ends with no TLS goodbye (read as an EOF error)
        with pytest.raises(BulkError, match="the peer closed the connection mid-frame"):
            reader.frame()

"""The admin and agent planes over real gRPC with mutual TLS on 127.0.0.1: fan-out, replies, refusals, runs."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import free_port, prepare_workspace, scrape, server_process, training_run_files
from signing import signed_header

from fedcommon.admin_defs import ok_reply
from fedcommon.admin_serde import message_from_wire, message_to_wire
from fedcommon.archive_signature import ArchiveSignature, ArchiveVerifier
from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.wire import admin_pb2 as apb
from fedcommon.wire import admin_pb2_grpc as admin_grpc
from fedcommon.wire import training_pb2 as tpb
from fedserver.run import Phase
from fedserver.server import FederationServer

Handler = Callable[[apb.AdminMessage], "tuple[str, dict | str] | None"]


def _ok(msg: apb.AdminMessage) -> tuple[str, dict]:
    return "_ok", {"topic": msg.topic}


class FakeAgent:
    """A site agent made of a raw SiteAgent stub: long-polls, records requests, answers with `handler`."""

    def __init__(self, ws: Path, site: str, target: str, handler: Handler = _ok):
        self.site = site
        self.channel = grpc.secure_channel(target, channel_credentials(load_kit(ws / site)))
        self.stub = admin_grpc.SiteAgentStub(self.channel)
        self.handler = handler
        self.received: list[apb.AdminMessage] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self.stub.Retrieve(apb.RetrieveRequest(wait_seconds=0.5), timeout=5)
            except grpc.RpcError:
                time.sleep(0.1)
                continue
            for msg in reply.requests:
                self.received.append(msg)
                answer = self.handler(msg)
                if answer is None:
                    continue  # this site never answers
                code, body = answer
                text = body if isinstance(body, str) else json.dumps(body)
                self.stub.SendReply(
                    apb.AdminMessage(
                        topic="reply", body=text.encode(), headers={"_refMsgId": msg.id, "_rtnCode": code}
                    ),
                    timeout=5,
                )

    def topics(self) -> list[str]:
        return [m.topic for m in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.channel.close()


@pytest.fixture
def federation(tmp_path):
    """A running in-process server (no run yet), its POC workspace and an MMAR with a ready initial model."""
    ws, mmar = training_run_files(
        tmp_path, {"w": np.zeros((2, 3), np.float32)}, clients=3, min_num_clients=2, num_rounds=2, heart_beat_timeout=30
    )
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, admin_port=0)
    server.start()
    agents: list[FakeAgent] = []
    yield Federation(server, ws, mmar, agents)
    for agent in agents:
        agent.close()
    server.stop(0)


class Federation:
    """The server under test and ways to reach it as an operator or as a site."""

    def __init__(self, server: FederationServer, ws: Path, mmar: Path, agents: list[FakeAgent]):
        self.server, self.ws, self.mmar, self.agents = server, ws, mmar, agents
        self.fl_target = f"127.0.0.1:{server.fl_port}"
        self.admin_target = f"127.0.0.1:{server.admin_port}"
        self._admin = admin_grpc.AdminServiceStub(
            grpc.secure_channel(self.admin_target, channel_credentials(load_kit(ws / "admin")))
        )

    def agent(self, site: str, handler: Handler = _ok) -> FakeAgent:
        """Start a fake agent for `site` and wait until the server counts it as connected."""
        agent = FakeAgent(self.ws, site, self.fl_target, handler)
        self.agents.append(agent)
        deadline = time.monotonic() + 5
        while site not in self.server.mailbox.connected_sites():
            assert time.monotonic() < deadline, f"{site} never connected"
            time.sleep(0.02)
        return agent

    def execute(
        self, command: str, targets: list[str] | None = None, args: dict | None = None, timeout: float = 0
    ) -> apb.CommandReply:
        return self._admin.Execute(
            apb.CommandRequest(
                command=command, targets=targets or [], args_json=json.dumps(args or {}), timeout=timeout
            ),
            timeout=30,
        )

    def server_reply(self, command: str, args: dict | None = None) -> apb.TargetReply:
        reply = self.execute(command, ["server"], args)
        assert [r.target for r in reply.replies] == ["server"], reply
        return reply.replies[0]

    def upload(self, data: bytes, sha256: str | None = None, name: str = "mmar.zip") -> apb.UploadReply:
        """Upload `data` as the POC admin, signed by its kit as the console does (sha256: a header claiming another)."""
        header = signed_header(self.ws / "admin", data, name, sha256)
        chunks = [apb.BlobChunk(header=header)]
        chunks += [apb.BlobChunk(data=data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
        return self._admin.Upload(iter(chunks), timeout=30)


def _data(reply: apb.TargetReply) -> dict:
    assert reply.ok, reply.error
    return json.loads(reply.data_json)


def _zip_folder(folder: Path, top: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{top}{path.relative_to(folder).as_posix()}")
    return buf.getvalue()


def _start_training(fed: Federation) -> None:
    assert fed.server_reply("set-run", {"run_number": 1}).ok
    fed.server.deploy(fed.mmar)
    assert fed.server_reply("start").ok
    assert fed.server.run is not None and fed.server.run.phase is Phase.TRAINING


# ---- fan-out and replies ------------------------------------------------------------------------


def test_status_fans_out_to_client_all_and_named_sites_with_one_reply_per_target(federation):
    site1, site2 = federation.agent("site-1"), federation.agent("site-2")

    reply = federation.execute("status", ["client"])
    assert reply.ok, reply
    assert [r.target for r in reply.replies] == ["site-1", "site-2"]
    assert all(_data(r) == {"topic": "check_status"} for r in reply.replies)

    reply = federation.execute("status", ["all"])
    assert [r.target for r in reply.replies] == ["server", "site-1", "site-2"]
    server = _data(reply.replies[0])
    assert server["run_number"] is None and server["run_status"] == "none"
    assert server["connected_sites"] == ["site-1", "site-2"]
    assert server["registered_sites"] == []

    reply = federation.execute("status", ["site-2"])
    assert [r.target for r in reply.replies] == ["site-2"]
    assert site1.topics() == ["check_status", "check_status"]
    assert site2.topics() == ["check_status", "check_status", "check_status"]


def test_status_defaults_to_all(federation):
    federation.agent("site-1")
    reply = federation.execute("status")
    assert [r.target for r in reply.replies] == ["server", "site-1"]


def test_a_connected_site_that_never_replies_is_reported_after_the_timeout(federation):
    federation.agent("site-1")
    silent = federation.agent("site-3", handler=lambda msg: None)
    reply = federation.execute("status", ["site-1", "site-3"], timeout=0.5)
    assert not reply.ok
    by_target = {r.target: r for r in reply.replies}
    assert by_target["site-1"].ok
    assert not by_target["site-3"].ok
    assert by_target["site-3"].error == "no reply within 0.5s"
    assert silent.topics() == ["check_status"]


def test_the_servers_timeout_setting_applies_when_the_command_names_none(federation):
    federation.agent("site-3", handler=lambda msg: None)
    assert _data(federation.server_reply("set-timeout", {"seconds": 0.3})) == {"timeout": 0.3}
    started = time.monotonic()
    reply = federation.execute("status", ["site-3"])
    assert reply.replies[0].error == "no reply within 0.3s"
    assert time.monotonic() - started < 5


def test_an_unknown_target_is_reported_as_unknown_with_the_known_sites(federation):
    """Issue 19 item 7: `status site-9` for an unknown site said "not connected"; it says it is unknown and
    lists the known ones."""
    federation.agent("site-1")
    reply = federation.execute("status", ["site-1", "site-9"])
    assert not reply.ok
    assert [(r.target, r.ok, r.error) for r in reply.replies] == [
        ("site-1", True, ""),
        (
            "site-9",
            False,
            "site-9 is not connected: no site of that name has connected to this server (known sites: site-1)",
        ),
    ]


def test_an_unknown_command_is_refused_whole(federation):
    reply = federation.execute("frobnicate", ["server"])
    assert not reply.ok
    assert reply.error == "unknown command 'frobnicate'"
    assert list(reply.replies) == []


def test_a_sites_error_reply_reaches_the_operator(federation):
    federation.agent("site-1", handler=lambda msg: ("_error", "start refused: run 3 is not deployed"))
    reply = federation.execute("status", ["site-1"])
    assert not reply.ok
    assert reply.replies[0].error == "start refused: run 3 is not deployed"


def test_a_site_cannot_answer_a_request_sent_to_another_site(federation):
    federation.agent("site-1", handler=lambda msg: None)
    impostor = admin_grpc.SiteAgentStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "site-2")))
    )
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(reply=federation.execute("status", ["site-1"], timeout=1)))
    runner.start()
    deadline = time.monotonic() + 5
    while not federation.agents[0].received:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    request = federation.agents[0].received[0]
    ack = impostor.SendReply(
        apb.AdminMessage(topic="reply", body=b"{}", headers={"_refMsgId": request.id, "_rtnCode": "_ok"}), timeout=5
    )
    runner.join(10)
    assert not ack.ok and "was sent to site-1, not to site-2" in ack.message
    assert outcome["reply"].replies[0].error == "no reply within 1s"


def test_progress_and_training_ended_reports_show_in_server_status(federation):
    stub = admin_grpc.SiteAgentStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "site-1")))
    )
    progress = {"run_number": 1, "round": 2, "epoch": 1, "loss": 0.25, "metrics": {"accuracy": 0.9}}
    assert stub.SendResult(apb.AdminMessage(topic="progress", body=json.dumps(progress).encode()), timeout=5).ok
    refused = stub.SendResult(apb.AdminMessage(topic="gossip", body=b"{}"), timeout=5)
    assert not refused.ok and "unknown result topic 'gossip'" in refused.message
    server = _data(federation.server_reply("status"))
    assert server["site_progress"] == {"site-1": progress}
    assert server["training_ended"] == {}


def test_status_names_the_failed_sites_of_the_run_says_when_every_one_failed_and_what_it_needs(federation):
    """Issue 19 items 4 and 5: the server's status carries the run's min_num_clients and the sites whose training
    of it ended in an exception; a training run that every site left that way is `stalled` (nothing advances it)."""
    _start_training(federation)
    server = _data(federation.server_reply("status"))
    assert (server["min_num_clients"], server["failed_sites"], server["stalled"]) == (2, {}, False)
    stub = admin_grpc.SiteAgentStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "site-1")))
    )
    earlier = {"run_number": 7, "status": "training exception", "exit_code": 1, "error": "an older run's failure"}
    assert stub.SendResult(apb.AdminMessage(topic="training_ended", body=json.dumps(earlier).encode()), timeout=5).ok
    server = _data(federation.server_reply("status"))
    assert (server["failed_sites"], server["stalled"]) == ({}, False)
    for site in ("site-1", "site-2"):
        stub = admin_grpc.SiteAgentStub(
            grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / site)))
        )
        ended = {"run_number": 1, "status": "training exception", "exit_code": 1, "error": f"{site}: out of memory"}
        assert stub.SendResult(apb.AdminMessage(topic="training_ended", body=json.dumps(ended).encode()), timeout=5).ok
    server = _data(federation.server_reply("status"))
    assert server["run_status"] == "training" and server["stalled"] is True
    assert server["failed_sites"] == {"site-1": "site-1: out of memory", "site-2": "site-2: out of memory"}


# ---- who may call what --------------------------------------------------------------------------


def test_a_site_certificate_is_refused_by_the_admin_service(federation):
    stub = admin_grpc.AdminServiceStub(
        grpc.secure_channel(federation.admin_target, channel_credentials(load_kit(federation.ws / "site-1")))
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Execute(apb.CommandRequest(command="status", targets=["server"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == (
        "'site-1' (site of test) may not use the admin_port: it serves admin certificates only"
    )


def test_an_admin_certificate_is_refused_by_the_site_agent_service(federation):
    stub = admin_grpc.SiteAgentStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "admin")))
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Retrieve(apb.RetrieveRequest(wait_seconds=0), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "(project_admin of test) may not use the fl_port: it serves site certificates" in err.value.details()
    assert federation.server.mailbox.connected_sites() == []


def test_the_admin_service_is_only_on_the_admin_port(federation):
    stub = admin_grpc.AdminServiceStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "admin")))
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Execute(apb.CommandRequest(command="status", targets=["server"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- the long-poll ------------------------------------------------------------------------------


def test_retrieve_returns_as_soon_as_a_request_is_queued(federation):
    stub = admin_grpc.SiteAgentStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "site-1")))
    )
    stub.Retrieve(apb.RetrieveRequest(wait_seconds=0), timeout=5)  # now connected
    polled: dict = {}

    def poll() -> None:
        started = time.monotonic()
        polled["reply"] = stub.Retrieve(apb.RetrieveRequest(wait_seconds=15), timeout=30)
        polled["held"] = time.monotonic() - started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.3)
    federation.execute("status", ["site-1"], timeout=0.5)
    poller.join(20)
    assert [m.topic for m in polled["reply"].requests] == ["check_status"]
    assert polled["held"] < 5, "Retrieve should return when the request is queued, not after its 15 s wait"


def test_a_reply_carried_by_the_next_retrieve_answers_the_command(federation):
    stub = admin_grpc.SiteAgentStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "site-1")))
    )
    stub.Retrieve(apb.RetrieveRequest(wait_seconds=0), timeout=5)  # now connected
    answered: dict = {}

    def agent() -> None:
        request = stub.Retrieve(apb.RetrieveRequest(wait_seconds=15), timeout=30).requests[0]
        reply = ok_reply(json.dumps({"status": "carried"}), message_from_wire(request)).set_ref_id(request.id)
        answered["next"] = stub.Retrieve(
            apb.RetrieveRequest(wait_seconds=0, replies=[message_to_wire(reply)]), timeout=5
        )

    thread = threading.Thread(target=agent)
    thread.start()
    time.sleep(0.3)
    outcome = federation.execute("status", ["site-1"], timeout=5)
    thread.join(10)
    assert "next" in answered
    assert outcome.replies[0].ok and json.loads(outcome.replies[0].data_json)["status"] == "carried"


def test_a_site_that_went_away_is_reported_with_how_long_ago_it_was_last_heard(federation):
    hub = federation.server.mailbox
    hub.retrieve("site-3", 0)
    hub._agents["site-3"].last_poll -= 100  # as if its last long-poll ended 100 s ago
    reply = federation.execute("status", ["site-3"], timeout=1)
    assert not reply.replies[0].ok
    assert reply.replies[0].error == (
        "site-3 is not connected: its last long-poll ended 100s ago (the site is reconnecting, or stopped)"
    )


def test_the_hub_names_the_sites_whose_long_poll_came_with_a_revoked_certificate(federation):
    hub = federation.server.mailbox
    hub.retrieve("site-1", 0, serial=11)
    hub.retrieve("site-2", 0, serial=12)
    assert hub.revoked_sites(frozenset({12, 99})) == ["site-2"]
    assert hub.revoked_sites(frozenset()) == []


# ---- uploads and blobs --------------------------------------------------------------------------


def _stored_zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("payload.bin", payload)
    return buf.getvalue()


def test_an_upload_is_stored_under_its_sha256_and_a_site_it_was_deployed_to_can_fetch_it(federation):
    data = _stored_zip(bytes(range(256)) * 9000)  # a little over 2 MiB: several chunks
    reply = federation.upload(data)
    digest = hashlib.sha256(data).hexdigest()
    assert (reply.blob_id, reply.size, reply.sha256) == (digest, len(data), digest)
    uploads = federation.ws / "server" / "uploads"
    assert sorted(p.name for p in uploads.iterdir()) == [f"{digest}.sig", f"{digest}.zip"]  # its signature beside it
    federation.server.blobs.grant(digest, ["site-1"])  # what a deploy to site-1 does

    site = admin_grpc.SiteAgentStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "site-1")))
    )
    chunks = list(site.FetchBlob(apb.BlobRequest(blob_id=digest), timeout=10))
    assert chunks[0].header.size == len(data) and chunks[0].header.sha256 == digest
    assert b"".join(c.data for c in chunks[1:]) == data
    assert max(len(c.data) for c in chunks[1:]) == 1 << 20
    with pytest.raises(grpc.RpcError) as err:
        list(site.FetchBlob(apb.BlobRequest(blob_id="0" * 64), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_upload_with_a_wrong_sha256_is_invalid_and_leaves_nothing(federation):
    with pytest.raises(grpc.RpcError) as err:
        federation.upload(b"PK\x03\x04 the real content", sha256=hashlib.sha256(b"something else").hexdigest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in err.value.details() and "differs" in err.value.details()
    assert list((federation.ws / "server" / "uploads").iterdir()) == []


def test_an_upload_over_the_cap_is_refused_before_it_is_sent(federation):
    big = apb.BlobHeader(name="huge.zip", size=3 << 30, sha256="0" * 64)
    with pytest.raises(grpc.RpcError) as err:
        federation._admin.Upload(iter([apb.BlobChunk(header=big)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- runs: set-run, deploy, start, abort, delete-run --------------------------------------------


def test_deploy_before_set_run_is_refused_at_every_target(federation):
    site = federation.agent("site-1")
    blob = federation.upload(_zip_folder(federation.mmar)).blob_id
    reply = federation.execute("deploy", ["all"], {"blob_id": blob})
    assert not reply.ok
    assert [(r.target, r.error) for r in reply.replies] == [
        ("server", "no run number set: run `fedadmin set-run N` first"),
        ("site-1", "no run number set: run `fedadmin set-run N` first"),
    ]
    assert site.topics() == []


def test_deploy_of_a_blob_that_was_never_uploaded_is_refused(federation):
    reply = federation.execute("deploy", ["server"], {"blob_id": "a" * 64})
    assert not reply.ok and "is not uploaded" in reply.error


def test_deploy_puts_the_mmar_in_place_on_the_server_and_sends_the_blob_to_sites(federation):
    site = federation.agent("site-1")
    data = _zip_folder(federation.mmar, top="digits/")
    blob = federation.upload(data).blob_id
    assert federation.server_reply("set-run", {"run_number": 3}).ok
    reply = federation.execute("deploy", ["all"], {"blob_id": blob})
    assert reply.ok, reply
    assert _data(reply.replies[0]) == {"run_number": 3, "path": str(federation.ws / "server" / "run_3" / "mmar")}
    assert (federation.ws / "server" / "run_3" / "mmar" / "config" / "config_fed_server.json").is_file()
    headers = dict(site.received[0].headers)
    # The site is sent the uploader's signature and certificate, and checks them itself.
    signature = ArchiveSignature.from_text(headers.pop("signature"), headers.pop("signer_certificate"))
    assert signature.signer_certificate == load_kit(federation.ws / "admin").cert_pem
    verifier = ArchiveVerifier(load_kit(federation.ws / "site-1").ca_pem)
    assert verifier.verify_digest(signature, blob, len(data)).name == "admin"
    assert headers == {
        "run_number": "3",
        "blob_id": blob,
        "sha256": blob,
        "size": str(len(data)),
        "admin": "admin",
        "admin_role": "project_admin",
        "admin_org": "test",
        "command": "deploy",
    }
    assert _data(federation.server_reply("status"))["run_status"] == "deployed"


def test_deploy_of_a_hostile_zip_is_refused_and_writes_nothing(federation):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config/config_fed_server.json", "{}")
        zf.writestr("../../escaped.txt", "pwned")
    blob = federation.upload(buf.getvalue()).blob_id
    assert federation.server_reply("set-run", {"run_number": 1}).ok
    reply = federation.server_reply("deploy", {"blob_id": blob})
    assert not reply.ok
    assert reply.error.startswith("deploy refused:")
    assert not (federation.ws / "server" / "run_1" / "mmar").exists()
    assert not any(p.name == "escaped.txt" for p in federation.ws.parent.rglob("escaped.txt"))


def test_deploy_of_an_invalid_mmar_names_the_problem(federation):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config/config_train.json", "{}")
    blob = federation.upload(buf.getvalue()).blob_id
    assert federation.server_reply("set-run", {"run_number": 1}).ok
    reply = federation.server_reply("deploy", {"blob_id": blob})
    assert not reply.ok and "config/config_fed_server.json" in reply.error


def test_server_start_is_refused_before_deploy_and_when_already_training(federation):
    assert federation.server_reply("start").error == "no run number set: run `fedadmin set-run N` first"
    assert federation.server_reply("set-run", {"run_number": 1}).ok
    assert federation.server_reply("start").error == "run 1 is not deployed"
    federation.server.deploy(federation.mmar)
    assert _data(federation.server_reply("status"))["run_status"] == "deployed"
    assert _data(federation.server_reply("start")) == {"run_number": 1}
    status = _data(federation.server_reply("status"))
    assert (status["run_status"], status["current_round"], status["num_rounds"]) == ("training", 0, 2)
    assert federation.server_reply("start").error == "run 1 is already training"


def test_start_mgpu_starts_the_servers_run_and_refuses_a_bad_gpu_count(federation):
    for bad in (0, 65, "2", True):
        reply = federation.execute("start-mgpu", ["server"], args={"gpu_number": bad})
        assert not reply.ok and reply.error == f"gpu_number must be a whole number from 1 to 64, got {bad!r}"
    assert federation.server_reply("set-run", {"run_number": 1}).ok
    federation.server.deploy(federation.mmar)
    reply = federation.execute("start-mgpu", ["server"], args={"gpu_number": 2})
    assert reply.ok and _data(reply.replies[0]) == {"run_number": 1}


def test_set_run_is_refused_while_training_and_persisted_otherwise(federation):
    _start_training(federation)
    reply = federation.server_reply("set-run", {"run_number": 2})
    assert not reply.ok and reply.error.startswith("run 1 is training")
    assert _data(federation.server_reply("abort"))["run_number"] == 1
    assert _data(federation.server_reply("set-run", {"run_number": 2})) == {"run_number": 2}
    state = json.loads((federation.ws / "server" / "state.json").read_text())
    assert state["run_number"] == 2
    again = FederationServer(federation.ws / "server", load_kit(federation.ws / "server"))
    assert again.run_number == 2
    assert again.run_status(1) == "aborted"


def test_set_run_refuses_a_bad_run_number(federation):
    reply = federation.execute("set-run", args={"run_number": 0})
    assert not reply.ok and reply.error == "run_number must be a whole number >= 1, got 0"


def test_delete_run_of_the_active_run_is_refused(federation):
    _start_training(federation)
    reply = federation.server_reply("delete-run", {"run_number": 1})
    assert reply.error == "run 1 is active; abort it first"
    assert (federation.ws / "server" / "run_1").is_dir()
    assert federation.server_reply("abort").ok
    assert _data(federation.server_reply("delete-run", {"run_number": 1})) == {
        "deleted": str(federation.ws / "server" / "run_1")
    }
    assert not (federation.ws / "server" / "run_1").exists()
    assert federation.server.run is None


def test_abort_server_aborts_the_sites_first_then_the_run(federation):
    _start_training(federation)
    phase_when_site_aborted: list[Phase] = []

    def site_handler(msg):
        phase_when_site_aborted.append(federation.server.run.phase)
        return "_ok", {"status": "training stopped"}

    site = federation.agent("site-1", site_handler)
    reply = federation.execute("abort", ["server"])
    assert reply.ok, reply
    assert _data(reply.replies[0]) == {"run_number": 1, "aborted_sites": ["site-1"]}
    assert site.topics() == ["abort"]
    assert phase_when_site_aborted == [Phase.TRAINING]
    assert federation.server.run.phase is Phase.ABORTED
    assert _data(federation.server_reply("status"))["run_status"] == "aborted"


def test_validation_on_demand_is_refused_while_a_run_trains_and_never_reaches_the_site(federation):
    _start_training(federation)
    site = federation.agent("site-1", lambda msg: ("_ok", {}))
    reply = federation.execute("run-validation", ["site-1"], args={"run_number": 1})
    assert not reply.ok and reply.replies[0].error == "run 1 is training; validate --start waits until it ends"
    assert site.topics() == []


def test_abort_when_nothing_trains_is_refused(federation):
    assert federation.server_reply("abort").error == "no run is training"


# ---- shutdown, restart, remove-client -----------------------------------------------------------


def test_shutdown_server_is_refused_while_sites_are_registered(federation):
    stub = TrainingStub(
        grpc.secure_channel(federation.fl_target, channel_credentials(load_kit(federation.ws / "site-1")))
    )
    stub.Register(tpb.RegisterRequest(client_name="site-1"), timeout=10)
    reply = federation.server_reply("shutdown")
    assert reply.error == "1 site is registered (site-1); shut them down first"
    assert not federation.server.exit_requested.is_set()
    assert _data(federation.server_reply("remove-client", {"site": "site-1"})) == {"removed": "site-1"}
    assert _data(federation.server_reply("shutdown")) == {"shutting_down": True}
    assert federation.server.exit_requested.is_set() and not federation.server.restart_requested


def test_remove_client_of_an_unknown_site_is_refused(federation):
    assert federation.execute("remove-client", args={"site": "site-9"}).replies[0].error == "site-9 is not registered"


def test_restart_needs_a_target_and_asks_the_process_to_restart(federation):
    reply = federation.execute("restart")
    assert reply.error == "restart needs targets: server, client, all or site names"
    assert _data(federation.server_reply("restart")) == {"restarting": True}
    assert federation.server.exit_requested.is_set() and federation.server.restart_requested
    for _ in range(4):
        assert federation.server_reply("restart").ok
    looping = federation.server_reply("restart")
    assert not looping.ok and "restart refused: 5 restarts" in looping.error and "fedadmin logs" in looping.error


# ---- shell and sysinfo on the server ------------------------------------------------------------


def test_shell_on_the_server_runs_allowed_commands_and_refuses_keys_and_escapes(federation):
    listing = _data(federation.server_reply("shell", {"argv": ["ls", "startup"]}))
    assert "key.pem" in listing["stdout"] and listing["exit_code"] == 0 and not listing["truncated"]
    refused = federation.server_reply("shell", {"argv": ["cat", "startup/key.pem"]})
    assert not refused.ok and "is a key or certificate" in refused.error
    escape = federation.server_reply("shell", {"argv": ["cat", "../site-1/startup/fed.json"]})
    assert escape.error == "shell: path '../site-1/startup/fed.json' is outside the workspace"
    assert federation.server_reply("shell", {"argv": ["rm", "-rf", "."]}).error.startswith("shell: 'rm' is not allowed")


def test_shell_takes_exactly_one_target(federation):
    reply = federation.execute("shell", ["all"], {"argv": ["pwd"]})
    assert not reply.ok and reply.error.startswith("shell takes one target")


def test_shell_on_a_site_carries_the_argv_in_the_body(federation):
    site = federation.agent("site-1", lambda msg: ("_ok", {"stdout": "x\n", "truncated": False, "exit_code": 0}))
    reply = federation.execute("shell", ["site-1"], {"argv": ["ls", "-l"]})
    assert reply.ok
    assert json.loads(site.received[0].body) == {"argv": ["ls", "-l"]}


def test_sysinfo_of_the_server(federation):
    data = _data(federation.server_reply("sysinfo"))
    assert data["training_status"] == "none"
    assert {"hostname", "cpu_count", "memory_total", "gpus"} <= set(data)


# ---- audit --------------------------------------------------------------------------------------


def test_every_admin_command_is_audited(federation):
    federation.server_reply("set-run", {"run_number": 4})
    federation.execute("frobnicate", ["server"])
    with pytest.raises(grpc.RpcError):
        federation.upload(b"x", sha256="0" * 64)
    entries = [json.loads(line) for line in (federation.ws / "server" / "audit.log").read_text().splitlines()]
    # A command that changes something is on record before it acts (hardening item 2), then with its outcome.
    assert [(e["command"], e["ok"], e.get("phase")) for e in entries[:2]] == [
        ("set-run", None, "intent"),
        ("set-run", True, None),
    ]
    lines = [e for e in entries if e.get("phase") != "intent"]
    assert [(e["admin"], e["command"], e["targets"], e["ok"]) for e in lines] == [
        ("admin", "set-run", ["server"], True),
        ("admin", "frobnicate", ["server"], False),
        ("admin", "upload", [], False),
    ]
    assert lines[0]["args"] == {"run_number": 4}
    assert all("time" in e and e["role"] == "project_admin" and e["org"] == "test" for e in lines)


# ---- the process ------------------------------------------------------------------------------


def test_the_cli_serves_both_ports_and_restarts_and_shuts_down_on_command(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    port, admin_port, metrics_port = free_port(), free_port(), free_port()
    with server_process(
        ws / "server", "--port", str(port), "--admin-port", str(admin_port), "--metrics-port", str(metrics_port)
    ) as proc:
        ready = next(line for line in proc.output_lines if line.startswith("fedserver ready"))
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert ready.split() == [
            "fedserver",
            "ready",
            "on",
            f"127.0.0.1:{port}",
            "admin",
            f"127.0.0.1:{admin_port}",
            "metrics",
            metrics_url,
        ]
        admin = admin_grpc.AdminServiceStub(
            grpc.secure_channel(f"127.0.0.1:{admin_port}", channel_credentials(load_kit(ws / "admin")))
        )

        def execute(command: str, args: dict | None = None) -> apb.CommandReply:
            request = apb.CommandRequest(command=command, targets=["server"], args_json=json.dumps(args or {}))
            return admin.Execute(request, timeout=10, wait_for_ready=True)

        assert execute("set-run", {"run_number": 5}).ok
        assert not execute("set-run", {"run_number": 0}).ok
        samples = scrape(metrics_url)
        for name in (
            "fedlearn_registered_sites",
            "fedlearn_connected_sites",
            "fedlearn_training",
            "fedlearn_training_bytes_received_total",
            "fedlearn_training_bytes_sent_total",
            "fedlearn_contributions_accepted_total",
            "fedlearn_contributions_refused_total",
        ):
            assert name in samples, sorted(samples)
        assert samples["fedlearn_run_number"] == 5
        assert samples['fedlearn_admin_command_seconds_count{command="set-run"}'] == 2
        assert samples['fedlearn_admin_commands_failed_total{command="set-run"}'] == 1
        ready_lines = len(proc.output_lines)
        assert execute("restart").ok
        deadline = time.monotonic() + 60
        while sum(line.startswith("fedserver ready") for line in proc.output_lines[ready_lines:]) == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(proc.output_lines)
            time.sleep(0.1)
        assert json.loads(execute("status").replies[0].data_json)["run_number"] == 5
        assert scrape(metrics_url)["fedlearn_run_number"] == 5  # the restarted server serves metrics again
        assert execute("shutdown").ok
        assert proc.wait(30) == 0


def test_logs_and_metrics_refuse_what_they_cannot_serve(federation):
    for args, reason in (
        ({"file": "/etc/passwd"}, "logs takes no 'file'"),
        ({"lines": -5}, "lines must be"),
        ({"cursor": {"path": "startup/key.pem"}}, "cursor must be"),
    ):
        refused = federation.execute("logs", ["server"], args)
        assert not refused.ok and reason in refused.error and not refused.replies
    assert "not one per run" in federation.server_reply("logs", {"run_number": 1}).error
    assert "no run number set" in federation.server_reply("metrics").error
    assert "run 3 has no metrics" in federation.server_reply("metrics", {"run_number": 3}).error
    two = federation.execute("logs", ["server", "site-1"])
    assert not two.ok and "takes one target" in two.error
    own = federation.server_reply("logs", {"lines": 5, "level": "info"})
    assert own.ok and json.loads(own.data_json)["file"] == "log.txt"


def test_an_oversized_command_is_audited_in_bounded_size(federation):
    federation.execute("x" * 100_000, ["server"], {"blob": "y" * 1_000_000})
    federation.execute("set-run", ["server"], {"run_number": 2, "pad": "z" * 1_000_000})
    audit = federation.ws / "server" / "audit.log"
    assert audit.stat().st_size < 40_000
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries[-1]["args"]["length"] > 1_000_000


def test_a_command_whose_caller_went_away_stops_waiting_for_its_sites(federation):
    """Hardening item 7: 20 `status` calls with timeout=3600 to a silent site held the server's threads for an hour
    even after the caller disconnected. A waiting command stops when its caller cancels."""
    federation.agent("site-3", handler=lambda msg: None)
    with pytest.raises(grpc.RpcError) as e:
        federation._admin.Execute(apb.CommandRequest(command="status", targets=["site-3"], timeout=3600), timeout=1)
    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    audit = federation.ws / "server" / "audit.log"
    deadline = time.monotonic() + 30
    while True:  # the command's outcome is written once it stops waiting: seconds after, not an hour
        entries = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
        if any(e["command"] == "status" and e["targets"] == ["site-3"] for e in entries):
            break
        assert time.monotonic() < deadline, "the command still waits for its silent site"
        time.sleep(0.1)


def test_a_roles_cap_bounds_how_long_a_command_may_wait_for_sites():
    """Hardening item 7: a server-side cap on command timeouts per role (a member's status to a silent site cannot
    hold a thread for an hour)."""
    from types import SimpleNamespace

    from fedserver.admin_hub import AdminHub
    from fedserver.authorization import DEFAULT_POLICY, Policy

    hub = AdminHub(SimpleNamespace(mailbox=None, admin_timeout=10.0), Policy(DEFAULT_POLICY), audit=None)
    assert hub._timeout(3600, "member") == 60 and hub._timeout(3600, "lead") == 600
    assert hub._timeout(3600, "project_admin") == 3600 and hub._timeout(0, "member") == 10
    assert hub._timeout(3600, "no-such-role") == 60


def test_a_run_the_server_ended_starts_at_no_site(federation):
    """Issue 19 item 2: after `abort all`, `start all` was refused by the server ("run 1 has already run
    (aborted)") but both sites started workers for run 1 anyway. The server's rule holds for every target."""
    site1 = federation.agent("site-1")
    _start_training(federation)
    assert federation.execute("abort", ["server"]).replies[0].ok
    for targets in (["all"], ["site-1"]):
        reply = federation.execute("start", targets)
        assert not reply.ok and reply.replies
        assert all("run 1 has already run (aborted); delete-run 1" in r.error for r in reply.replies), reply
    mgpu = federation.execute("start-mgpu", ["site-1"], {"gpu_number": 2})
    assert not mgpu.ok and "has already run (aborted)" in mgpu.replies[0].error
    assert "start" not in site1.topics() and "start_mgpu" not in site1.topics()

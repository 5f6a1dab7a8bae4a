"""The site agent: requests in, replies out; refusals per docs/admin-protocol.md; it never dies of a request."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from conftest import DIGITS, ROOT, copy_mmar, prepare_workspace, python_env, server_process
from signing import deploy_headers, signed_header

from fedclient.admin import (
    AdminMessageSender,
    BlobFetchError,
    FedAdminAgent,
    RequestProcessor,
    Sender,
    retry_pause,
)
from fedclient.admin_commands import seed_processors, site_processors
from fedclient.admin_interface import ClientAdminInterface
from fedclient.client_executor import ClientExecutor
from fedclient.client_status import ClientStatus
from fedclient.local_policy import LocalPolicy
from fedclient.site_resources import available_gpus
from fedcommon.admin_defs import Message, ok_reply
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.run_folder import RunFolder
from fedcommon.safe_zip import zip_folder
from fedcommon.wire import admin_pb2 as apb
from fedcommon.wire import admin_pb2_grpc as admin_grpc


class FakeSender(Sender):
    """An in-memory agent plane: requests are put in, replies and results collected, blobs served from a dict."""

    def __init__(self):
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.replies: dict[str, Message] = {}
        self.results: list[Message] = []
        self.carried: list[str] = []  # ids of the requests whose replies came with a long-poll
        self.blobs: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._closed = threading.Event()

    def retrieve_requests(self) -> list[Message]:
        try:  # a long-poll of at most 1 s
            first = self.inbox.get(timeout=1.0)
        except queue.Empty:
            return []
        if first is None:
            return []
        out = [first]
        while not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return [m for m in out if m is not None]

    def send_reply(self, reply: Message) -> None:
        with self._cond:
            self.replies[reply.get_ref_id()] = reply
            self._cond.notify_all()

    def retrieve_requests_with_replies(self, replies: list[Message]) -> list[Message]:
        with self._cond:
            self.carried += [r.get_ref_id() for r in replies]
        for reply in replies:
            self.send_reply(reply)
        return self.retrieve_requests()

    def send_result(self, message: Message) -> None:
        with self._cond:
            self.results.append(message)
            self._cond.notify_all()

    def close(self) -> None:
        self._closed.set()
        self.inbox.put(None)

    def fetch_blob(self, blob_id: str, dest_path: Path, expected_sha256: str, expected_size: int) -> Path:
        if blob_id not in self.blobs:
            raise BlobFetchError(f"fetching blob {blob_id} failed: NOT_FOUND")
        Path(dest_path).write_bytes(self.blobs[blob_id])
        return Path(dest_path)

    def send(self, topic: str, headers: dict | None = None, body: str = "") -> Message:
        msg = Message(topic, body.encode()).set_headers(headers or {})
        self.inbox.put(msg)
        return msg

    def reply_to(self, msg: Message, timeout: float = 10.0) -> Message:
        with self._cond:
            assert self._cond.wait_for(lambda: msg.id in self.replies, timeout), f"no reply to {msg.topic}"
            return self.replies[msg.id]

    def ask(self, topic: str, headers: dict | None = None, body: str = "") -> tuple[bool, dict | str]:
        """Send a request and wait for its reply: (ok, data) or (False, error text)."""
        reply = self.reply_to(self.send(topic, headers, body))
        text = reply.body.decode() if isinstance(reply.body, bytes) else reply.body
        if reply.get_header("_rtnCode") == "_ok":
            return True, json.loads(text)
        assert reply.get_header("_rtnCode") == "_error"
        return False, text

    def wait_results(self, predicate, timeout: float = 10.0) -> list[Message]:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.results), timeout), self.results
            return list(self.results)


class FakeExecutor(ClientExecutor):
    """Training that starts and stops at once, without processes."""

    def start_train(self, client, args, mmar_root) -> int:
        with self._lock:
            self._reset(args.run_number)
            self.status = ClientStatus.TRAINING_STARTED
        self.mmar_root = mmar_root
        self.env = dict(args.env)
        return 4242

    def start_mgpu_train(self, client, args, mmar_root, gpu_number) -> int:
        pid = self.start_train(client, args, mmar_root)
        self.ranks = gpu_number
        return pid

    def report(self, **event) -> None:
        self._handle(event)

    def abort_train(self, client) -> None:
        if self.is_training():
            self.finish(0)

    def finish(self, exit_code: int) -> None:
        self.status = ClientStatus.TRAINING_STOPPED if exit_code == 0 else ClientStatus.TRAINING_EXCEPTION
        self._emit(
            {"kind": "exit", "run_number": self.run_number, "status": self.status, "exit_code": exit_code, "error": ""}
        )

    def wait_training_process_finish(self, client, timeout=None) -> bool:
        return True


class SlowProcessor(RequestProcessor):
    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()

    def get_topics(self) -> list[str]:
        return ["slow"]

    def process(self, req: Message, app_ctx) -> Message:
        self.entered.set()
        self.release.wait(20)
        return ok_reply("{}", req)


class RaisingProcessor(RequestProcessor):
    def get_topics(self) -> list[str]:
        return ["explode"]

    def process(self, req: Message, app_ctx) -> Message:
        raise RuntimeError("the processor blew up")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """(sender, interface, agent, executor) for site-1 of a POC workspace in tmp_path/ws (its kit: the project CA it
    verifies deployed archives against), with the seed processors.

    The site sees no GPU unless a test says otherwise (the host's would change what a run is given).
    """
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    workspace = prepare_workspace(tmp_path / "ws", clients=1) / "site-1"
    sender = FakeSender()
    interface = ClientAdminInterface(None, "site-1", sender, argparse.Namespace(workspace=workspace, debug=False), 0)
    executor = FakeExecutor(on_event=interface._on_training_event)
    interface.client_executor = executor
    agent = FedAdminAgent("site-1", sender, interface, req_poll_interval=0.05, audit_log=workspace / "audit.log")
    interface.set_agent(agent)
    for processor in site_processors():
        agent.register_processor(processor)
    yield sender, interface, agent, executor
    agent.shutdown()
    interface.close()


def _admin_kit(tmp_path: Path) -> Path:
    """The POC admin's kit beside the `site` fixture's site: it signs what the tests deploy."""
    return tmp_path / "ws" / "admin"


def _deploy(sender: FakeSender, mmar: Path, run_number: int | None, tmp_path: Path) -> tuple[bool, dict | str]:
    archive = zip_folder(mmar, tmp_path / f"upload-{time.monotonic_ns()}.zip")
    data = archive.read_bytes()
    blob_id = hashlib.sha256(data).hexdigest()
    sender.blobs[blob_id] = data
    headers = {"blob_id": blob_id, "sha256": blob_id, "size": len(data), **deploy_headers(_admin_kit(tmp_path), data)}
    if run_number is not None:
        headers["run_number"] = run_number
    return sender.ask("deploy", headers)


# ---- the agent --------------------------------------------------------------------------------------------


def test_unknown_topic_gets_an_error_reply_and_the_agent_keeps_running(site):
    sender, interface, agent, _ = site
    agent.start()
    ok, error = sender.ask("make_coffee")
    assert not ok and error == "site-1: unknown topic 'make_coffee'"
    ok, data = sender.ask("check_status")
    assert ok and data["status"] == "training not started"
    assert agent.is_running()


def test_a_raising_processor_gets_an_error_reply_and_the_agent_keeps_running(site):
    sender, interface, agent, _ = site
    agent.register_processor(RaisingProcessor())
    agent.start()
    ok, error = sender.ask("explode")
    assert not ok
    assert error == "site-1: explode failed: RuntimeError: the processor blew up"
    assert sender.ask("check_status")[0]


def test_a_topic_cannot_have_two_processors(site):
    _, _, agent, _ = site
    with pytest.raises(ValueError, match="'check_status' already has the processor ClientStatusProcessor"):
        agent.register_processor(seed_processors()[0])


def test_a_slow_request_does_not_block_a_status_request(site):
    sender, interface, agent, _ = site
    slow = SlowProcessor()
    agent.register_processor(slow)
    agent.start()
    slow_request = sender.send("slow")
    assert slow.entered.wait(5)
    started = time.monotonic()
    ok, data = sender.ask("check_status")
    assert ok and time.monotonic() - started < 2
    assert slow_request.id not in sender.replies
    slow.release.set()
    assert sender.reply_to(slow_request).get_header("_rtnCode") == "_ok"


def test_replies_ready_in_time_go_with_the_next_long_poll_and_a_slow_one_on_its_own(site):
    sender, interface, agent, _ = site
    slow = SlowProcessor()
    agent.register_processor(slow)
    agent.start()
    slow_request = sender.send("slow")
    assert slow.entered.wait(5)
    status = sender.send("check_status")
    assert sender.reply_to(status).get_header("_rtnCode") == "_ok"
    slow.release.set()
    assert sender.reply_to(slow_request).get_header("_rtnCode") == "_ok"
    assert status.id in sender.carried
    assert slow_request.id not in sender.carried


class UnreachableSender(FakeSender):
    """A server that is away: every long-poll fails at once."""

    def __init__(self):
        super().__init__()
        self.calls: list[float] = []

    def retrieve_requests(self) -> list[Message]:
        self.calls.append(time.monotonic())
        return []


def long_poll_gaps(sender: UnreachableSender, req_poll_interval: float, seconds: float) -> list[float]:
    """Run an agent on `sender` for `seconds`; the seconds between its long-polls."""
    agent = FedAdminAgent("site-1", sender, None, req_poll_interval=req_poll_interval)
    agent.start()
    try:
        time.sleep(seconds)
    finally:
        agent.shutdown()
    return [b - a for a, b in zip(sender.calls, sender.calls[1:], strict=False)]


def test_an_agent_that_cannot_reach_the_server_backs_off_up_to_a_cap_and_keeps_trying(tmp_path):
    sender = UnreachableSender()
    gaps = long_poll_gaps(sender, 0.05, 4.0)
    # Constant 0.05 s retries would make ~80 calls; doubling pauses (with jitter) make about ten.
    assert 5 <= len(sender.calls) <= 20, sender.calls
    assert max(gaps) <= 2.0 + 0.5  # the documented cap (2 s), not whatever the code's constant says
    assert max(gaps[-3:]) > 4 * min(gaps[:3]), gaps


class StartingServerSender(UnreachableSender):
    """A server that starts listening at `up_at`: long-polls fail at once before; the connection is up after."""

    def __init__(self, up_at: float):
        super().__init__()
        self.up_at = up_at

    def wait_connected(self, timeout: float) -> bool:
        left = self.up_at - time.monotonic()
        if left > timeout:
            time.sleep(timeout)
            return False
        time.sleep(max(0.0, left))
        return True

    def retrieve_requests(self) -> list[Message]:
        if time.monotonic() < self.up_at:
            return super().retrieve_requests()
        self.calls.append(time.monotonic())
        time.sleep(0.5)  # a long-poll held by the server
        return []


def test_an_agent_long_polls_as_soon_as_the_server_it_waited_for_listens():
    sender = StartingServerSender(up_at=time.monotonic() + 1.0)
    # Pauses of 2.5..5 s between failed long-polls, were the agent to sleep them out.
    agent = FedAdminAgent("site-1", sender, None, req_poll_interval=5.0)
    agent.start()
    try:
        deadline = time.monotonic() + 10
        while not any(t >= sender.up_at for t in sender.calls) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        agent.shutdown()
    first_held = min(t for t in sender.calls if t >= sender.up_at)
    assert first_held - sender.up_at < 0.3, sender.calls


class RefusingSender(StartingServerSender):
    """Connected, yet every long-poll fails at once (the server refuses it)."""

    retrieve_requests = UnreachableSender.retrieve_requests


def test_an_agent_whose_connection_is_up_sleeps_out_its_pause_after_a_failed_long_poll():
    sender = RefusingSender(up_at=time.monotonic())
    gaps = long_poll_gaps(sender, 0.4, 1.5)
    assert 2 <= len(sender.calls) <= 6 and min(gaps) >= 0.2 * 0.9, sender.calls  # no busy loop on a live connection


def test_every_request_is_audited_as_one_json_line(site):
    sender, interface, agent, _ = site
    agent.start()
    sender.ask("check_status")
    sender.ask("start", {"run_number": 3})
    sender.ask("shell", body=json.dumps({"argv": ["ls"]}))
    lines = [json.loads(line) for line in (interface.workspace / "audit.log").read_text().splitlines()]
    assert [(e["topic"], e["ok"]) for e in lines] == [("check_status", True), ("start", False), ("shell", True)]
    assert lines[1]["error"] == "run 3 is not deployed" and lines[1]["run_number"] == "3"
    assert lines[2]["argv"] == ["ls"]
    assert all("time" in e for e in lines)


def test_the_audit_names_the_admin_role_org_and_command_the_server_stated(site):
    sender, interface, agent, _ = site
    agent.start()
    sender.ask("sys_info", {"admin": "bob", "admin_role": "lead", "admin_org": "org-b", "command": "sysinfo"})
    entry = json.loads((interface.workspace / "audit.log").read_text().splitlines()[-1])
    assert {k: entry[k] for k in ("admin", "role", "org", "command", "site", "topic", "ok")} == {
        "admin": "bob",
        "role": "lead",
        "org": "org-b",
        "command": "sysinfo",
        "site": "site-1",
        "topic": "sys_info",
        "ok": True,
    }


def test_the_sites_local_policy_refuses_before_the_processor_runs_and_is_audited(site):
    sender, interface, agent, _ = site
    (interface.workspace / "local").mkdir()
    (interface.workspace / "local" / "authorization.json").write_text(
        json.dumps({"rules": [{"name": "no-shell-from-b", "deny": ["shell"], "orgs": ["org-b"]}]})
    )
    agent.policy = LocalPolicy(interface.workspace)
    agent.start()
    from_b = {"admin": "bob", "admin_role": "lead", "admin_org": "org-b", "command": "shell"}
    ok, error = sender.ask("shell", from_b, body=json.dumps({"argv": ["pwd"]}))
    assert not ok and error == "site-1: refused by local/authorization.json rule 'no-shell-from-b'"
    ok, _ = sender.ask("shell", {**from_b, "admin": "alice", "admin_org": "org-a"}, body=json.dumps({"argv": ["pwd"]}))
    assert ok
    entries = [json.loads(line) for line in (interface.workspace / "audit.log").read_text().splitlines()]
    assert [(e["admin"], e["ok"]) for e in entries] == [("bob", False), ("alice", True)]
    assert "no-shell-from-b" in entries[0]["error"]


# ---- the processors' refusals, per the contract ------------------------------------------------------------


def test_start_before_deploy_is_refused(site):
    sender, _, agent, _ = site
    agent.start()
    assert sender.ask("start", {"run_number": 3}) == (False, "run 3 is not deployed")


def test_start_without_a_run_number_is_refused(site):
    sender, _, agent, _ = site
    agent.start()
    assert sender.ask("start") == (False, "no run number set: run `fedadmin set-run N` first")


def test_deploy_without_a_run_number_is_refused(site, tmp_path):
    sender, _, agent, _ = site
    agent.start()
    assert _deploy(sender, DIGITS, None, tmp_path) == (False, "no run number set: run `fedadmin set-run N` first")


def test_deploy_then_start_then_start_twice_is_refused(site, tmp_path):
    sender, interface, agent, executor = site
    agent.start()
    ok, data = _deploy(sender, DIGITS, 1, tmp_path)
    assert ok, data
    mmar = interface.workspace / "run_1" / "mmar"
    assert data == {"run_number": 1, "path": str(mmar)}
    assert (mmar / "custom" / "trainer.py").is_file()
    assert not list(interface.workspace.glob(".deploy-*")), "the downloaded zip is removed"
    assert sender.ask("start", {"run_number": 1}) == (True, {"run_number": 1, "pid": 4242})
    assert executor.mmar_root == mmar
    assert sender.ask("start", {"run_number": 1}) == (False, "run 1 is already training")
    assert _deploy(sender, DIGITS, 1, tmp_path) == (False, "run 1 is training; abort it before deploying again")
    ok, status = sender.ask("check_status")
    runs = status.pop("runs")
    assert status == {"status": "training started", "status_code": 2, "run_number": 1, "progress": {}}
    assert runs == [{**status, "cpu_slots": 1}]


def test_delete_of_the_active_run_is_refused_and_of_an_idle_one_done(site, tmp_path):
    sender, interface, agent, _ = site
    agent.start()
    assert _deploy(sender, DIGITS, 1, tmp_path)[0]
    assert sender.ask("start", {"run_number": 1})[0]
    assert sender.ask("delete_run_number", {"run_number": 1}) == (False, "run 1 is active; abort it first")
    assert sender.ask("abort") == (True, {"status": "training stopped"})
    run_dir = interface.workspace / "run_1"
    assert sender.ask("delete_run_number", {"run_number": 1}) == (True, {"deleted": str(run_dir)})
    assert not run_dir.exists()
    ok, error = sender.ask("delete_run_number", {"run_number": 1})
    assert not ok and error.startswith("run 1 does not exist")


def test_a_completed_run_is_not_started_or_deployed_again_until_deleted(site, tmp_path):
    sender, interface, agent, executor = site
    agent.start()
    assert _deploy(sender, DIGITS, 1, tmp_path)[0]
    assert sender.ask("start", {"run_number": 1})[0]
    executor.report(kind="end", round=2, metrics={"accuracy": 0.9})
    executor.finish(0)
    refusal = "run 1 has already run (completed); delete-run 1 or set another run number"
    assert sender.ask("start", {"run_number": 1}) == (False, refusal)
    assert _deploy(sender, DIGITS, 1, tmp_path) == (False, refusal)
    assert sender.ask("delete_run_number", {"run_number": 1})[0]
    assert _deploy(sender, DIGITS, 1, tmp_path)[0]
    assert sender.ask("start", {"run_number": 1})[0]


def test_an_aborted_or_crashed_run_can_be_started_again(site, tmp_path):
    sender, interface, agent, executor = site
    agent.start()
    assert _deploy(sender, DIGITS, 1, tmp_path)[0]
    assert sender.ask("start", {"run_number": 1})[0]
    assert sender.ask("abort")[0]
    assert sender.ask("start", {"run_number": 1})[0]
    executor.finish(1)
    ok, status = sender.ask("check_status")
    assert status["status_code"] == ClientStatus.TRAINING_EXCEPTION
    assert sender.ask("start", {"run_number": 1})[0]


def test_deploy_of_a_hostile_zip_is_refused_and_writes_nothing(site, tmp_path):
    sender, interface, agent, _ = site
    agent.start()
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config/config_train.json", "{}")
        zf.writestr("../../escape.txt", "pwned")
    data = archive.read_bytes()
    blob_id = hashlib.sha256(data).hexdigest()
    sender.blobs[blob_id] = data
    headers = {"run_number": 1, "blob_id": blob_id, "sha256": blob_id, "size": len(data)}
    ok, error = sender.ask("deploy", {**headers, **deploy_headers(_admin_kit(tmp_path), data)})
    assert not ok and error.startswith("deploy refused:") and "'../../escape.txt'" in error
    assert not (interface.workspace / "run_1" / "mmar").exists()
    assert not list(interface.workspace.rglob("escape.txt")) and not (tmp_path / "escape.txt").exists()


def test_deploy_of_an_invalid_mmar_names_the_file_and_key(site, tmp_path):
    sender, interface, agent, _ = site
    agent.start()
    bad = copy_mmar(tmp_path / "bad", server={"num_rounds": "three"})
    ok, error = _deploy(sender, bad, 1, tmp_path)
    assert not ok and "config_fed_server.json" in error and "num_rounds" in error
    assert not (interface.workspace / "run_1" / "mmar").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _audited_deploys(workspace: Path) -> list[dict]:
    lines = (workspace / "audit.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["topic"] == "deploy"]


def test_a_site_refuses_an_unsigned_deploy_before_it_fetches_anything_and_audits_it(site, tmp_path):
    """Signing (issue 22): a site extracts only what an admin of its project signed, whatever the server says; the
    refusal is unconditional and named, and nothing is fetched or written."""
    sender, interface, agent, _ = site
    agent.start()
    data = zip_folder(DIGITS, tmp_path / "digits.zip").read_bytes()
    blob_id = hashlib.sha256(data).hexdigest()  # not in the sender's blobs: a fetch would fail with NOT_FOUND
    ok, error = sender.ask("deploy", {"run_number": 1, "blob_id": blob_id, "sha256": blob_id, "size": len(data)})
    assert not ok and error.startswith("deploy refused: unsigned archive"), error
    (entry,) = _audited_deploys(interface.workspace)
    assert entry["ok"] is False and "deploy refused: unsigned archive" in entry["error"]
    assert not (interface.workspace / "run_1").exists()
    assert not list(interface.workspace.glob(".deploy-*"))


def test_a_site_refuses_a_tampered_archive_on_its_own_and_its_run_folder_stays_as_it_was(site, tmp_path):
    """Signing (issue 22): the site hashes the file it fetched itself: an archive other than the one the admin signed
    (a server that swapped it, say) is refused and audited, and the run deployed before is left as it was."""
    sender, interface, agent, _ = site
    agent.start()
    assert _deploy(sender, DIGITS, 1, tmp_path)[0]
    run = interface.workspace / "run_1"
    before = _snapshot(run)
    signed = zip_folder(copy_mmar(tmp_path / "signed", server={"num_rounds": 7}), tmp_path / "signed.zip")
    swapped = zip_folder(copy_mmar(tmp_path / "swapped", server={"num_rounds": 9}), tmp_path / "swapped.zip")
    data = swapped.read_bytes()
    blob_id = hashlib.sha256(data).hexdigest()
    sender.blobs[blob_id] = data
    headers = {"run_number": 1, "blob_id": blob_id, "sha256": blob_id, "size": len(data)}
    ok, error = sender.ask("deploy", {**headers, **deploy_headers(_admin_kit(tmp_path), signed.read_bytes())})
    assert not ok and error.startswith("deploy refused: signature does not match the archive"), error
    assert _snapshot(run) == before
    assert not list(interface.workspace.glob(".deploy-*")), "the fetched zip is removed"
    entry = _audited_deploys(interface.workspace)[-1]
    assert entry["ok"] is False and "signature does not match the archive" in entry["error"]


def test_a_site_refuses_a_signer_its_crl_revokes_a_sites_signature_and_another_projects(site, tmp_path):
    """Signing (issue 22): the site checks the signer against its own CA and, when it has one, its own CRL."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedcommon.archive_signature import sign_digest
    from fedcommon.pki import create_ca, issue_cert, write_crl

    sender, interface, agent, _ = site
    agent.start()
    data = zip_folder(DIGITS, tmp_path / "digits.zip").read_bytes()
    blob_id = hashlib.sha256(data).hexdigest()
    sender.blobs[blob_id] = data
    headers = {"run_number": 1, "blob_id": blob_id, "sha256": blob_id, "size": len(data)}
    site_kit = load_kit(interface.workspace)
    as_site = sign_digest(blob_id, len(data), site_kit.key_pem, site_kit.cert_pem).to_text()
    ok, error = sender.ask("deploy", {**headers, **as_site})
    assert not ok and error == "deploy refused: signer 'site-1' (site of test) is not an admin of this project " + (
        "(only an admin's certificate signs archives)"
    )
    other_ca, other_key = create_ca("test")
    cert, key = issue_cert(other_ca, other_key, "admin", "admin", admin_role="project_admin")
    pems = (
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM),
    )
    ok, error = sender.ask("deploy", {**headers, **sign_digest(blob_id, len(data), *pems).to_text()})
    assert not ok and "not issued by this project's CA" in error
    ws = tmp_path / "ws"
    ca_cert = x509.load_pem_x509_certificate((ws / "ca" / "rootCA.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ws / "ca" / "rootCA.key").read_bytes(), None)
    admin_serial = x509.load_pem_x509_certificate(load_kit(ws / "admin").cert_pem).serial_number
    write_crl(interface.workspace / "startup" / "crl.pem", ca_cert, ca_key, [admin_serial])
    ok, error = sender.ask("deploy", {**headers, **deploy_headers(_admin_kit(tmp_path), data)})
    assert not ok and error == "deploy refused: signer's certificate is revoked ('admin' (project_admin of test))"
    assert [e["ok"] for e in _audited_deploys(interface.workspace)] == [False, False, False]
    assert not (interface.workspace / "run_1").exists()


def test_shell_outside_the_whitelist_is_refused(site):
    sender, interface, agent, _ = site
    agent.start()
    ok, error = sender.ask("shell", body=json.dumps({"argv": ["rm", "-rf", "/"]}))
    assert not ok and "'rm' is not allowed" in error
    ok, error = sender.ask("shell", body=json.dumps({"argv": ["cat", "../../etc/passwd"]}))
    assert not ok and "outside the workspace" in error
    ok, error = sender.ask("shell", body="not json")
    assert not ok and "argv" in error


def test_shell_runs_in_the_sites_workspace(site):
    sender, interface, agent, _ = site
    (interface.workspace / "notes.txt").write_text("hello\n")
    agent.start()
    ok, data = sender.ask("shell", body=json.dumps({"argv": ["cat", "notes.txt"]}))
    assert ok and data == {"stdout": "hello\n", "truncated": False, "exit_code": 0}


def test_logs_reads_the_agents_log_or_a_runs_worker_log_and_never_a_path(site):
    sender, interface, agent, _ = site
    ws = interface.workspace
    (ws / "log.txt").write_text("".join(f"2026-11-29 10:00:0{i},000 INFO agent: line {i}\n" for i in range(5)))
    (ws / "run_2" / "logs").mkdir(parents=True)
    (ws / "run_2" / "logs" / "worker.log").write_text(
        "2026-11-29 10:00:00,000 INFO w: starting\n2026-11-29 10:00:01,000 ERROR w: training failed: boom\n"
        "Traceback (most recent call last):\nValueError: boom\n"
    )
    agent.start()
    ok, data = sender.ask("logs", body=json.dumps({"lines": 2}))
    assert ok and data["file"] == "log.txt" and [line[-6:] for line in data["lines"]] == ["line 3", "line 4"]
    ok, data = sender.ask("logs", body=json.dumps({"run_number": 2, "level": "error"}))
    assert ok and data["file"] == "run_2/logs/worker.log" and data["lines"][-1] == "ValueError: boom"
    assert len(data["lines"]) == 3
    for body, reason in (
        ({"path": "startup/key.pem"}, "logs takes no 'path'"),
        ({"run_number": 7}, "no run 7"),
        ({"run_number": "../startup"}, "run_number must be"),
        ([1], "JSON object"),
    ):
        ok, error = sender.ask("logs", body=json.dumps(body))
        assert not ok and reason in error, error


def test_start_mgpu_refuses_more_ranks_than_gpus_or_cpus_and_bad_counts(site, tmp_path, monkeypatch):
    sender, _, agent, executor = site
    agent.start()
    assert _deploy(sender, copy_mmar(tmp_path / "mmar"), 1, tmp_path)[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    ok, error = sender.ask("start_mgpu", {"run_number": 1, "gpu_number": 4})
    assert not ok and error == "site-1 has 2 GPUs (CUDA_VISIBLE_DEVICES='0,1'); start-mgpu asked for 4"
    for bad in (0, "two"):
        ok, error = sender.ask("start_mgpu", {"run_number": 1, "gpu_number": bad})
        assert not ok and error.startswith("gpu_number must be a whole number >= 1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    ok, error = sender.ask("start_mgpu", {"run_number": 1, "gpu_number": 3})
    assert not ok and error == (
        "site-1 has no GPU (CUDA_VISIBLE_DEVICES='') and 2 CPUs; start-mgpu 3 would run 3 CPU ranks"
    )
    assert executor.status == ClientStatus.TRAINING_NOT_STARTED


def test_start_mgpu_on_a_cpu_site_starts_gloo_ranks_and_status_shows_them(site, tmp_path, monkeypatch):
    sender, _, agent, _ = site
    agent.start()
    assert _deploy(sender, copy_mmar(tmp_path / "mmar"), 1, tmp_path)[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    ok, data = sender.ask("start_mgpu", {"run_number": 1, "gpu_number": 2})
    assert ok and data == {"run_number": 1, "pid": 4242, "gpus": 2, "backend": "gloo"}
    ok, status = sender.ask("check_status")
    assert ok and status["ranks"] == 2 and status["status"] == "training started"


@pytest.mark.parametrize(("visible", "count"), [("0,1,2", 3), ("", 0), ("-1", 0), ("1,-1,0", 1), ("GPU-3f2a", 1)])
def test_available_gpus_follow_cuda_visible_devices(visible, count):
    assert available_gpus({"CUDA_VISIBLE_DEVICES": visible}) == (count, f"CUDA_VISIBLE_DEVICES={visible!r}")


# ---- several runs at once (issue 22) ------------------------------------------------------------------------


def _declare(interface: ClientAdminInterface, resources: dict) -> None:
    (interface.workspace / "local").mkdir(exist_ok=True)
    (interface.workspace / "local" / "resources.json").write_text(json.dumps(resources))


@pytest.fixture
def runs(site, tmp_path):
    """The site fixture with each run on an executor of its own, and runs 1, 2 and 3 deployed."""
    sender, interface, agent, _ = site
    made: dict[int, FakeExecutor] = {}

    def factory(on_event):
        executor = FakeExecutor(on_event=on_event)
        made[len(made)] = executor
        return executor

    interface.executor_factory = factory
    agent.start()
    for run in (1, 2, 3):
        assert _deploy(sender, DIGITS, run, tmp_path)[0]
    return sender, interface


def _runs_of(status: dict) -> dict[int, dict]:
    return {entry["run_number"]: entry for entry in status["runs"]}


def test_a_site_that_declares_nothing_trains_one_run_at_a_time_in_the_words_it_always_used(runs):
    sender, interface = runs
    assert sender.ask("start", {"run_number": 1})[0]
    assert sender.ask("start", {"run_number": 2}) == (False, "run 1 is training; abort it first")
    assert sender.ask("validate", {"run_number": 3}) == (
        False,
        "run 1 is training; cross-site validation waits until it ends",
    )


def test_with_two_cpu_slots_two_runs_train_and_a_third_is_refused_naming_what_is_in_use(runs):
    sender, interface = runs
    _declare(interface, {"cpu_slots": 2})
    assert sender.ask("start", {"run_number": 1}) == (True, {"run_number": 1, "pid": 4242})
    assert sender.ask("start", {"run_number": 2}) == (True, {"run_number": 2, "pid": 4242})
    assert sender.ask("start", {"run_number": 3}) == (
        False,
        "site-1: 2 CPU slots, in use by run 1, run 2; run 3 needs 1 (local/resources.json cpu_slots)",
    )
    assert sender.ask("start", {"run_number": 2}) == (False, "run 2 is already training")
    ok, status = sender.ask("check_status")
    assert status["run_number"] == 2, "the top-level fields are the run started last"
    assert {n: (e["status_code"], e["cpu_slots"]) for n, e in _runs_of(status).items()} == {1: (2, 1), 2: (2, 1)}
    _declare(interface, {"cpu_slots": 1})
    assert sender.ask("abort", {"run_number": 2}) == (True, {"run_number": 2, "status": "training stopped"})
    assert sender.ask("start", {"run_number": 3}) == (
        False,
        "site-1: 1 CPU slot, in use by run 1; run 3 needs 1 (local/resources.json cpu_slots)",
    )


def test_abort_with_a_run_number_stops_that_run_only_and_without_one_every_run(runs):
    sender, interface = runs
    _declare(interface, {"cpu_slots": 3})
    for run in (1, 2, 3):
        assert sender.ask("start", {"run_number": run})[0]
    assert sender.ask("abort", {"run_number": 2}) == (True, {"run_number": 2, "status": "training stopped"})
    codes = {n: e["status_code"] for n, e in _runs_of(sender.ask("check_status")[1]).items()}
    assert codes == {
        1: ClientStatus.TRAINING_STARTED,
        2: ClientStatus.TRAINING_STOPPED,
        3: ClientStatus.TRAINING_STARTED,
    }
    assert sender.ask("start", {"run_number": 2})[0], "run 2's slot was given back"
    assert sender.ask("abort", {"run_number": 9}) == (True, {"run_number": 9, "status": "training not started"})
    ok, error = sender.ask("abort", {"run_number": "x"})
    assert not ok and error.startswith("run_number must be a whole number >= 1")
    assert sender.ask("abort") == (True, {"status": "training stopped"})
    ok, status = sender.ask("check_status")
    assert {e["status_code"] for e in status["runs"]} == {ClientStatus.TRAINING_STOPPED}
    assert all("cpu_slots" not in e for e in status["runs"]), "nothing is held once every run is aborted"


def test_delete_run_refuses_any_run_that_trains_and_deploy_only_the_run_that_trains(runs, tmp_path):
    sender, interface = runs
    _declare(interface, {"cpu_slots": 2})
    for run in (1, 2):
        assert sender.ask("start", {"run_number": run})[0]
    for run in (1, 2):
        assert sender.ask("delete_run_number", {"run_number": run}) == (False, f"run {run} is active; abort it first")
        assert _deploy(sender, DIGITS, run, tmp_path) == (
            False,
            f"run {run} is training; abort it before deploying again",
        )
    assert _deploy(sender, DIGITS, 3, tmp_path)[0]
    assert sender.ask("delete_run_number", {"run_number": 3})[0]


def test_each_runs_progress_and_end_are_reported_as_that_runs(runs):
    sender, interface = runs
    _declare(interface, {"cpu_slots": 2})
    assert sender.ask("start", {"run_number": 1})[0]
    first = interface.client_executor
    assert sender.ask("start", {"run_number": 2})[0]
    second = interface.client_executor
    assert first is not second
    first.report(kind="epoch", round=0, epoch=3, loss=0.25)
    second.report(kind="epoch", round=4, epoch=1, loss=0.5)
    first.report(kind="end", round=1, metrics={"accuracy": 0.8})
    first.finish(0)
    results = sender.wait_results(lambda r: any(m.topic == "training_ended" for m in r))
    progress = [json.loads(m.body) for m in results if m.topic == "progress"]
    by_run = {p["run_number"]: p for p in progress}  # each run's latest: one run's never replaces another's
    assert (by_run[2]["round"], by_run[2]["epoch"], by_run[2]["loss"]) == (4, 1, 0.5)
    assert by_run[1]["epoch"] == 3 and by_run[1]["metrics"] == {"accuracy": 0.8}
    ended = [json.loads(m.body) for m in results if m.topic == "training_ended"]
    assert ended == [{"run_number": 1, "status": "training stopped", "exit_code": 0, "error": ""}]
    assert RunFolder.of(interface.workspace, 1).completed.is_file()
    assert not RunFolder.of(interface.workspace, 2).completed.exists()
    runs_now = _runs_of(sender.ask("check_status")[1])
    assert runs_now[1]["progress"]["epoch"] == 3 and runs_now[2]["progress"]["round"] == 4


def test_start_and_start_mgpu_take_gpus_their_workers_see_and_status_and_sysinfo_show(runs, monkeypatch):
    from fedcommon.site_resources import SiteResources

    sender, interface = runs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    ok, data = sender.ask("start_mgpu", {"run_number": 1, "gpu_number": 2})
    assert ok and data == {"run_number": 1, "pid": 4242, "gpus": 2, "backend": "nccl"}
    assert interface.client_executor.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert sender.ask("start", {"run_number": 2})[0]
    assert interface.client_executor.env == {"CUDA_VISIBLE_DEVICES": "2"}
    assert sender.ask("start", {"run_number": 3}) == (
        False,
        "site-1: 3 GPUs (0, 1, 2), in use by run 1 (0, 1), run 2 (2); run 3 needs 1 (CUDA_VISIBLE_DEVICES='0,1,2')",
    )
    runs_now = _runs_of(sender.ask("check_status")[1])
    assert (runs_now[1]["gpus"], runs_now[1]["ranks"], runs_now[2]["gpus"]) == (["0", "1"], 2, ["2"])
    ok, info = sender.ask("sys_info")
    resources = SiteResources.from_sysinfo(info)
    assert resources.gpu_ids == ["0", "1", "2"] and resources.free_gpus() == []
    assert [g.in_use_by for g in resources.gpus] == [1, 1, 2]
    assert sender.ask("abort", {"run_number": 1})[0]
    ok, info = sender.ask("sys_info")
    assert SiteResources.from_sysinfo(info).free_gpus() == ["0", "1"]


def test_start_mgpu_on_declared_cpu_slots_takes_one_slot_per_rank(runs, monkeypatch):
    sender, interface = runs
    _declare(interface, {"cpu_slots": 2})
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    ok, error = sender.ask("start_mgpu", {"run_number": 1, "gpu_number": 3})
    assert not ok and error == (
        "site-1 has no GPU (CUDA_VISIBLE_DEVICES='') and 2 CPU slots (local/resources.json cpu_slots); "
        "start-mgpu asked for 3"
    )
    ok, data = sender.ask("start_mgpu", {"run_number": 1, "gpu_number": 2})
    assert ok and data["backend"] == "gloo"
    assert interface.client_executor.env == {}, "no GPU: the worker's environment is the agent's"
    assert sender.ask("start", {"run_number": 2}) == (
        False,
        "site-1: 2 CPU slots, in use by run 1 (2); run 2 needs 1 (local/resources.json cpu_slots)",
    )
    assert _runs_of(sender.ask("check_status")[1])[1]["cpu_slots"] == 2


def test_a_bad_resources_file_refuses_starts_and_sysinfo_names_it(runs):
    from fedcommon.site_resources import SiteResources, SiteResourcesError

    sender, interface = runs
    _declare(interface, {"cpu_slots": 2, "gpu": []})
    ok, error = sender.ask("start", {"run_number": 1})
    path = interface.workspace / "local" / "resources.json"
    assert not ok and error == f"site-1: cannot start a run: {path}: gpu: unknown key (known: gpus, cpu_slots)"
    ok, info = sender.ask("sys_info")
    assert ok and info["resources"] == {"error": f"{path}: gpu: unknown key (known: gpus, cpu_slots)"}
    with pytest.raises(SiteResourcesError, match="the site cannot read its own: .*gpu: unknown key"):
        SiteResources.from_sysinfo(info)


def test_validate_refuses_a_run_that_is_not_deployed_or_while_training(site):
    sender, _, agent, _ = site
    agent.start()
    ok, error = sender.ask("validate")
    assert not ok and "set-run" in error
    ok, error = sender.ask("validate", {"run_number": 4})
    assert not ok and error == "run 4 is not deployed at site-1"


def test_sysinfo_reports_the_training_status(site):
    sender, _, agent, _ = site
    agent.start()
    ok, data = sender.ask("sys_info")
    assert ok and data["training_status"] == "training not started" and data["hostname"]
    assert data["resources"] == {"gpus": [], "cpu_slots": 1, "cpu_slots_in_use": {}}


def test_shutdown_and_restart_reply_first_and_ask_the_process_to_exit(site):
    sender, interface, agent, _ = site
    agent.start()
    assert sender.ask("restart") == (True, {"restarting": True})
    assert interface.exit_requested.is_set() and interface.restart_requested
    assert sender.ask("shutdown") == (True, {"shutting_down": True})
    assert not interface.restart_requested


def test_a_restart_loop_is_refused_with_a_message_and_the_agent_stays_up(site):
    sender, interface, agent, _ = site
    agent.start()
    for _ in range(5):
        assert sender.ask("restart") == (True, {"restarting": True})
    interface.restart_requested = False
    ok, error = sender.ask("restart")
    assert not ok and "restart refused: 5 restarts in the last 5 min" in error
    assert not interface.restart_requested
    assert sender.ask("check_status")[0]


def test_progress_is_forwarded_at_most_every_half_second_and_the_end_is_reported(site, tmp_path):
    sender, interface, agent, executor = site
    agent.start()
    assert _deploy(sender, DIGITS, 1, tmp_path)[0]
    assert sender.ask("start", {"run_number": 1})[0]
    started = time.monotonic()
    for epoch in range(1, 21):
        executor.report(kind="epoch", round=2, epoch=epoch, loss=1.0 / epoch)
        time.sleep(0.05)
    executor.report(kind="end", round=2, metrics={"accuracy": 0.9})
    ok, status = sender.ask("check_status")
    assert status["progress"] == {"round": 2, "epoch": 20, "loss": 0.05, "metrics": {"accuracy": 0.9}}
    sender.ask("abort")
    results = sender.wait_results(lambda r: any(m.topic == "training_ended" for m in r))
    elapsed = time.monotonic() - started
    progress = [json.loads(m.body) for m in results if m.topic == "progress"]
    assert 1 <= len(progress) <= elapsed / 0.5 + 1
    assert progress[-1] == {"run_number": 1, "round": 2, "epoch": 20, "loss": 0.05, "metrics": {"accuracy": 0.9}}
    assert results[-1].topic == "training_ended"
    assert json.loads(results[-1].body) == {"run_number": 1, "status": "training stopped", "exit_code": 0, "error": ""}


def test_the_admin_message_sender_refuses_plaintext_saying_why_and_what_to_pass(tmp_path):
    with pytest.raises(ValueError) as err:
        AdminMessageSender("site-1", server_args={"target": "127.0.0.1:1"}, secure=False)
    message = str(err.value)
    assert "secure=False (plaintext) is not supported: the server accepts only mutual TLS, because" in message
    assert "Pass secure=True and root_cert=..., ssl_cert=..., private_key=..." in message


def _kit_sender(tmp_path, **kwargs) -> AdminMessageSender:
    startup = prepare_workspace(tmp_path / "ws", clients=1) / "site-1" / "startup"
    return AdminMessageSender(
        "site-1",
        root_cert=str(startup / "rootCA.pem"),
        ssl_cert=str(startup / "cert.pem"),
        private_key=str(startup / "key.pem"),
        server_args={"target": "127.0.0.1:1"},
        secure=True,
        **kwargs,
    )


def test_a_rank_other_than_0_is_silent_with_is_multi_gpu_and_refused_without_saying_why(tmp_path):
    with pytest.raises(ValueError, match="rank 2 without is_multi_gpu=True: only a multi-GPU site has ranks"):
        _kit_sender(tmp_path, rank=2)
    silent = _kit_sender(tmp_path / "again", is_multi_gpu=True, rank=1)
    try:  # nothing listens on 127.0.0.1:1, and rank 1 does not try
        assert silent.retrieve_client_requests("admin", wait_seconds=0) == []
        assert silent.send_client_reply(Message("check_status", b"{}"), "admin") is True
    finally:
        silent.close()


# ---- over real gRPC with mutual TLS -----------------------------------------------------------------------


@pytest.fixture
def plane(tmp_path):
    """A real in-process server, an operator's AdminService stub, and site-1's real agent over mutual TLS."""
    from fedserver.server import FederationServer

    ws = prepare_workspace(tmp_path / "ws", clients=1)
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, admin_port=0)
    server.start()
    startup = ws / "site-1" / "startup"
    sender = AdminMessageSender(
        "site-1",
        root_cert=str(startup / "rootCA.pem"),
        ssl_cert=str(startup / "cert.pem"),
        private_key=str(startup / "key.pem"),
        server_args={"target": f"127.0.0.1:{server.fl_port}"},
        secure=True,
    )
    interface = ClientAdminInterface(None, "site-1", sender, argparse.Namespace(workspace=ws / "site-1"), 0)
    interface.client_executor = FakeExecutor(on_event=interface._on_training_event)
    agent = FedAdminAgent("site-1", sender, interface)
    for processor in seed_processors():
        agent.register_processor(processor)
    agent.start()
    admin = admin_grpc.AdminServiceStub(
        grpc.secure_channel(f"127.0.0.1:{server.admin_port}", channel_credentials(load_kit(ws / "admin")))
    )
    deadline = time.monotonic() + 10
    while "site-1" not in server.mailbox.connected_sites():
        assert time.monotonic() < deadline, "site-1 never connected"
        time.sleep(0.02)
    yield server, admin, interface, sender
    agent.shutdown()
    interface.close()
    server.stop(0)


def _execute(admin, command: str, targets: list[str], args: dict | None = None) -> apb.CommandReply:
    return admin.Execute(
        apb.CommandRequest(command=command, targets=targets, args_json=json.dumps(args or {}), timeout=10), timeout=30
    )


def test_a_request_reaches_an_idle_site_at_once_over_the_long_poll(plane):
    server, admin, interface, sender = plane
    assert sender.wait_connected(5)
    time.sleep(1.0)  # the site's Retrieve is now held by the server
    started = time.monotonic()
    reply = _execute(admin, "status", ["site-1"])
    # The server holds a Retrieve up to LONG_POLL_S (60 s): an answer well inside that came by waking the held
    # call, not by the site's next poll; the margin is wide so a loaded machine does not fail it.
    assert time.monotonic() - started < 20.0
    assert reply.ok, reply
    assert json.loads(reply.replies[0].data_json)["status"] == "training not started"


def test_deploy_and_start_through_the_server_reach_the_site(plane, tmp_path):
    server, admin, interface, sender = plane
    archive = zip_folder(DIGITS, tmp_path / "digits.zip").read_bytes()
    header = signed_header(interface.workspace.parent / "admin", archive, "digits.zip")
    upload = admin.Upload(iter([apb.BlobChunk(header=header), apb.BlobChunk(data=archive)]), timeout=30)
    reply = _execute(admin, "deploy", ["site-1"], {"blob_id": upload.blob_id})
    assert not reply.ok and reply.replies[0].error == "no run number set: run `fedadmin set-run N` first"
    assert _execute(admin, "set-run", ["server"], {"run_number": 2}).ok
    reply = _execute(admin, "deploy", ["site-1"], {"blob_id": upload.blob_id})
    assert reply.ok, reply
    assert json.loads(reply.replies[0].data_json)["path"] == str(interface.workspace / "run_2" / "mmar")
    assert (interface.workspace / "run_2" / "mmar" / "config" / "config_train.json").is_file()
    reply = _execute(admin, "start", ["site-1"])
    assert json.loads(reply.replies[0].data_json) == {"run_number": 2, "pid": 4242}
    interface.client_executor.report(kind="epoch", round=0, epoch=1, loss=0.5)
    deadline = time.monotonic() + 10
    while "site-1" not in server.mailbox.site_results()["site_progress"]:
        assert time.monotonic() < deadline, "progress never reached the server"
        time.sleep(0.05)
    assert server.mailbox.site_results()["site_progress"]["site-1"]["epoch"] == 1


def test_a_fetch_with_a_wrong_size_is_refused(plane, tmp_path):
    server, admin, interface, sender = plane
    data = b"PK\x05\x06" + bytes(18)  # an empty zip archive: 22 bytes
    sha = hashlib.sha256(data).hexdigest()
    header = signed_header(interface.workspace.parent / "admin", data, "x.zip")
    admin.Upload(iter([apb.BlobChunk(header=header), apb.BlobChunk(data=data)]), timeout=30)
    server.blobs.grant(sha, ["site-1"])  # what a deploy to site-1 does
    with pytest.raises(BlobFetchError, match="the deploy request announced 9"):
        sender.fetch_blob(sha, tmp_path / "x.zip", sha, 9)
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.part").exists()


# ---- `fedclient start` as a real process ------------------------------------------------------------------


def _agent_process(workspace: Path) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedclient.cli", "start", "--workspace", str(workspace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=python_env(),
        cwd=ROOT,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.e2e
def test_fedclient_start_serves_requests_restarts_and_shuts_down_on_command(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    with server_process(ws / "server"):
        admin = admin_grpc.AdminServiceStub(
            grpc.secure_channel(load_kit(ws / "admin").admin_target, channel_credentials(load_kit(ws / "admin")))
        )
        proc, lines = _agent_process(ws / "site-1")
        processes.append(proc)
        _wait_for(lambda: "fedclient agent site-1 started\n" in lines, 60, "the agent never said it started")
        _wait_for(lambda: _execute(admin, "status", ["site-1"]).ok, 10, "site-1 never answered status")
        reply = _execute(admin, "restart", ["site-1"])
        assert json.loads(reply.replies[0].data_json) == {"restarting": True}
        _wait_for(lambda: lines.count("fedclient agent site-1 started\n") == 2, 60, "no restart")
        assert proc.poll() is None, "a restart re-executes the same process"
        _wait_for(lambda: _execute(admin, "status", ["site-1"]).ok, 10, "site-1 never answered after the restart")
        reply = _execute(admin, "shutdown", ["site-1"])
        assert json.loads(reply.replies[0].data_json) == {"shutting_down": True}
        assert proc.wait(20) == 0
    log_text = (ws / "site-1" / "log.txt").read_text()
    assert "restarting" in log_text and "shutting down" in log_text


@pytest.mark.e2e
def test_fedclient_start_exits_cleanly_on_sigterm_and_refuses_a_server_kit(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    with server_process(ws / "server"):
        proc, lines = _agent_process(ws / "site-1")
        processes.append(proc)
        _wait_for(lambda: "fedclient agent site-1 started\n" in lines, 60, "the agent never said it started")
        proc.terminate()
        assert proc.wait(20) == 0
    refused = subprocess.run(
        [sys.executable, "-m", "fedclient.cli", "start", "--workspace", str(ws / "server")],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert refused.returncode == 3 and "needs a site's kit" in refused.stderr
    shutil.rmtree(ws / "site-1" / "startup")
    refused = subprocess.run(
        [sys.executable, "-m", "fedclient.cli", "start", "--workspace", str(ws / "site-1")],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert refused.returncode == 3 and "startup" in refused.stderr


@pytest.mark.e2e
def test_sigterm_during_training_aborts_it_and_leaves_no_process(tmp_path, processes):
    from fedclient.process_group import group_members

    ws = prepare_workspace(tmp_path / "ws", clients=1)
    slow = copy_mmar(
        tmp_path / "slow",
        server={"min_num_clients": 1, "num_rounds": 1},
        train_args={"num_sites": 1, "epochs_per_round": 100000},
    )
    with server_process(ws / "server"):
        admin = admin_grpc.AdminServiceStub(
            grpc.secure_channel(load_kit(ws / "admin").admin_target, channel_credentials(load_kit(ws / "admin")))
        )
        proc, lines = _agent_process(ws / "site-1")
        processes.append(proc)
        _wait_for(lambda: "fedclient agent site-1 started\n" in lines, 60, "the agent never said it started")
        archive = zip_folder(slow, tmp_path / "slow.zip").read_bytes()
        header = signed_header(ws / "admin", archive, "slow.zip")
        upload = admin.Upload(iter([apb.BlobChunk(header=header), apb.BlobChunk(data=archive)]), timeout=30)
        assert _execute(admin, "set-run", ["server"], {"run_number": 1}).ok
        assert _execute(admin, "deploy", ["all"], {"blob_id": upload.blob_id}).ok
        reply = _execute(admin, "start", ["all"])
        assert reply.ok, reply
        worker = json.loads(next(r for r in reply.replies if r.target == "site-1").data_json)["pid"]

        def training() -> bool:
            data = json.loads(_execute(admin, "status", ["site-1"]).replies[0].data_json)
            return data["status_code"] == ClientStatus.TRAINING_STARTED and data["progress"].get("epoch")

        _wait_for(training, 120, "site-1 never trained")
        assert group_members(worker) == [worker]
        proc.terminate()
        assert proc.wait(30) == 0
        assert group_members(worker) == [], "no process of the training may outlive the agent"


def test_the_agents_retry_pause_doubles_and_is_capped_at_two_seconds():
    # Uncapped, a long outage would pause up to interval * 2**16 (55 min at 0.05 s) before the site tries again.
    for interval in (0.05, 0.5, 5.0):
        pauses = [retry_pause(failures, interval) for failures in range(1, 1000)]
        assert max(pauses) <= 2.0, (interval, max(pauses))
        assert pauses == sorted(pauses)
    assert [retry_pause(k, 0.5) for k in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 2.0]

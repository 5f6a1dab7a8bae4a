"""The console against a fake AdminService over real mutual TLS: JSON shape, exit codes, local refusals, uploads."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, prepare_workspace, python_env, run_fedadmin

from fedcommon.identity import peer_identity
from fedcommon.kit import load_kit, server_credentials
from fedcommon.wire import admin_pb2, admin_pb2_grpc

SITES = ["site-1", "site-2"]
SERVER_STATUS = {
    "run_number": 1,
    "run_status": "training",
    "current_round": 1,
    "start_round": 0,
    "num_rounds": 3,
    "registered_sites": SITES,
    "connected_sites": SITES,
}
SITE_STATUS = {
    "status": "training started",
    "status_code": 2,
    "run_number": 1,
    "progress": {"round": 1, "epoch": 2, "loss": 0.5, "metrics": {"accuracy": 0.9}},
}

Handler = Callable[[admin_pb2.CommandRequest, grpc.ServicerContext], admin_pb2.CommandReply]


def expand(targets: list[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out += ["server", *SITES] if t == "all" else SITES if t == "client" else [t]
    return out


def reply(
    request: admin_pb2.CommandRequest, data: Callable[[str], dict] | None = None, errors: dict[str, str] | None = None
) -> admin_pb2.CommandReply:
    """One TargetReply per target: errors[target] fails it, an unknown site is "not connected"."""
    errors = dict(errors or {})
    replies = []
    for target in expand(list(request.targets)):
        if target not in ("server", *SITES):
            errors.setdefault(target, f"{target} is not connected")
        if target in errors:
            replies.append(admin_pb2.TargetReply(target=target, ok=False, error=errors[target]))
        else:
            payload = data(target) if data else {}
            replies.append(admin_pb2.TargetReply(target=target, ok=True, data_json=json.dumps(payload)))
    return admin_pb2.CommandReply(command=request.command, ok=all(r.ok for r in replies), replies=replies)


def status_data(target: str) -> dict:
    return dict(SERVER_STATUS) if target == "server" else dict(SITE_STATUS)


@dataclass
class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    """Records every request; answers Execute from handlers (canned ok replies by default)."""

    requests: list[admin_pb2.CommandRequest] = field(default_factory=list)
    uploads: list[tuple[admin_pb2.BlobHeader, bytes]] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    callers: list[str] = field(default_factory=list)

    def Execute(self, request, context):  # noqa: N802 (gRPC method name)
        peer = peer_identity(context)
        if peer is None or peer.kind != "admin":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer and peer.name} is not an admin certificate")
        self.callers.append(peer.name)
        self.requests.append(request)
        handler = self.handlers.get(request.command)
        if handler is not None:
            return handler(request, context)
        return reply(request, status_data if request.command == "status" else None)

    def Upload(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        first = next(request_iterator)
        data = b"".join(chunk.data for chunk in request_iterator)
        header = first.header
        digest = hashlib.sha256(data).hexdigest()
        if digest != header.sha256 or len(data) != header.size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sha256 or size differs from the header")
        self.uploads.append((header, data))
        return admin_pb2.UploadReply(blob_id=digest, size=len(data), sha256=digest)

    def commands(self) -> list[str]:
        return [r.command for r in self.requests]


@pytest.fixture
def ws(tmp_path) -> Path:
    return prepare_workspace(tmp_path / "ws", clients=2)


@pytest.fixture
def fake(ws) -> Iterator[FakeAdmin]:
    kit = load_kit(ws / "server")
    servicer = FakeAdmin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
    server.add_secure_port(f"127.0.0.1:{kit.admin_port}", server_credentials(kit))
    server.start()
    try:
        yield servicer
    finally:
        server.stop(grace=None)


def fedadmin(*args: str, kit: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m fedadmin.cli` with no terminal on stdin, so nothing can prompt; the kit given as --kit."""
    kit_args = ["--kit", str(kit)] if kit is not None else []
    return run_fedadmin(*kit_args, *args, env={"COLUMNS": "200"}, timeout=timeout)


def one_json(result: subprocess.CompletedProcess[str]) -> dict:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    return json.loads(lines[0])


# ---- JSON shape and exit codes -------------------------------------------------------------------


def test_status_json_has_one_reply_per_target_and_exits_0(ws, fake):
    result = fedadmin("--json", "status", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    report = one_json(result)
    assert (report["command"], report["ok"]) == ("status", True)
    replies = {r["target"]: r for r in report["replies"]}
    assert list(replies) == ["server", *SITES]
    assert replies["server"]["run_number"] == 1
    assert replies["server"]["registered_sites"] == SITES
    assert replies["site-1"]["status"] == "training started"
    assert replies["site-1"]["run_number"] == 1
    assert all(r["ok"] for r in replies.values())
    assert fake.requests[0].targets == ["all"]
    assert fake.callers == ["admin"]


def test_kit_can_come_from_the_environment(ws, fake):
    env = {**python_env(), "FEDADMIN_KIT": str(ws / "admin")}
    result = subprocess.run(
        [sys.executable, "-m", "fedadmin.cli", "--json", "status", "site-1"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [r["target"] for r in one_json(result)["replies"]] == ["site-1"]


def test_a_site_that_did_not_reply_fails_the_command_with_exit_1(ws, fake):
    fake.handlers["status"] = lambda req, ctx: reply(req, status_data, {"site-2": "no reply within 10s"})
    result = fedadmin("--json", "status", kit=ws / "admin")
    assert result.returncode == 1, result.stderr
    report = one_json(result)
    assert report["ok"] is False
    site2 = next(r for r in report["replies"] if r["target"] == "site-2")
    assert site2 == {"target": "site-2", "ok": False, "error": "no reply within 10s"}


def test_status_table_shows_each_site_and_its_error(ws, fake):
    fake.handlers["status"] = lambda req, ctx: reply(req, status_data, {"site-2": "no reply within 10s"})
    result = fedadmin("status", kit=ws / "admin")
    assert result.returncode == 1
    assert "site-1" in result.stdout and "training started" in result.stdout
    assert "no reply within 10s" in result.stdout
    assert "run 1 training" in result.stdout


def test_a_named_target_the_server_leaves_out_counts_as_no_reply(ws, fake):
    fake.handlers["status"] = lambda req, ctx: admin_pb2.CommandReply(command="status", ok=True)
    result = fedadmin("--json", "status", "site-1", kit=ws / "admin")
    assert result.returncode == 1
    assert one_json(result)["replies"] == [
        {"target": "site-1", "ok": False, "error": "no reply from the server for this target"}
    ]


def test_a_refused_command_is_reported_with_exit_1(ws, fake):
    fake.handlers["sysinfo"] = lambda req, ctx: admin_pb2.CommandReply(
        command="sysinfo", ok=False, error="unknown command 'sysinfo'"
    )
    result = fedadmin("--json", "sysinfo", kit=ws / "admin")
    assert result.returncode == 1
    report = one_json(result)
    assert (report["ok"], report["error"], report["replies"]) == (False, "unknown command 'sysinfo'", [])


def test_server_rules_come_back_as_per_target_errors(ws, fake):
    refusal = "no run number set: run `fedadmin set-run N` first"
    fake.handlers["deploy"] = lambda req, ctx: reply(req, errors={t: refusal for t in expand(list(req.targets))})
    result = fedadmin("deploy", str(make_zip(ws.parent / "mmar.zip")), "all", kit=ws / "admin")
    assert result.returncode == 1
    assert refusal in " ".join(result.stdout.split())
    assert "site-2" in result.stdout


@pytest.mark.parametrize(
    "argv, command, targets, args",
    [
        (["set-run", "3"], "set-run", ["server"], {"run_number": 3}),
        (["set-timeout", "2.5"], "set-timeout", ["server"], {"seconds": 2.5}),
        (["start", "site-1", "site-2"], "start", ["site-1", "site-2"], {}),
        (["sysinfo"], "sysinfo", ["all"], {}),
        (["--yes", "delete-run", "2"], "delete-run", ["all"], {"run_number": 2}),
        (["--yes", "remove-client", "site-2"], "remove-client", ["server"], {"site": "site-2"}),
        (["--yes", "shutdown", "client"], "shutdown", ["client"], {}),
        (["--yes", "restart", "server"], "restart", ["server"], {}),
    ],
)
def test_commands_send_the_contract_names_targets_and_arguments(ws, fake, argv, command, targets, args):
    result = fedadmin("--json", *argv, kit=ws / "admin")
    assert result.returncode == 0, result.stdout + result.stderr
    assert one_json(result)["command"] == command
    (request,) = fake.requests
    assert (request.command, list(request.targets), json.loads(request.args_json)) == (command, targets, args)
    assert request.timeout == 0  # the server's own setting


def test_timeout_option_is_sent_to_the_server(ws, fake):
    assert fedadmin("--reply-timeout", "7", "--json", "status", kit=ws / "admin").returncode == 0
    assert fake.requests[0].timeout == 7


def test_sysinfo_table_shows_resources_per_target(ws, fake):
    info = {
        "hostname": "h1",
        "platform": "Linux",
        "python": "3.12",
        "torch": None,
        "cpu_count": 16,
        "cpu_percent": 3.0,
        "load_avg": [0.1, 0.2, 0.3],
        "memory_total": 2 << 30,
        "memory_available": 1 << 30,
        "disk_total": 8 << 30,
        "disk_free": 4 << 30,
        "training_status": "not started",
        "gpus": [
            {"index": 0, "name": "H200", "memory_total_mib": 143771, "memory_used_mib": 10, "utilization_percent": 0}
        ],
    }
    fake.handlers["sysinfo"] = lambda req, ctx: reply(req, lambda t: info)
    result = fedadmin("sysinfo", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    for text in ("server", "site-2", "h1", "H200", "1.0 GiB of 2.0 GiB"):
        assert text in result.stdout


# ---- usage errors (exit 2) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["start"],
        ["abort"],
        ["deploy", "."],
        ["restart"],
        ["shutdown"],
        ["set-run", "0"],
        ["set-timeout", "0"],
        ["status", "no/such/site"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2_without_contacting_the_server(ws, fake, argv):
    result = fedadmin(*argv, kit=ws / "admin")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert fake.requests == []


def test_usage_error_under_json_prints_one_json_object(ws, fake):
    result = fedadmin("--json", "start", kit=ws / "admin")
    assert result.returncode == 2
    report = one_json(result)
    assert (report["command"], report["ok"]) == ("start", False)
    assert "TARGET" in report["error"]


def test_missing_kit_is_a_usage_error_naming_the_option_and_variable():
    result = fedadmin("status")
    assert result.returncode == 2
    assert "--kit" in result.stderr and "FEDADMIN_KIT" in result.stderr


def test_shell_refuses_other_commands_before_connecting(tmp_path):
    result = fedadmin("shell", "site-1", "rm", "-rf", "run_1", kit=tmp_path / "no-kit-here")
    assert result.returncode == 2
    assert "'rm' is not allowed" in result.stderr
    assert "ls, cat, head, tail, grep, pwd" in result.stderr


def test_shell_sends_the_argv_with_its_options_and_prints_the_output(ws, fake):
    output = {"stdout": "config\nmodels\n", "truncated": False, "exit_code": 0}
    fake.handlers["shell"] = lambda req, ctx: reply(req, lambda t: output)
    result = fedadmin("shell", "site-1", "ls", "-l", "run_1", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    (request,) = fake.requests
    assert list(request.targets) == ["site-1"]
    assert json.loads(request.args_json) == {"argv": ["ls", "-l", "run_1"]}
    assert "config\nmodels" in result.stdout
    assert "exit 0" in result.stdout


def test_shell_refuses_a_group_target(ws, fake):
    result = fedadmin("shell", "all", "pwd", kit=ws / "admin")
    assert result.returncode == 2
    assert fake.requests == []


# ---- connection and authentication failures (exit 3) --------------------------------------------


def test_unreachable_server_exits_3_naming_the_address(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    target = load_kit(ws / "admin").admin_target
    result = fedadmin("status", kit=ws / "admin")
    assert result.returncode == 3, result.stdout + result.stderr
    assert target in result.stderr
    assert "connection refused" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    report = one_json(fedadmin("--json", "status", kit=ws / "admin"))
    assert report["ok"] is False and target in report["error"]


def test_admin_kit_of_another_project_fails_the_handshake_with_exit_3(ws, fake, tmp_path):
    other = prepare_workspace(tmp_path / "other", clients=1)
    config_path = other / "admin" / "startup" / "fed.json"
    config = json.loads(config_path.read_text())
    config["server"] = json.loads((ws / "admin" / "startup" / "fed.json").read_text())["server"]
    config_path.write_text(json.dumps(config))
    result = fedadmin("status", kit=other / "admin")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "TLS handshake failed" in result.stderr
    assert fake.requests == []


def test_a_site_kit_is_refused_as_an_admin_kit_with_exit_3(ws, fake):
    result = fedadmin("status", kit=ws / "site-1")
    assert result.returncode == 3
    assert "not an admin's" in result.stderr
    assert fake.requests == []


def test_a_missing_kit_folder_is_a_usage_error(tmp_path):
    """Issue 19 item 7: a missing kit folder exited 3 ("cannot connect"), where it is a usage error (2)."""
    result = fedadmin("--json", "status", kit=tmp_path / "nowhere")
    assert result.returncode == 2
    assert "no such folder" in one_json(result)["error"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fedadmin("--json", "status", kit=empty).returncode == 3  # a folder that is no kit: it cannot connect


def test_permission_denied_by_the_server_exits_3(ws, fake):
    def deny(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "admin 'admin' (member) may not run set-run")

    fake.handlers["set-run"] = deny
    result = fedadmin("set-run", "2", kit=ws / "admin")
    assert result.returncode == 3
    assert "may not run set-run" in result.stderr


def test_a_port_that_never_completes_the_handshake_exits_3(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    kit = load_kit(ws / "admin")
    with socket.socket() as listener:  # accepts TCP connections (backlog), never speaks TLS
        listener.bind(("127.0.0.1", kit.admin_port))
        listener.listen(8)
        result = fedadmin("--reply-timeout", "0.5", "status", kit=ws / "admin")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"cannot connect to the server's admin port at {kit.admin_target}" in result.stderr


def test_a_server_that_answers_too_late_exits_1(ws, fake):
    def slow(request, context):
        time.sleep(8)
        return reply(request)

    fake.handlers["status"] = slow
    result = fedadmin("--reply-timeout", "0.5", "status", "server", kit=ws / "admin")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no answer from the server's admin port" in result.stderr


# ---- destructive commands ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["abort", "all"], ["delete-run", "1"], ["restart", "site-1"], ["shutdown", "server"], ["remove-client", "site-1"]],
)
def test_destructive_command_without_terminal_or_yes_is_refused(ws, fake, argv):
    result = fedadmin(*argv, kit=ws / "admin")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--yes" in result.stderr
    assert fake.requests == []


def test_destructive_command_with_yes_proceeds(ws, fake):
    result = fedadmin("--yes", "--json", "abort", "all", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    assert fake.commands() == ["abort"]
    assert [r["target"] for r in one_json(result)["replies"]] == ["server", *SITES]


# ---- deploy --------------------------------------------------------------------------------------


def make_mmar(folder: Path) -> Path:
    """A valid MMAR folder (the console checks an MMAR before it uploads it)."""
    from conftest import copy_mmar

    return copy_mmar(folder)


def test_deploy_of_a_folder_uploads_a_zip_whose_sha256_matches_then_deploys_it(ws, fake):
    mmar = make_mmar(ws.parent / "mmar")
    result = fedadmin("--json", "deploy", str(mmar), "all", kit=ws / "admin")
    assert result.returncode == 0, result.stdout + result.stderr
    ((header, data),) = fake.uploads
    digest = hashlib.sha256(data).hexdigest()
    assert (header.sha256, header.size, header.name) == (digest, len(data), "mmar.zip")
    names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert {"config/config_fed_client.json", "custom/trainer.py"} <= names
    (request,) = fake.requests
    assert request.command == "deploy" and list(request.targets) == ["all"]
    assert json.loads(request.args_json) == {"blob_id": digest}
    report = one_json(result)
    assert (report["blob_id"], report["size"]) == (digest, len(data))


def make_zip(archive: Path) -> Path:
    """A valid MMAR as a zip (the console checks an MMAR before it uploads it)."""
    from conftest import DIGITS

    from fedcommon.safe_zip import zip_folder

    return zip_folder(DIGITS, archive)


def test_deploy_of_a_zip_uploads_it_unchanged(ws, fake):
    archive = make_zip(ws.parent / "mmar.zip")
    result = fedadmin("--json", "deploy", str(archive), "site-1", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    assert fake.uploads[0][1] == archive.read_bytes()


def test_the_console_signs_what_it_uploads_with_its_admin_kit(ws, fake):
    """Signing (issue 22): nothing for the operator to do; the upload carries the admin's signature over the bytes
    sent and its certificate, which the project's CA verifies."""
    from fedcommon.archive_signature import ArchiveSignature, ArchiveVerifier

    archive = make_zip(ws.parent / "mmar.zip")
    result = fedadmin("--json", "deploy", str(archive), "site-1", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    ((header, data),) = fake.uploads
    signature = ArchiveSignature(header.signature, header.signer_certificate)
    assert header.signer_certificate == load_kit(ws / "admin").cert_pem
    verifier = ArchiveVerifier(load_kit(ws / "server").ca_pem)
    assert verifier.verify_digest(signature, hashlib.sha256(data).hexdigest(), len(data), uploader="admin").name == (
        "admin"
    )


def test_deploy_refuses_a_folder_that_is_no_mmar(ws, fake, tmp_path):
    (tmp_path / "empty").mkdir()
    result = fedadmin("deploy", str(tmp_path / "empty"), "all", kit=ws / "admin")
    assert result.returncode == 2
    assert "config/" in result.stderr
    assert fake.uploads == []


# ---- wait and watch ------------------------------------------------------------------------------


SiteState = dict | Callable[[str], dict] | None
STOPPED = {"status": "training stopped", "status_code": 3, "run_number": 1, "progress": {}}


def status_sequence(*server_states: dict, site: SiteState = None, sites: list[SiteState] | None = None) -> Handler:
    """Status replies that step through server_states (the last one repeats); every site answers `site`, or at
    step n `sites[n]` (the last one repeats); a site state may be a function of the site's name."""
    calls = iter(range(10**6))

    def handler(request, context):
        n = next(calls)
        state = server_states[min(n, len(server_states) - 1)]
        own = sites[min(n, len(sites) - 1)] if sites else site
        mine = (lambda t: own(t)) if callable(own) else (lambda t: own or SITE_STATUS)
        return reply(request, lambda t: {**SERVER_STATUS, **state} if t == "server" else mine(t))

    return handler


def test_wait_exits_0_when_the_run_completes(ws, fake):
    fake.handlers["status"] = status_sequence({}, {}, {"run_status": "completed"}, sites=[None, None, STOPPED])
    result = fedadmin("--json", "wait", "--timeout", "30", kit=ws / "admin")
    assert result.returncode == 0, result.stdout + result.stderr
    report = one_json(result)
    assert (report["command"], report["ok"], report["run_status"]) == ("wait", True, "completed")
    assert report["result"] == "run 1 completed"
    assert len(fake.requests) == 3


def test_wait_returns_once_every_site_is_done_with_the_completed_run(ws, fake):
    """Issue 19 item 3: the server's run completed while both sites still show "training started" (their workers
    report final metrics and leave): wait returns only once no site trains the run, so a script's next command
    sees a finished federation."""
    completed = {"run_status": "completed"}
    fake.handlers["status"] = status_sequence(completed, sites=[None, None, None, STOPPED])
    result = fedadmin("--json", "wait", "--timeout", "60", kit=ws / "admin")
    assert result.returncode == 0, result.stdout + result.stderr
    report = one_json(result)
    assert report["result"] == "run 1 completed"
    assert len(fake.requests) == 4
    sites = {r["target"]: r["status"] for r in report["replies"] if r["target"] != "server"}
    assert sites == {"site-1": "training stopped", "site-2": "training stopped"}


def test_wait_exits_1_when_the_run_is_aborted(ws, fake):
    fake.handlers["status"] = status_sequence({}, {"run_status": "aborted"})
    result = fedadmin("--json", "wait", kit=ws / "admin")
    assert result.returncode == 1
    assert one_json(result)["result"] == "run 1 was aborted"


def test_wait_exits_1_when_a_site_reports_a_training_exception(ws, fake):
    failed = {"status": "training exception", "status_code": 4, "run_number": 1, "progress": {}}
    fake.handlers["status"] = status_sequence({}, site=failed)
    result = fedadmin("wait", kit=ws / "admin")
    assert result.returncode == 1
    assert "site-1: training exception in run 1" in result.stdout


def test_wait_exits_1_when_the_server_recorded_a_sites_training_exception(ws, fake):
    ended = {"site-2": {"run_number": 1, "status": "training exception", "exit_code": 1, "error": "CUDA OOM"}}
    fake.handlers["status"] = status_sequence({}, {"training_ended": ended})
    result = fedadmin("--json", "wait", kit=ws / "admin")
    assert result.returncode == 1
    assert one_json(result)["result"] == (
        "site-2: training exception: CUDA OOM in run 1; traceback: `fedadmin logs site-2 --run 1 --level error`"
    )


FAILED = {
    "status": "training exception",
    "status_code": 4,
    "run_number": 1,
    "progress": {},
    "error": "config_train.json: trainer: no module named 'trainerx'",
}
EVERY_SITE_FAILED = {"stalled": True, "failed_sites": {s: FAILED["error"] for s in SITES}}


def test_wait_says_a_run_whose_every_site_failed_is_lost_with_each_error_and_the_commands(ws, fake):
    """Issue 19 item 4: every site of the run failed while the server still counts it as training: wait exits 1
    naming each site's error, the command that shows its traceback, and how to end the run."""
    fake.handlers["status"] = status_sequence(EVERY_SITE_FAILED, site=FAILED)
    result = fedadmin("--json", "wait", "--timeout", "60", kit=ws / "admin")
    assert result.returncode == 1, result.stdout + result.stderr
    said = one_json(result)["result"]
    assert said.startswith("run 1 failed at every site that started it: site-1: config_train.json: trainer: "), said
    for site in SITES:
        assert f"`fedadmin logs {site} --run 1 --level error`" in said
    assert said.endswith("the server still counts it as training: end it with `fedadmin abort server`")


def test_status_says_a_run_whose_every_site_failed_is_lost(ws, fake):
    """Issue 19 item 4: status shows it too, under the server's "training" line; a site still starting the run
    (a worker not registered yet) means it is not lost."""
    fake.handlers["status"] = status_sequence(EVERY_SITE_FAILED, site=FAILED)
    result = fedadmin("status", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "server: run 1 training, round 1 of rounds 0..2"
    assert lines[1].startswith("run 1 failed at every site that started it: site-1:"), result.stdout

    starting = {**FAILED, "status": "training starting", "status_code": 1}
    fake.handlers["status"] = status_sequence(EVERY_SITE_FAILED, site=lambda t: starting if t == "site-2" else FAILED)
    result = fedadmin("status", kit=ws / "admin")
    assert "failed at every site" not in result.stdout


def test_wait_and_status_name_a_server_that_has_not_started_the_run(ws, fake):
    """Issue 19 item 5: `start-mgpu 2 site-1` with the server not started leaves the site "training starting":
    status and wait say the server has not started the run, and how to start it."""
    starting = {"status": "training starting", "status_code": 1, "run_number": 1, "progress": {}}
    deployed = {"run_status": "deployed", "current_round": None, "num_rounds": None, "start_round": None}
    fake.handlers["status"] = status_sequence(deployed, site=starting)
    result = fedadmin("--json", "wait", "--timeout", "2", kit=ws / "admin")
    assert result.returncode == 1
    report = one_json(result)
    assert report["awaiting"] == "server has not started run 1: fedadmin start server"
    assert report["result"] == f"gave up after 2s: the run is deployed; {report['awaiting']}"
    shown = fedadmin("status", kit=ws / "admin")
    assert "waiting: server has not started run 1: fedadmin start server" in shown.stdout.splitlines()


def test_wait_and_status_name_the_sites_a_run_needs_beyond_those_started(ws, fake):
    """Issue 19 item 5: the server trains a run that needs min_num_clients=2 and one site started it: status and
    wait say so and name the site to start."""
    starting = {"status": "training starting", "status_code": 1, "run_number": 1, "progress": {}}
    idle = {"status": "training not started", "status_code": 0, "run_number": None, "progress": {}}
    fake.handlers["status"] = status_sequence(
        {"min_num_clients": 2}, site=lambda t: starting if t == "site-1" else idle
    )
    result = fedadmin("--json", "wait", "--timeout", "2", kit=ws / "admin")
    assert result.returncode == 1
    expected = "run 1 needs min_num_clients=2, 1 site started: fedadmin start site-2"
    assert one_json(result)["awaiting"] == expected
    assert one_json(result)["result"].endswith(expected)
    shown = fedadmin("status", kit=ws / "admin")
    assert f"waiting: {expected}" in shown.stdout.splitlines()


def test_status_shows_the_progress_the_server_kept_when_a_site_reply_has_none(ws, fake):
    kept = {"site-1": {"run_number": 1, "round": 2, "epoch": 7, "loss": 0.25, "metrics": {}}}
    site = {"status": "training started", "status_code": 2, "run_number": 1, "progress": {}}
    fake.handlers["status"] = status_sequence({"site_progress": kept}, site=site)
    result = fedadmin("status", kit=ws / "admin")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "site-1" in line and "training started" in line)
    assert row.split("│")[4:7] == [" 2     ", " 7     ", " 0.2500 "]


def test_wait_gives_up_after_its_timeout_with_exit_1(ws, fake):
    started = time.monotonic()
    result = fedadmin("--json", "wait", "--timeout", "1.5", kit=ws / "admin")
    assert result.returncode == 1
    assert "gave up after 1.5s" in one_json(result)["result"]
    assert time.monotonic() - started < 20


def test_watch_prints_progress_lines_when_stdout_is_not_a_terminal(ws, fake):
    env = python_env()
    env.pop("FEDADMIN_KIT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedadmin.cli", "--kit", str(ws / "admin"), "status", "--watch"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while len(fake.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "site-1: training started, run 1, round 1, epoch 2, loss 0.5000, accuracy=0.9000" in out
    assert out.count("site-1:") == 1  # unchanged lines are not repeated
    assert "server: run 1 training, round 1 of rounds 0..2" in out


# ---- batch ---------------------------------------------------------------------------------------


def test_batch_stops_at_the_first_failure_with_its_exit_code_and_one_json_per_line(ws, fake, tmp_path):
    script = tmp_path / "ops.txt"
    script.write_text("# a comment\n\nstatus\nset-run 2  # trailing comment\nstart site-9\nstatus\n")
    result = fedadmin("--json", "batch", str(script), kit=ws / "admin")
    assert result.returncode == 1, result.stdout + result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["command"], r["ok"]) for r in reports] == [("status", True), ("set-run", True), ("start", False)]
    assert reports[2]["replies"] == [{"target": "site-9", "ok": False, "error": "site-9 is not connected"}]
    assert fake.commands() == ["status", "set-run", "start"]


def test_batch_passes_yes_and_stops_at_a_usage_error_with_exit_2(ws, fake, tmp_path):
    script = tmp_path / "ops.txt"
    script.write_text("abort all\nstart\nstatus\n")
    result = fedadmin("--yes", "batch", str(script), kit=ws / "admin")
    assert result.returncode == 2, result.stdout + result.stderr
    assert fake.commands() == ["abort"]
    assert "ops.txt:2" in result.stderr


def test_batch_without_yes_refuses_a_destructive_line(ws, fake, tmp_path):
    script = tmp_path / "ops.txt"
    script.write_text("status\nabort all\n")
    result = fedadmin("batch", str(script), kit=ws / "admin")
    assert result.returncode == 2
    assert fake.commands() == ["status"]


# ---- what the console imports --------------------------------------------------------------------


def test_status_imports_neither_numpy_nor_torch(ws, fake):
    code = (
        "import sys\n"
        "from fedadmin.cli import main\n"
        f"code = main(['--kit', {str(ws / 'admin')!r}, '--json', 'status'], standalone_mode=False)\n"
        "print([m for m in ('numpy', 'torch') if m in sys.modules], code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[0])["ok"] is True
    assert lines[-1] == "[] None"


def test_metrics_and_logs_import_neither_numpy_torch_nor_the_optional_extras(ws, fake):
    heavy = ("numpy", "torch", "matplotlib", "prometheus_client", "logging.handlers")
    code = (
        "import sys\n"
        "from fedadmin.cli import main\n"
        f"for args in (['metrics'], ['logs', 'site-1', '-n', '5']):\n"
        f"    main(['--kit', {str(ws / 'admin')!r}, '--json', *args], standalone_mode=False)\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stdout.strip().splitlines()
    assert [json.loads(line)["command"] for line in lines[:-1]] == ["metrics", "logs"]
    assert lines[-1] == "[]"
    assert fake.commands() == ["metrics", "logs"]


def test_the_fake_server_is_really_mutual_tls(ws, fake):
    """A plaintext client cannot talk to it: the console's successes above are over TLS."""
    target = load_kit(ws / "admin").admin_target
    with grpc.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.Execute(admin_pb2.CommandRequest(command="status"), timeout=5)
    assert fake.requests == []

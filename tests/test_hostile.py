"""Hostile input against a provisioned federation of real processes: each case refused, named, audited, survived.

One federation (server + three site agents from `fedadmin provision`) serves the whole module; every
test ends by checking that the server and the agents still answer.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, free_port, run_fedadmin
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.pki import issue_cert, write_pem_cert, write_private_key
from fedcommon.wire import admin_pb2 as apb
from fedcommon.wire import admin_pb2_grpc as admin_grpc
from fedcommon.wire import training_pb2 as tpb

pytestmark = pytest.mark.e2e

SITES = {"hospital-a": "org-a", "hospital-b": "org-b", "hospital-c": "org-a"}
ADMINS = {
    "root@consortium": ("consortium", "project_admin"),
    "alice@org-a": ("org-a", "org_admin"),
    "bob@org-b": ("org-b", "lead"),
    "carol@org-a": ("org-a", "member"),
    "mallory@org-b": ("org-b", "lead"),
}


def project_yaml(name: str, fl_port: int, admin_port: int, sites: dict, admins: dict) -> str:
    lines = [
        f"project: {name}",
        "server:",
        "  host: 127.0.0.1",
        f"  fl_port: {fl_port}",
        f"  admin_port: {admin_port}",
        "sites:",
    ]
    lines += [f"  - name: {site}\n    org: {org}" for site, org in sites.items()]
    lines.append("admins:")
    lines += [f"  - name: {admin}\n    org: {org}\n    role: {role}" for admin, (org, role) in admins.items()]
    return "\n".join(lines) + "\n"


def fedadmin(*args: str, kit: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_fedadmin(*args, kit=kit, timeout=timeout)


def provision(yml: Path, out: Path, *extra: str) -> dict:
    done = fedadmin("--json", "provision", str(yml), "--out", str(out), *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Federation:
    out: Path
    yml: Path
    revoked: set[str] = field(default_factory=set)  # sites a test revoked: no longer expected to answer

    def kit(self, name: str) -> Path:
        return self.out / name

    def run(self, admin: str, *args: str) -> subprocess.CompletedProcess[str]:
        return fedadmin("--json", *args, kit=self.kit(admin))

    def audit(self, where: str = "server") -> list[dict]:
        path = self.out / where / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def fl_target(self) -> str:
        return load_kit(self.kit("server")).fl_target

    def admin_target(self) -> str:
        return load_kit(self.kit("server")).admin_target

    def assert_alive(self) -> None:
        """The server answers and every site agent that is not revoked replies to status."""
        done = self.run("root@consortium", "status", *sorted(set(SITES) - self.revoked))
        out = json.loads(done.stdout)
        answered = {r["target"] for r in out["replies"] if r["ok"]}
        assert set(SITES) - self.revoked <= answered, done.stdout + done.stderr


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Federation:
    root = tmp_path_factory.mktemp("hostile")
    yml = root / "project.yml"
    yml.write_text(project_yaml("hostile", free_port(), free_port(), SITES, ADMINS))
    out = root / "out"
    provision(yml, out)
    started = fedadmin("poc", "start", "--workspace", str(out), timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield Federation(out, yml)
    finally:
        fedadmin("poc", "stop", "--workspace", str(out), timeout=120)


# ---- identity: TLS and certificates --------------------------------------------------------------


def _channel(fed: Federation, creds: grpc.ChannelCredentials, target: str | None = None) -> grpc.Channel:
    return grpc.secure_channel(target or fed.admin_target(), creds)


def test_tls_without_a_client_certificate_is_refused_at_the_handshake(fed):
    ca = (fed.kit("server") / "startup" / "rootCA.pem").read_bytes()
    for target in (fed.admin_target(), fed.fl_target()):
        with _channel(fed, grpc.ssl_channel_credentials(root_certificates=ca), target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                admin_grpc.AdminServiceStub(channel).Execute(apb.CommandRequest(command="status"), timeout=5)
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    fed.assert_alive()


def test_a_kit_from_another_project_is_refused_with_a_clear_message(fed, tmp_path):
    yml = tmp_path / "other.yml"
    kit = load_kit(fed.kit("server"))
    yml.write_text(
        project_yaml(
            "other",
            kit.fl_port,
            kit.admin_port,
            {"hospital-a": "org-a"},
            {"root@consortium": ("consortium", "project_admin")},
        )
    )
    provision(yml, tmp_path / "other")
    done = fedadmin("status", kit=tmp_path / "other" / "root@consortium")
    assert done.returncode == 3
    assert "TLS handshake failed" in done.stderr
    assert "Traceback" not in done.stderr
    fed.assert_alive()


def _expired_admin_kit(fed: Federation, dest: Path) -> Path:
    ca_cert = x509.load_pem_x509_certificate((fed.out / "ca" / "rootCA.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((fed.out / "ca" / "rootCA.key").read_bytes(), None)
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    cert, key = issue_cert(
        ca_cert,
        ca_key,
        "root@consortium",
        "admin",
        admin_role="project_admin",
        org="consortium",
        not_before=long_ago,
        valid_days=1,
    )
    startup = dest / "startup"
    startup.mkdir(parents=True)
    for name in ("rootCA.pem", "fed.json"):
        (startup / name).write_bytes((fed.kit("root@consortium") / "startup" / name).read_bytes())
    write_pem_cert(startup / "cert.pem", cert)
    write_private_key(startup / "key.pem", key)
    return dest


def test_a_kit_whose_key_is_not_its_certificates_is_named_when_the_connection_fails(fed, tmp_path):
    kit_dir = tmp_path / "swapped"
    shutil.copytree(fed.kit("root@consortium"), kit_dir)
    (kit_dir / "startup" / "key.pem").write_bytes((fed.kit("hospital-a") / "startup" / "key.pem").read_bytes())
    done = fedadmin("status", kit=kit_dir)
    assert done.returncode == 3
    assert "cannot use the admin kit" in done.stderr and "private key does not match the certificate" in done.stderr
    assert "Traceback" not in done.stderr
    fed.assert_alive()


def test_an_expired_certificate_is_refused_by_the_console_and_by_the_server(fed, tmp_path):
    kit_dir = _expired_admin_kit(fed, tmp_path / "expired")
    done = fedadmin("status", kit=kit_dir)
    assert done.returncode == 3 and "expired on" in done.stderr, done.stderr
    # Past the console's own check, straight at the server: the TLS layer refuses it.
    startup = kit_dir / "startup"
    creds = grpc.ssl_channel_credentials(
        (startup / "rootCA.pem").read_bytes(), (startup / "key.pem").read_bytes(), (startup / "cert.pem").read_bytes()
    )
    with _channel(fed, creds) as channel:
        with pytest.raises(grpc.RpcError) as e:
            admin_grpc.AdminServiceStub(channel).Execute(apb.CommandRequest(command="status"), timeout=5)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    fed.assert_alive()


def test_a_site_certificate_cannot_use_the_admin_port_nor_an_admin_one_register_as_a_site(fed):
    site = load_kit(fed.kit("hospital-a"))
    with _channel(fed, channel_credentials(site)) as channel:
        with pytest.raises(grpc.RpcError) as e:
            admin_grpc.AdminServiceStub(channel).Execute(apb.CommandRequest(command="status"), timeout=5)
    assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "may not use the admin_port" in e.value.details()
    admin = load_kit(fed.kit("root@consortium"))
    with _channel(fed, channel_credentials(admin), fed.fl_target()) as channel:
        with pytest.raises(grpc.RpcError) as e:
            TrainingStub(channel).Register(tpb.RegisterRequest(client_name="root@consortium"), timeout=5)
    assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "may not use the fl_port" in e.value.details()
    refused = [e for e in fed.audit() if e.get("event") == "refused_connection"]
    assert {(e["peer"], e["port"]) for e in refused} >= {("hospital-a", "admin_port"), ("root@consortium", "fl_port")}
    fed.assert_alive()


# ---- authorization: server roles and a site's own policy ----------------------------------------


def _refusal(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is False
    return out.get("error") or " ".join(r.get("error", "") for r in out.get("replies", []))


def test_a_member_may_look_but_not_start_or_shell(fed):
    assert fed.run("carol@org-a", "status").returncode == 0
    for args in (("start", "all"), ("shell", "hospital-a", "ls")):
        error = _refusal(fed.run("carol@org-a", *args))
        assert "member 'carol@org-a' may not run" in error and "rule member." in error
    entries = [e for e in fed.audit() if e.get("admin") == "carol@org-a" and not e["ok"]]
    assert {e["command"] for e in entries} >= {"start", "shell"}
    assert all(e["role"] == "member" and e["org"] == "org-a" and "rule member." in e["error"] for e in entries)
    fed.assert_alive()


def test_an_org_admin_reaches_its_own_orgs_sites_only(fed):
    done = fed.run("alice@org-a", "shell", "hospital-a", "pwd")
    assert done.returncode == 0, done.stdout + done.stderr
    error = _refusal(fed.run("alice@org-a", "shell", "hospital-b", "pwd"))
    assert "rule org_admin.shell = own_org" in error and "hospital-b (org org-b)" in error
    error = _refusal(fed.run("alice@org-a", "--yes", "shutdown", "server"))
    assert "the server" in error
    last = [e for e in fed.audit() if e.get("admin") == "alice@org-a"]
    assert [e["ok"] for e in last[-3:]] == [True, False, False]
    fed.assert_alive()


def test_a_sites_local_policy_refuses_what_the_server_allowed_and_both_audit_it(fed):
    policy = fed.out / "hospital-b" / "local" / "authorization.json"
    policy.parent.mkdir(exist_ok=True)
    policy.write_text(
        json.dumps({"rules": [{"name": "no-shell-for-outsiders", "deny": ["shell"], "except_orgs": ["org-b"]}]})
    )
    try:
        error = _refusal(fed.run("root@consortium", "shell", "hospital-b", "ls"))
        assert "hospital-b: refused by local/authorization.json rule 'no-shell-for-outsiders'" in error
        assert fed.run("bob@org-b", "shell", "hospital-b", "ls").returncode == 0
    finally:
        policy.unlink()
    site_audit = fed.audit("hospital-b")
    refused = [e for e in site_audit if e["command"] == "shell" and not e["ok"]]
    assert refused and refused[-1]["admin"] == "root@consortium" and refused[-1]["role"] == "project_admin"
    assert "no-shell-for-outsiders" in refused[-1]["error"]
    fed.assert_alive()


def test_the_audit_log_is_read_back_through_shell(fed):
    fed.run("bob@org-b", "sysinfo", "hospital-b")
    done = fed.run("bob@org-b", "shell", "hospital-b", "cat", "audit.log")
    assert done.returncode == 0, done.stdout + done.stderr
    stdout = json.loads(done.stdout)["replies"][0]["stdout"]
    entries = [json.loads(line) for line in stdout.splitlines()]
    assert any(e["admin"] == "bob@org-b" and e["command"] == "sysinfo" and e["role"] == "lead" for e in entries)
    assert all({"time", "admin", "role", "org", "command", "ok"} <= e.keys() for e in entries)


# ---- revocation ---------------------------------------------------------------------------------


def test_a_revoked_admin_and_site_are_refused_at_once_and_no_other_kit_changes(fed):
    assert fed.run("mallory@org-b", "status").returncode == 0
    others = [p for p in fed.out.iterdir() if p.is_dir() and p.name not in ("ca", "server")]
    before = {p.name: tree_digest(p / "startup") for p in others}
    provision(fed.yml, fed.out, "--revoke", "mallory@org-b", "--revoke", "hospital-c")
    fed.revoked.add("hospital-c")
    assert {p.name: tree_digest(p / "startup") for p in others} == before

    done = fedadmin("status", kit=fed.kit("mallory@org-b"))
    assert done.returncode == 3
    assert "revoked" in done.stderr and "Traceback" not in done.stderr
    # The server checks the revocation list every second and releases the revoked site's long-poll; its agent's
    # next long-poll is refused.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        refused = {
            (e["peer"], e["port"])
            for e in fed.audit()
            if e.get("event") == "refused_connection" and "revoked" in e["error"]
        }
        if ("hospital-c", "fl_port") in refused:
            break
        time.sleep(0.5)
    assert ("mallory@org-b", "admin_port") in refused
    assert ("hospital-c", "fl_port") in refused
    # Shut out at once: not connected, so commands do not wait out their timeout for its reply.
    server = json.loads(fed.run("root@consortium", "status", "server").stdout)["replies"][0]
    assert "hospital-c" not in server["connected_sites"] and "hospital-a" in server["connected_sites"]
    fed.assert_alive()


# ---- shell: hostile arguments through a real agent ----------------------------------------------


def _shell(fed: Federation, *argv: str) -> tuple[int, dict]:
    done = fed.run("root@consortium", "shell", "hospital-a", *argv)
    out = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, out


@pytest.mark.parametrize(
    "argv, says",
    [
        (["cat", "log.txt; touch PWNED"], "shell syntax"),
        (["cat", "log.txt|touch PWNED"], "shell syntax"),
        (["cat", "$(touch PWNED)"], "shell syntax"),
        (["cat", "`touch PWNED`"], "shell syntax"),
        (["cat", "../server/startup/fed.json"], "outside the workspace"),
        (["cat", "/etc/passwd"], "outside the workspace"),
        (["cat", "startup/key.pem"], "cannot be read"),
        (["ls", "-la", "--color=always"], "not allowed"),
        (["grep", "-r", "PRIVATE", "/"], "outside the workspace"),
    ],
)
def test_hostile_shell_arguments_are_refused_naming_the_reason(fed, argv, says):
    code, out = _shell(fed, *argv)
    assert code == 1 and says in json.dumps(out), out
    assert not (fed.out / "hospital-a" / "PWNED").exists() and not (ROOT / "PWNED").exists()
    fed.assert_alive()


def test_a_symlink_out_of_the_workspace_and_a_huge_file_are_handled(fed):
    site = fed.out / "hospital-a"
    link = site / "escape"
    link.symlink_to(fed.out / "server" / "startup")
    big = site / "big.txt"
    with open(big, "w") as f:
        f.write(("x" * 1023 + "\n") * (3 << 10))  # 3 MiB
    try:
        code, out = _shell(fed, "cat", "escape/fed.json")
        assert code == 1 and "outside the workspace" in json.dumps(out)
        code, out = _shell(fed, "cat", "big.txt")
        assert code == 0
        data = out["replies"][0]
        assert data["truncated"] is True and len(data["stdout"]) <= 1 << 20
    finally:
        link.unlink()
        big.unlink()
    fed.assert_alive()


# ---- malformed and oversized input on the wire --------------------------------------------------


def test_an_oversized_message_and_malformed_protobuf_are_refused_and_the_server_stays_up(fed):
    admin = load_kit(fed.kit("root@consortium"))
    with _channel(fed, channel_credentials(admin)) as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Execute(apb.CommandRequest(command="status", args_json="x" * (9 << 20)), timeout=10)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        raw = channel.unary_unary("/fedlearn.v1.AdminService/Execute")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff\x0f\x12", timeout=10)
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    site = load_kit(fed.kit("hospital-a"))
    with _channel(fed, channel_credentials(site), fed.fl_target()) as channel:
        raw = channel.unary_unary("/fedlearn.v1.FederatedTraining/Register")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\x0a\xff\xff\xff\xff\xff", timeout=10)
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    fed.assert_alive()


def test_private_keys_never_reach_a_log_or_the_audit(fed):
    fed.assert_alive()
    texts = [
        p.read_text(errors="replace")
        for p in fed.out.rglob("*")
        if p.is_file() and p.name in ("log.txt", "console.txt", "audit.log")
    ]
    assert texts
    assert not any("PRIVATE KEY" in t for t in texts)
    for key in fed.out.rglob("key.pem"):
        assert os.stat(key).st_mode & 0o777 == 0o600

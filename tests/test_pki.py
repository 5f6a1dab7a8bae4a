"""Tests for fedcommon.pki: certificate fields, key files, and the proof-of-concept workspace layout."""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcommon import pki
from fedcommon import provision as provisioning

KIT_FILES = {"cert.pem", "key.pem", "rootCA.pem", "fed.json"}


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return pki.create_ca("trial")


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _san(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_a_self_signed_p256_ca_valid_for_ten_years(ca):
    cert, key = ca
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    cert.verify_directly_issued_by(cert)
    assert isinstance(key.curve, ec.SECP256R1)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3651)


def test_server_cert_is_for_server_auth_with_localhost_and_named_host_sans(ca):
    cert, key = pki.issue_cert(*ca, "server", "server", host="fl.example.org")
    assert _cn(cert) == "server"
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    dns, ips = _san(cert)
    assert set(dns) == {"localhost", "fl.example.org"}
    assert ips == ["127.0.0.1"]
    assert isinstance(key.curve, ec.SECP256R1)
    cert.verify_directly_issued_by(ca[0])


def test_server_cert_for_an_ip_host_gets_that_ip_san(ca):
    cert, _ = pki.issue_cert(*ca, "server", "server", host="10.1.2.3")
    dns, ips = _san(cert)
    assert dns == ["localhost"]
    assert set(ips) == {"127.0.0.1", "10.1.2.3"}


def test_server_cert_for_loopback_host_does_not_repeat_sans(ca):
    cert, _ = pki.issue_cert(*ca, "server", "server", host="127.0.0.1")
    assert _san(cert) == (["localhost"], ["127.0.0.1"])


def test_site_cert_is_for_client_auth_named_by_cn_and_signed_by_ca(ca):
    cert, key = pki.issue_cert(*ca, "site-1", "client")
    assert _cn(cert) == "site-1"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.issuer == ca[0].subject
    cert.verify_directly_issued_by(ca[0])
    assert cert.not_valid_after_utc <= ca[0].not_valid_after_utc


def test_admin_cert_carries_its_role_in_organizational_unit(ca):
    cert, _ = pki.issue_cert(*ca, "admin", "admin", admin_role="project_admin")
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in ou] == ["project_admin"]


def _subject(cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    return tuple(
        [a.value for a in cert.subject.get_attributes_for_oid(oid)]
        for oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME)
    )


@pytest.mark.parametrize(
    ("name", "role", "kwargs", "org", "ou"),
    [
        ("server", "server", {}, "trial", "server"),
        ("site-1", "client", {}, "trial", "client"),
        ("site-1", "client", {"org": "hospital-a"}, "hospital-a", "client"),
        ("bob@b", "admin", {"org": "hospital-b", "admin_role": "lead"}, "hospital-b", "lead"),
    ],
)
def test_every_cert_names_its_org_and_role_defaulting_org_to_the_project(ca, name, role, kwargs, org, ou):
    cert, _ = pki.issue_cert(*ca, name, role, **kwargs)
    assert _subject(cert) == ([name], [org], [ou])


def test_issue_cert_honours_not_before_and_valid_days(ca):
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert, _ = pki.issue_cert(*ca, "site-1", "client", valid_days=2, not_before=start)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == start + datetime.timedelta(days=2)


def test_issue_cert_never_outlives_its_ca(ca):
    cert, _ = pki.issue_cert(*ca, "site-1", "client", valid_days=5000)
    assert cert.not_valid_after_utc == ca[0].not_valid_after_utc


def test_write_crl_lists_the_revoked_serials_signed_by_the_ca(tmp_path, ca):
    path = tmp_path / "crl.pem"
    pki.write_crl(path, *ca, [17, 5, 17])
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.is_signature_valid(ca[0].public_key())
    assert crl.issuer == ca[0].subject
    assert sorted(r.serial_number for r in crl) == [5, 17]
    assert crl.next_update_utc == ca[0].not_valid_after_utc
    pki.write_crl(path, *ca, [])
    assert len(x509.load_pem_x509_crl(path.read_bytes())) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["crl.pem"]


def test_cert_from_another_ca_does_not_verify(ca):
    other_cert, other_key = pki.create_ca("trial")
    cert, _ = pki.issue_cert(other_cert, other_key, "site-1", "client")
    with pytest.raises(Exception):  # noqa: B017 - InvalidSignature or ValueError, both mean "not ours"
        cert.verify_directly_issued_by(ca[0])


@pytest.mark.parametrize(
    ("name", "role", "kwargs", "fragment"),
    [
        ("admin", "admin", {}, "admin_role"),
        ("admin", "admin", {"admin_role": "root"}, "admin_role"),
        ("site-1", "client", {"admin_role": "member"}, "only for admin"),
        ("site-1", "client", {"host": "x.org"}, "only for the server"),
        ("site-1", "worker", {}, "role 'worker'"),
        ("site-1", "client", {"org": "a b"}, "organization"),
        ("site 1", "client", {}, "participant name"),
        ("server", "server", {"host": "https://x.org:8002"}, "neither an IP address nor a DNS name"),
    ],
)
def test_issue_cert_rejects_bad_input_with_a_reason(ca, name, role, kwargs, fragment):
    with pytest.raises(pki.PkiError, match=fragment):
        pki.issue_cert(*ca, name, role, **kwargs)


def test_write_private_key_creates_0600_even_under_a_permissive_umask(tmp_path, ca):
    old = os.umask(0)
    try:
        pki.write_private_key(tmp_path / "key.pem", ca[1])
    finally:
        os.umask(old)
    assert _mode(tmp_path / "key.pem") == 0o600
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "key.pem").read_bytes()


def test_write_private_key_never_overwrites(tmp_path, ca):
    target = tmp_path / "key.pem"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        pki.write_private_key(target, ca[1])
    assert target.read_bytes() == b"keep me"


def _prepare(workspace: Path, clients: int = 2, **overrides) -> list[str]:
    args = {"host": "127.0.0.1", "fl_port": 8002, "admin_port": 8003, "project": "trial", "force": False}
    args.update(overrides)
    return provisioning.prepare_poc(workspace, clients, **args)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_poc_lays_out_ca_and_one_private_kit_per_participant(tmp_path):
    ws = tmp_path / "ws"
    names = _prepare(ws, clients=3)
    assert names == ["server", "site-1", "site-2", "site-3", "admin"]
    assert sorted(p.name for p in ws.iterdir()) == sorted([*names, "ca"])
    assert {p.name for p in (ws / "ca").iterdir()} == {"rootCA.pem", "rootCA.key", "state.json", "crl.pem"}
    assert _mode(ws / "ca") == 0o700
    assert _mode(ws / "ca" / "rootCA.key") == 0o600
    state = json.loads((ws / "ca" / "state.json").read_text())
    assert [(p["name"], p["kind"], p["org"], p["role"]) for p in state["participants"]] == [
        ("server", "server", "trial", "server"),
        ("site-1", "client", "trial", "client"),
        ("site-2", "client", "trial", "client"),
        ("site-3", "client", "trial", "client"),
        ("admin", "admin", "trial", "project_admin"),
    ]
    ca_cert = x509.load_pem_x509_certificate((ws / "ca" / "rootCA.pem").read_bytes())
    for name in names:
        startup = ws / name / "startup"
        assert {p.name for p in startup.iterdir()} == (KIT_FILES | {"crl.pem"} if name == "server" else KIT_FILES)
        assert _mode(ws / name) == 0o700
        assert _mode(startup) == 0o700
        assert _mode(startup / "key.pem") == 0o600
        assert (startup / "rootCA.pem").read_bytes() == (ws / "ca" / "rootCA.pem").read_bytes()
        cert = x509.load_pem_x509_certificate((startup / "cert.pem").read_bytes())
        assert _cn(cert) == name
        cert.verify_directly_issued_by(ca_cert)


def test_prepare_poc_writes_fed_json_with_role_project_and_server_address(tmp_path):
    ws = tmp_path / "ws"
    _prepare(ws, clients=1, host="fl.example.org", fl_port=9000, admin_port=9001)
    server = {"host": "fl.example.org", "fl_port": 9000, "admin_port": 9001}
    assert json.loads((ws / "site-1" / "startup" / "fed.json").read_text()) == {
        "name": "site-1",
        "role": "client",
        "project": "trial",
        "org": "trial",
        "server": server,
    }
    assert json.loads((ws / "server" / "startup" / "fed.json").read_text())["role"] == "server"
    admin = json.loads((ws / "admin" / "startup" / "fed.json").read_text())
    assert admin["role"] == "admin"
    assert admin["admin_role"] == "project_admin"
    server_cert = x509.load_pem_x509_certificate((ws / "server" / "startup" / "cert.pem").read_bytes())
    assert "fl.example.org" in _san(server_cert)[0]


def test_prepare_poc_refuses_a_workspace_with_a_kit_and_changes_nothing(tmp_path):
    ws = tmp_path / "ws"
    _prepare(ws)
    before = _snapshot(ws)
    with pytest.raises(pki.PkiError, match="--force"):
        _prepare(ws)
    assert _snapshot(ws) == before
    assert not [p for p in ws.iterdir() if p.name.startswith(".")]


def test_prepare_poc_force_replaces_ca_and_stale_kits_but_keeps_other_files(tmp_path):
    ws = tmp_path / "ws"
    _prepare(ws, clients=3)
    old_ca = (ws / "ca" / "rootCA.pem").read_bytes()
    (ws / "site-1" / "run_1").mkdir()
    (ws / "site-1" / "run_1" / "log.txt").write_text("training log")
    _prepare(ws, clients=2, force=True)
    assert (ws / "ca" / "rootCA.pem").read_bytes() != old_ca
    assert (ws / "site-1" / "startup" / "rootCA.pem").read_bytes() == (ws / "ca" / "rootCA.pem").read_bytes()
    assert not (ws / "site-3" / "startup").exists()
    assert (ws / "site-1" / "run_1" / "log.txt").read_text() == "training log"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"clients": 0}, "clients"),
        ({"fl_port": 0}, "fl_port"),
        ({"admin_port": 70000}, "admin_port"),
        ({"fl_port": 8003}, "must differ"),
        ({"host": "0.0.0.0"}, "bind-all"),
        ({"host": "fl.example.org:8002"}, "neither an IP address nor a DNS name"),
        ({"project": ""}, "project name"),
    ],
)
def test_prepare_poc_rejects_bad_input_before_writing_anything(tmp_path, overrides, fragment):
    ws = tmp_path / "ws"
    clients = overrides.pop("clients", 2)
    with pytest.raises(pki.PkiError, match=fragment):
        _prepare(ws, clients=clients, **overrides)
    assert not ws.exists()


def test_check_host_accepts_names_and_addresses():
    for host in ("localhost", "fl.example.org", "10.0.0.1", "::1"):
        assert pki.check_host(host) == host

"""fedserver.crypto_child: the server's kit, CRL and archive-signature checks give in a child process what they give
in-process, a child that cannot run refuses, and a running server never loads cryptography."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import copy_mmar, prepare_workspace, run_fedadmin, server_process
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from signing import signature_of
from test_admin_agent import _agent_process

from fedcommon.archive_signature import ArchiveSignature, ArchiveVerifier, SignatureError
from fedcommon.kit import KitError, load_kit, load_participant_kit
from fedcommon.pki import create_ca, write_crl
from fedcommon.revocation import RevocationError, load_crl
from fedserver import crypto_child


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return prepare_workspace(tmp_path_factory.mktemp("crypto") / "ws", clients=1)


def _ca(ws: Path):
    cert = x509.load_pem_x509_certificate((ws / "ca" / "rootCA.pem").read_bytes())
    return cert, serialization.load_pem_private_key((ws / "ca" / "rootCA.key").read_bytes(), None)


def _refusal(call) -> tuple[type, str, bool]:
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value), getattr(info.value, "permission", False)


def test_the_kit_check_in_a_child_is_load_participant_kits(ws, tmp_path):
    kit = crypto_child.KitCheck(load_kit(ws / "server", check_certificates=False), "server", "fedserver start").kit()
    assert kit == load_participant_kit(ws / "server", "server", "fedserver start")
    site = load_kit(ws / "site-1", check_certificates=False)
    refused = _refusal(lambda: crypto_child.KitCheck(site, "server", "fedserver start").kit())
    assert refused == _refusal(lambda: load_participant_kit(ws / "site-1", "server", "fedserver start"))
    assert refused[0] is KitError and "needs the server's kit" in refused[1]
    mixed = shutil.copytree(ws / "server", tmp_path / "server")
    shutil.copy(prepare_workspace(tmp_path / "other", clients=1) / "ca" / "rootCA.pem", mixed / "startup")
    kit = load_kit(mixed, check_certificates=False)
    refused = _refusal(lambda: crypto_child.KitCheck(kit, "server", "fedserver start").kit())
    assert refused == _refusal(lambda: load_participant_kit(mixed, "server", "fedserver start"))
    assert "not issued by the CA" in refused[1]


def test_the_crl_the_kit_check_read_is_not_read_again_unless_it_changed(ws, monkeypatch):
    monkeypatch.setattr(crypto_child, "_checked_crls", {})
    kit = crypto_child.KitCheck(load_kit(ws / "server", check_certificates=False), "server", "fedserver start").kit()
    crl = ws / "server" / "startup" / "crl.pem"
    monkeypatch.setattr(crypto_child.sys, "executable", "/bin/false")  # from here on, no child can check
    st = os.stat(crl)
    os.utime(crl, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # changed since the kit check
    with pytest.raises(RevocationError, match="failed in its own process"):
        crypto_child.load_crl(crl, kit.ca_pem)
    os.utime(crl, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert crypto_child.load_crl(crl, kit.ca_pem) == load_crl(crl, kit.ca_pem)  # the kit check's answer
    with pytest.raises(RevocationError, match="failed in its own process"):
        crypto_child.load_crl(crl, kit.ca_pem)  # taken once: a reload checks again


def test_the_crl_check_in_a_child_is_load_crls(ws, tmp_path):
    ca, key = _ca(ws)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    write_crl(tmp_path / "crl.pem", ca, key, [5, (1 << 150) + 3])
    assert crypto_child.load_crl(tmp_path / "crl.pem", ca_pem) == load_crl(tmp_path / "crl.pem", ca_pem)
    other, other_key = create_ca("other")
    write_crl(tmp_path / "forged.pem", other, other_key, [])
    (tmp_path / "junk.pem").write_text("junk")
    for name in ("forged.pem", "junk.pem", "missing.pem"):
        refused = _refusal(lambda n=name: crypto_child.load_crl(tmp_path / n, ca_pem))
        assert refused == _refusal(lambda n=name: load_crl(tmp_path / n, ca_pem))
        assert refused[0] is RevocationError


def test_archive_signatures_checked_in_a_child_give_the_in_process_answers(ws, tmp_path):
    ca_pem = (ws / "server" / "startup" / "rootCA.pem").read_bytes()
    data = b"an archive"
    good = signature_of(ws / "admin", data)
    site = signature_of(ws / "site-1", data)  # a site's certificate: not an admin's
    admin = load_kit(ws / "admin")
    serial = x509.load_pem_x509_certificate(admin.cert_pem).serial_number
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    (tmp_path / "a.zip").write_bytes(data)
    for revoked in (frozenset(), frozenset({serial})):
        child = crypto_child.ChildArchiveVerifier(ca_pem, lambda r=revoked: r)
        local = ArchiveVerifier(ca_pem, revoked.__contains__)
        cases = [
            lambda v: v.check_signer(good, admin.name),
            lambda v: v.check_signer(good, "someone-else"),
            lambda v: v.check_signer(None),
            lambda v: v.check_signer(site),
            lambda v: v.check_signer(ArchiveSignature(b"x", b"not a certificate")),
            lambda v: v.verify_digest(good, digest, size),
            lambda v: v.verify_digest(good, digest, size + 1),
            lambda v: v.verify_file(tmp_path / "a.zip", good),
        ]
        for case in cases:
            try:
                expected = case(local)
            except SignatureError:
                assert _refusal(lambda c=case, v=child: c(v)) == _refusal(lambda c=case, v=local: c(v))
            else:
                assert case(child) == expected and not revoked


def test_a_check_that_cannot_run_refuses(ws, monkeypatch):
    monkeypatch.setattr(crypto_child, "_checked_crls", {})
    ca_pem = (ws / "server" / "startup" / "rootCA.pem").read_bytes()
    good = signature_of(ws / "admin", b"data")
    monkeypatch.setattr(crypto_child.sys, "executable", "/bin/false")
    kind, message, permission = _refusal(
        lambda: crypto_child.ChildArchiveVerifier(ca_pem, frozenset).check_signer(good)
    )
    assert kind is SignatureError and "failed in its own process" in message and not permission
    monkeypatch.setattr(crypto_child.sys, "executable", str(ws / "no-such-python"))
    kind, message, _ = _refusal(lambda: crypto_child.load_crl(ws / "server" / "startup" / "crl.pem", ca_pem))
    assert kind is RevocationError and "could not run" in message


def test_a_signature_accepted_lately_is_accepted_again_without_a_child_while_nothing_that_counts_changed(
    ws, monkeypatch
):
    ca_pem = (ws / "server" / "startup" / "rootCA.pem").read_bytes()
    data = b"an archive"
    good = signature_of(ws / "admin", data)
    admin = load_kit(ws / "admin")
    serial = x509.load_pem_x509_certificate(admin.cert_pem).serial_number
    digest = hashlib.sha256(data).hexdigest()
    revoked: set[int] = set()
    verifier = crypto_child.ChildArchiveVerifier(ca_pem, lambda: frozenset(revoked))
    signer = verifier.verify_digest(good, digest, len(data), admin.name)  # a child checks it
    monkeypatch.setattr(crypto_child.sys, "executable", "/bin/false")  # from here on, no child can check
    assert verifier.verify_digest(good, digest, len(data)) == signer
    assert verifier.check_signer(good, admin.name) == signer  # the bytes' check included the signer's
    with pytest.raises(SignatureError, match="failed in its own process"):
        verifier.verify_digest(good, digest, len(data) + 1)  # other bytes: checked again
    later = time.time() + 20 * 365 * 86400
    monkeypatch.setattr(crypto_child.time, "time", lambda: later)  # the certificates have expired by then
    with pytest.raises(SignatureError, match="failed in its own process"):
        verifier.check_signer(good)
    monkeypatch.undo()  # children run again
    with pytest.raises(SignatureError, match="not by the uploading admin") as other:
        verifier.check_signer(good, "someone-else")  # refused in the child's own words
    assert other.value.permission
    revoked.add(serial)
    with pytest.raises(SignatureError, match="revoked"):
        verifier.verify_digest(good, digest, len(data))


@pytest.mark.e2e
def test_a_server_that_served_a_site_and_a_signed_deploy_never_loaded_cryptography(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    mmar = copy_mmar(tmp_path / "mmar", server={"min_num_clients": 1})
    with server_process(ws / "server") as server:
        agent, lines = _agent_process(ws / "site-1")
        processes.append(agent)
        deadline = time.monotonic() + 60
        while "fedclient agent site-1 started\n" not in lines:
            assert time.monotonic() < deadline and agent.poll() is None, "the agent never said it started"
            time.sleep(0.05)
        assert run_fedadmin("set-run", "1", kit=ws / "admin").returncode == 0
        deployed = run_fedadmin("--json", "deploy", str(mmar), "all", kit=ws / "admin")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        replies = {r["target"]: r for r in json.loads(deployed.stdout)["replies"]}
        assert replies["server"]["ok"] and replies["site-1"]["ok"], replies
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "cryptography" not in maps, [line for line in maps.splitlines() if "cryptography" in line][:3]

"""Signed MMAR archives: what a signature binds, whom a verifier trusts, and the server refusing what is not signed by
an admin of its project, at upload and again at deploy, each refusal audited and nothing kept."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from conftest import copy_mmar, prepare_workspace
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from signing import signature_of, signed_header, signed_upload
from test_admin_server import FakeAgent

from fedcommon.archive_signature import (
    MAX_CERTIFICATE_BYTES,
    PURPOSE,
    ArchiveSignature,
    ArchiveVerifier,
    SignatureError,
    sign_digest,
    statement,
)
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.pki import create_ca, issue_cert, write_crl, write_pem_cert, write_private_key
from fedcommon.wire import admin_pb2 as apb
from fedcommon.wire import admin_pb2_grpc as admin_grpc
from fedserver.server import FederationServer


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca(ws: Path):
    """The POC workspace's CA: (certificate, key)."""
    cert = x509.load_pem_x509_certificate((ws / "ca" / "rootCA.pem").read_bytes())
    key = serialization.load_pem_private_key((ws / "ca" / "rootCA.key").read_bytes(), None)
    return cert, key


def _sign(data: bytes, cert: x509.Certificate, key) -> ArchiveSignature:
    return sign_digest(hashlib.sha256(data).hexdigest(), len(data), _key_pem(key), _pem(cert))


def _zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("payload.bin", payload)
    return buf.getvalue()


def _mmar_zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


# ---- the signature and its verifier -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project():
    """A CA, an admin and a site of it: (ca_cert, ca_key, admin (cert, key), site (cert, key))."""
    ca_cert, ca_key = create_ca("proj")
    admin = issue_cert(ca_cert, ca_key, "alice", "admin", admin_role="lead")
    site = issue_cert(ca_cert, ca_key, "site-1", "client")
    return ca_cert, ca_key, admin, site


def test_a_signature_binds_the_archives_digest_size_and_purpose(project):
    ca_cert, _, (cert, key), _ = project
    data = _zip(b"weights")
    signed = _sign(data, cert, key)
    verifier = ArchiveVerifier(_pem(ca_cert))
    sha = hashlib.sha256(data).hexdigest()
    assert verifier.verify_digest(signed, sha, len(data)).name == "alice"
    assert statement(sha, len(data)) == f"{PURPOSE}\nsha256:{sha}\nsize:{len(data)}\n".encode()
    with pytest.raises(SignatureError, match="signature does not match the archive"):
        verifier.verify_digest(signed, sha, len(data) + 1)
    with pytest.raises(SignatureError, match="signature does not match the archive"):
        verifier.verify_digest(signed, hashlib.sha256(b"other").hexdigest(), len(data))
    # Signed for another purpose, the same key over the same digest does not make an archive signature.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    other = key.sign(statement(sha, len(data), "something-else"), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify_digest(ArchiveSignature(other, _pem(cert)), sha, len(data))


def test_the_verifier_hashes_the_file_it_holds_not_a_claimed_digest(project, tmp_path):
    ca_cert, _, (cert, key), _ = project
    signed = _sign(_zip(b"what the admin signed"), cert, key)
    received = tmp_path / "received.zip"
    received.write_bytes(_zip(b"what arrived instead"))
    with pytest.raises(SignatureError, match="signature does not match the archive"):
        ArchiveVerifier(_pem(ca_cert)).verify_file(received, signed)
    received.write_bytes(_zip(b"what the admin signed"))
    assert ArchiveVerifier(_pem(ca_cert)).verify_file(received, signed).name == "alice"


def test_only_a_valid_unrevoked_admin_certificate_of_this_project_signs(project, tmp_path):
    ca_cert, ca_key, (cert, key), (site_cert, site_key) = project
    data = _zip(b"x")
    sha = hashlib.sha256(data).hexdigest()
    verifier = ArchiveVerifier(_pem(ca_cert))
    with pytest.raises(SignatureError, match="unsigned archive") as err:
        verifier.verify_digest(None, sha, len(data))
    assert not err.value.permission
    with pytest.raises(SignatureError, match="signer 'site-1' .* is not an admin of this project") as err:
        verifier.verify_digest(_sign(data, site_cert, site_key), sha, len(data))
    assert err.value.permission
    other_ca, other_key = create_ca("other")
    stranger = issue_cert(other_ca, other_key, "alice", "admin", admin_role="project_admin")
    with pytest.raises(SignatureError, match="not an admin of this project .*not issued by this project's CA"):
        verifier.verify_digest(_sign(data, *stranger), sha, len(data))
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = issue_cert(ca_cert, ca_key, "old", "admin", admin_role="lead", valid_days=1, not_before=past)
    with pytest.raises(SignatureError, match="signer's certificate is not valid now"):
        verifier.verify_digest(_sign(data, *expired), sha, len(data))
    revoked = ArchiveVerifier(_pem(ca_cert), lambda serial: serial == cert.serial_number)
    with pytest.raises(SignatureError, match="signer's certificate is revoked"):
        revoked.verify_digest(_sign(data, cert, key), sha, len(data))
    with pytest.raises(SignatureError, match="signed by 'alice', not by the uploading admin 'bob'"):
        verifier.verify_digest(_sign(data, cert, key), sha, len(data), uploader="bob")


def test_a_kit_folder_verifier_reads_its_crl_when_it_has_one_and_refuses_a_foreign_one(project, tmp_path):
    ca_cert, ca_key, (cert, key), _ = project
    startup = tmp_path / "startup"
    startup.mkdir()
    write_pem_cert(startup / "rootCA.pem", ca_cert)
    data = _zip(b"y")
    archive = tmp_path / "a.zip"
    archive.write_bytes(data)
    signed = _sign(data, cert, key)
    assert ArchiveVerifier.of_startup(startup).verify_file(archive, signed).name == "alice"
    write_crl(startup / "crl.pem", ca_cert, ca_key, [cert.serial_number])
    with pytest.raises(SignatureError, match="signer's certificate is revoked"):
        ArchiveVerifier.of_startup(startup).verify_file(archive, signed)
    other_ca, other_key = create_ca("other")
    write_crl(startup / "crl.pem", other_ca, other_key, [])
    with pytest.raises(SignatureError, match="revocation list cannot be trusted"):
        ArchiveVerifier.of_startup(startup).verify_file(archive, signed)
    with pytest.raises(SignatureError, match="no project CA"):
        ArchiveVerifier.of_startup(tmp_path / "nowhere")


def test_signature_fields_are_bounded_before_anything_is_parsed(project):
    ca_cert, _, (cert, key), _ = project
    verifier = ArchiveVerifier(_pem(ca_cert))
    with pytest.raises(SignatureError, match="malformed signature: 4096 bytes"):
        verifier.check_signer(ArchiveSignature(b"\x30" * 4096, _pem(cert)))
    huge = _pem(cert) + b"A" * MAX_CERTIFICATE_BYTES
    with pytest.raises(SignatureError, match="at most 8192 are taken"):
        verifier.check_signer(ArchiveSignature(b"\x30\x06", huge))
    with pytest.raises(SignatureError, match="not one PEM certificate"):
        verifier.check_signer(ArchiveSignature(b"\x30\x06", _pem(cert) + _pem(cert)))
    with pytest.raises(SignatureError, match="signature is not base64"):
        ArchiveSignature.from_text("not base64!", _pem(cert).decode())
    with pytest.raises(SignatureError, match="at most 344 are taken"):
        ArchiveSignature.from_text(base64.b64encode(bytes(300)).decode(), _pem(cert).decode())
    assert ArchiveSignature.from_text("", "") is None
    signed = _sign(b"z", cert, key)
    assert ArchiveSignature.from_text(**signed.to_text()) == signed


# ---- the server: at upload, and again at deploy ------------------------------------------------------------------


class Served:
    """An in-process server of a POC workspace and its admin's stub."""

    def __init__(self, ws: Path, server: FederationServer):
        self.ws, self.server = ws, server
        self.fl_target = f"127.0.0.1:{server.fl_port}"
        self.admin_target = f"127.0.0.1:{server.admin_port}"
        self._channels: list[grpc.Channel] = []

    def admin(self, kit: Path) -> admin_grpc.AdminServiceStub:
        channel = grpc.secure_channel(self.admin_target, channel_credentials(load_kit(kit)))
        self._channels.append(channel)
        return admin_grpc.AdminServiceStub(channel)

    def execute(self, kit: Path, command: str, targets: list[str], args: dict) -> apb.CommandReply:
        request = apb.CommandRequest(command=command, targets=targets, args_json=json.dumps(args), timeout=5)
        return self.admin(kit).Execute(request, timeout=30)

    def audit(self, command: str) -> list[dict]:
        lines = (self.ws / "server" / "audit.log").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e.get("command") == command and e.get("phase") != "intent"]

    def uploads(self) -> list[str]:
        folder = self.ws / "server" / "uploads"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def revoke(self, cert_pem: bytes) -> None:
        """Revoke a certificate in the server's CRL (what `provision --revoke` then a copy to the server does)."""
        ca_cert, ca_key = _ca(self.ws)
        crl = self.ws / "server" / "startup" / "crl.pem"
        write_crl(crl, ca_cert, ca_key, [x509.load_pem_x509_certificate(cert_pem).serial_number])
        st = crl.stat()
        os.utime(crl, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self.server.stop(0)


@pytest.fixture
def served(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, admin_port=0)
    server.start()
    fed = Served(ws, server)
    yield fed
    fed.close()


def _second_admin(ws: Path, name: str, role: str = "project_admin") -> Path:
    """A kit for one more admin of the POC project, issued by its CA."""
    ca_cert, ca_key = _ca(ws)
    folder = ws / name
    shutil.copytree(ws / "admin", folder)
    cert, key = issue_cert(ca_cert, ca_key, name, "admin", admin_role=role)
    write_pem_cert(folder / "startup" / "cert.pem", cert)
    (folder / "startup" / "key.pem").unlink()
    write_private_key(folder / "startup" / "key.pem", key)
    config = json.loads((folder / "startup" / "fed.json").read_text())
    config.update(name=name, admin_role=role)
    (folder / "startup" / "fed.json").write_text(json.dumps(config))
    return folder


def _refused_upload(stub: admin_grpc.AdminServiceStub, header: apb.BlobHeader, data: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.Upload(iter([apb.BlobChunk(header=header), apb.BlobChunk(data=data)]), timeout=30)
    return err.value


def test_an_unsigned_upload_is_refused_and_audited_and_nothing_is_kept(served):
    data = _zip(b"unsigned")
    header = apb.BlobHeader(name="mmar.zip", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    err = _refused_upload(served.admin(served.ws / "admin"), header, data)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsigned archive" in err.details()
    (entry,) = served.audit("upload")
    assert entry["admin"] == "admin" and entry["ok"] is False and "unsigned archive" in entry["error"]
    assert served.uploads() == []


def test_a_signature_of_other_bytes_is_refused_at_the_server(served):
    data = _zip(b"the archive sent")
    forged = signature_of(served.ws / "admin", _zip(b"the archive the admin signed"))
    header = apb.BlobHeader(
        name="mmar.zip",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        signature=forged.signature,
        signer_certificate=forged.signer_certificate,
    )
    err = _refused_upload(served.admin(served.ws / "admin"), header, data)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature does not match the archive" in err.details()
    (entry,) = served.audit("upload")
    assert entry["ok"] is False and "signature does not match the archive" in entry["error"]
    assert served.uploads() == []


def test_a_revoked_signer_a_site_signer_a_foreign_signer_and_another_admin_are_refused(served):
    ws = served.ws
    stub = served.admin(ws / "admin")
    data = _zip(b"signed by the wrong one")
    ca_cert, ca_key = _ca(ws)
    sha = hashlib.sha256(data).hexdigest()

    def header(signed: ArchiveSignature) -> apb.BlobHeader:
        return apb.BlobHeader(
            name="mmar.zip",
            size=len(data),
            sha256=sha,
            signature=signed.signature,
            signer_certificate=signed.signer_certificate,
        )

    site = load_kit(ws / "site-1")
    as_site = sign_digest(sha, len(data), site.key_pem, site.cert_pem)
    err = _refused_upload(stub, header(as_site), data)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "signer 'site-1' (site of test) is not an admin of this project" in err.details()

    other_ca, other_key = create_ca("test")  # same project name, another CA
    stranger = issue_cert(other_ca, other_key, "admin", "admin", admin_role="project_admin")
    err = _refused_upload(stub, header(_sign(data, *stranger)), data)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not an admin of this project" in err.details() and "not issued by this project's CA" in err.details()

    gone = issue_cert(ca_cert, ca_key, "gone", "admin", admin_role="project_admin")
    served.revoke(_pem(gone[0]))
    err = _refused_upload(stub, header(_sign(data, *gone)), data)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "signer's certificate is revoked" in err.details()

    other_admin = issue_cert(ca_cert, ca_key, "bob", "admin", admin_role="project_admin")
    err = _refused_upload(stub, header(_sign(data, *other_admin)), data)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "signed by 'bob', not by the uploading admin 'admin'" in err.details()

    errors = [e["error"] for e in served.audit("upload")]
    assert len(errors) == 4 and all(e.startswith("upload 'mmar.zip' refused: ") for e in errors), errors
    assert served.uploads() == []


def test_a_signer_revoked_after_the_upload_is_refused_at_deploy_and_no_site_is_sent_it(served, tmp_path):
    ws = served.ws
    uploader = _second_admin(ws, "uploader")
    data = _mmar_zip(copy_mmar(tmp_path / "mmar"))
    blob = served.admin(uploader).Upload(iter(signed_upload(uploader, data)), timeout=30).blob_id
    assert served.uploads() == [f"{blob}.sig", f"{blob}.zip"]
    agent = FakeAgent(ws, "site-1", served.fl_target)
    try:
        deadline = time.monotonic() + 10
        while "site-1" not in served.server.mailbox.connected_sites():
            assert time.monotonic() < deadline, "site-1 never connected"
            time.sleep(0.05)
        assert served.execute(ws / "admin", "set-run", ["server"], {"run_number": 1}).ok
        served.revoke(load_kit(uploader).cert_pem)
        reply = served.execute(ws / "admin", "deploy", ["server", "site-1"], {"blob_id": blob})
        assert not reply.ok
        assert [(r.target, r.error) for r in reply.replies] == [
            ("server", "deploy refused: signer's certificate is revoked ('uploader' (project_admin of test))"),
            ("site-1", "deploy refused: signer's certificate is revoked ('uploader' (project_admin of test))"),
        ]
        assert agent.topics() == []
    finally:
        agent.close()
    assert not (ws / "server" / "run_1" / "mmar").exists()


def test_a_kept_blob_keeps_its_signature_across_a_restart_and_the_server_checks_it_before_extracting(served, tmp_path):
    ws = served.ws
    data = _mmar_zip(copy_mmar(tmp_path / "mmar"))
    blob = served.admin(ws / "admin").Upload(iter(signed_upload(ws / "admin", data)), timeout=30).blob_id
    served.server.stop(0)
    served.server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, admin_port=0)
    served.server.start()
    served.admin_target = f"127.0.0.1:{served.server.admin_port}"
    assert served.execute(ws / "admin", "set-run", ["server"], {"run_number": 1}).ok
    # The kept file is changed on disk behind the server's back: the deploy checks the bytes it would extract.
    (ws / "server" / "uploads" / f"{blob}.zip").write_bytes(_zip(b"swapped"))
    reply = served.execute(ws / "admin", "deploy", ["server"], {"blob_id": blob})
    assert not reply.ok and reply.replies[0].error.startswith("deploy refused: signature does not match the archive")
    assert not (ws / "server" / "run_1" / "mmar").exists()

    again = served.admin(ws / "admin").Upload(iter(signed_upload(ws / "admin", data)), timeout=30).blob_id
    reply = served.execute(ws / "admin", "deploy", ["server"], {"blob_id": again})
    assert reply.ok, reply
    assert (ws / "server" / "run_1" / "mmar" / "config" / "config_fed_server.json").is_file()


def test_an_upload_left_without_its_signature_is_not_adopted(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    uploads = ws / "server" / "uploads"
    uploads.mkdir()
    data = _zip(b"left behind")
    sha = hashlib.sha256(data).hexdigest()
    (uploads / f"{sha}.zip").write_bytes(data)
    signed = signed_header(ws / "admin", _zip(b"kept"))
    (uploads / f"{signed.sha256}.zip").write_bytes(_zip(b"kept"))
    record = ArchiveSignature(signed.signature, signed.signer_certificate).to_text()
    (uploads / f"{signed.sha256}.sig").write_text(json.dumps(record))
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, admin_port=0)
    assert sorted(p.name for p in uploads.iterdir()) == [f"{signed.sha256}.sig", f"{signed.sha256}.zip"]
    assert server.blobs.get(signed.sha256).signature == ArchiveSignature(signed.signature, signed.signer_certificate)

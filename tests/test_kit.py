"""Tests for fedcommon.kit: kit loading and its errors, and mutual TLS over real gRPC sockets."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from fedcommon import pki
from fedcommon import provision as provisioning
from fedcommon.identity import peer_identity
from fedcommon.kit import (
    Kit,
    KitError,
    channel_credentials,
    load_kit,
    server_credentials,
)

ROOT = Path(__file__).resolve().parent.parent
WHOAMI = "/fedlearn.test.Probe/WhoAmI"


def _prepare(workspace: Path) -> Path:
    provisioning.prepare_poc(workspace, 2, "127.0.0.1", 8002, 8003, "trial", False)
    return workspace


@pytest.fixture(scope="module")
def poc(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("poc") / "ws")


@pytest.fixture(scope="module")
def foreign_poc(tmp_path_factory) -> Path:
    """A second workspace: same names and project, a different CA."""
    return _prepare(tmp_path_factory.mktemp("foreign") / "ws")


@pytest.fixture
def site(poc, tmp_path) -> Path:
    """A private copy of site-1's participant folder that a test may damage."""
    return Path(shutil.copytree(poc / "site-1", tmp_path / "site-1"))


def test_load_kit_reads_identity_and_server_address(poc):
    kit = load_kit(poc / "site-1")
    assert (kit.name, kit.role, kit.project) == ("site-1", "client", "trial")
    assert kit.folder == (poc / "site-1").resolve()
    assert kit.fl_target == "127.0.0.1:8002"
    assert kit.admin_target == "127.0.0.1:8003"
    assert kit.cert_pem == (poc / "site-1" / "startup" / "cert.pem").read_bytes()
    assert kit.admin_role is None


def test_load_kit_accepts_the_startup_folder_too(poc):
    assert load_kit(poc / "site-1" / "startup") == load_kit(poc / "site-1")


def test_admin_kit_carries_its_admin_role(poc):
    assert load_kit(poc / "admin").admin_role == "project_admin"


def test_kit_repr_never_shows_the_private_key(poc):
    kit = load_kit(poc / "server")
    assert "PRIVATE" not in repr(kit)
    assert "key_pem" not in repr(kit)


def test_targets_bracket_an_ipv6_server_host(poc):
    kit = load_kit(poc / "site-1")
    v6 = dataclasses.replace(kit, server_host="::1")
    assert v6.fl_target == "[::1]:8002"
    assert v6.admin_target == "[::1]:8003"


def test_load_kit_of_a_folder_without_a_kit_names_the_missing_folder(tmp_path):
    with pytest.raises(KitError, match="startup"):
        load_kit(tmp_path)
    with pytest.raises(KitError, match="no such folder"):
        load_kit(tmp_path / "nowhere")


@pytest.mark.parametrize("filename", ["cert.pem", "key.pem", "rootCA.pem", "fed.json"])
def test_load_kit_names_a_missing_file(site, filename):
    (site / "startup" / filename).unlink()
    with pytest.raises(KitError, match=f"{filename}: missing"):
        load_kit(site)


def test_load_kit_names_fed_json_when_it_is_not_json(site):
    (site / "startup" / "fed.json").write_text('{"name": "site-1",')
    with pytest.raises(KitError, match=r"fed\.json: not valid JSON"):
        load_kit(site)


@pytest.mark.parametrize(
    ("path", "shown"),
    [(["name"], "'name'"), (["server"], "'server'"), (["server", "fl_port"], "'server.fl_port'")],
)
def test_load_kit_names_fed_json_and_the_missing_key(site, path, shown):
    config_file = site / "startup" / "fed.json"
    config = json.loads(config_file.read_text())
    holder = config
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    config_file.write_text(json.dumps(config))
    with pytest.raises(KitError, match=rf"fed\.json: missing key {shown}"):
        load_kit(site)


def test_load_kit_names_a_port_of_the_wrong_type(site):
    config_file = site / "startup" / "fed.json"
    config = json.loads(config_file.read_text())
    config["server"]["admin_port"] = "8003"
    config_file.write_text(json.dumps(config))
    with pytest.raises(KitError, match=r"fed\.json: key 'server.admin_port' must be an integer"):
        load_kit(site)


def test_load_kit_refuses_a_key_that_does_not_match_the_certificate(site, poc):
    key = site / "startup" / "key.pem"
    key.unlink()
    shutil.copy(poc / "site-2" / "startup" / "key.pem", key)
    with pytest.raises(KitError, match=r"key\.pem: private key does not match the certificate"):
        load_kit(site)


def test_load_kit_refuses_a_certificate_not_issued_by_the_kits_ca(site, foreign_poc):
    shutil.copy(foreign_poc / "ca" / "rootCA.pem", site / "startup" / "rootCA.pem")
    with pytest.raises(KitError, match=r"cert\.pem: not issued by the CA"):
        load_kit(site)


def test_load_kit_refuses_a_certificate_for_another_participant(site):
    config_file = site / "startup" / "fed.json"
    config = json.loads(config_file.read_text())
    config["name"] = "site-9"
    config_file.write_text(json.dumps(config))
    with pytest.raises(KitError, match=r"cert\.pem: certificate is for 'site-1'"):
        load_kit(site)


def test_load_kit_refuses_an_expired_certificate(site, poc):
    ca_cert, ca_key = _load_ca(poc)
    cert, key = pki.issue_cert(ca_cert, ca_key, "site-1", "client", valid_days=0)
    for name in ("cert.pem", "key.pem"):
        (site / "startup" / name).unlink()
    pki.write_pem_cert(site / "startup" / "cert.pem", cert)
    pki.write_private_key(site / "startup" / "key.pem", key)
    with pytest.raises(KitError, match=r"cert\.pem: certificate expired"):
        load_kit(site)


def _load_ca(workspace: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((workspace / "ca" / "rootCA.pem").read_bytes())
    key = serialization.load_pem_private_key((workspace / "ca" / "rootCA.key").read_bytes(), password=None)
    return cert, key


def test_server_credentials_refuse_a_site_kit(poc):
    with pytest.raises(KitError, match="server's kit"):
        server_credentials(load_kit(poc / "site-1"))


def test_importing_kit_leaves_numpy_and_torch_unloaded():
    code = "import sys, fedcommon.kit; print([m for m in ('numpy', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    peer = peer_identity(context)
    return json.dumps({"name": peer.name, "role": peer.role} if peer else {"name": None, "role": None}).encode()


@contextmanager
def serving(kit: Kit | None) -> Iterator[int]:
    """A real gRPC server on 127.0.0.1 (free port) with the kit's mutual-TLS credentials (None: plaintext)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(_who_am_i)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fedlearn.test.Probe", {"WhoAmI": handler}),))
    if kit is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(kit))
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _call(port: int, credentials: grpc.ChannelCredentials) -> dict:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return json.loads(channel.unary_unary(WHOAMI)(b"", timeout=10))


def test_server_accepts_a_site_of_its_ca_and_sees_its_certificate_name(poc):
    with serving(load_kit(poc / "server")) as port:
        assert _call(port, channel_credentials(load_kit(poc / "site-1")))["name"] == "site-1"


def test_server_sees_an_admins_role_from_its_certificate(poc):
    with serving(load_kit(poc / "server")) as port:
        reply = _call(port, channel_credentials(load_kit(poc / "admin")))
    assert reply == {"name": "admin", "role": "project_admin"}


def _assert_refused(port: int, credentials: grpc.ChannelCredentials) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(port, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_refuses_a_client_certificate_from_another_ca(poc, foreign_poc):
    foreign = load_kit(foreign_poc / "site-1")
    # The intruder trusts the real CA, so only the server's check of the client certificate can stop it.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=load_kit(poc / "site-1").ca_pem,
        private_key=foreign.key_pem,
        certificate_chain=foreign.cert_pem,
    )
    with serving(load_kit(poc / "server")) as port:
        _assert_refused(port, credentials)
        _assert_refused(port, channel_credentials(foreign))


def test_server_refuses_a_client_without_a_certificate(poc):
    credentials = grpc.ssl_channel_credentials(root_certificates=load_kit(poc / "site-1").ca_pem)
    with serving(load_kit(poc / "server")) as port:
        _assert_refused(port, credentials)


def test_site_refuses_a_server_from_another_ca(poc, foreign_poc):
    with serving(load_kit(foreign_poc / "server")) as port:
        _assert_refused(port, channel_credentials(load_kit(poc / "site-1")))


def test_peer_name_is_none_on_a_plaintext_connection():
    with serving(None) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = json.loads(channel.unary_unary(WHOAMI)(b"", timeout=10))
    assert reply == {"name": None, "role": None}

"""The training plane over real gRPC with mutual TLS on 127.0.0.1: who gets in, which updates count."""

from __future__ import annotations

import json
import os
import time

import grpc
import numpy as np
import pytest
from conftest import prepare_workspace, training_run_files
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.model_file import load_model
from fedcommon.pki import issue_cert, write_crl
from fedcommon.tensor_codec import encode_tensors
from fedcommon.wire import training_pb2 as pb
from fedserver.server import FederationServer

W0 = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture
def federation(tmp_path):
    """A running in-process server (run 1, 2 rounds, 2 sites needed) and the POC workspace."""
    ws, mmar = training_run_files(
        tmp_path, W0, clients=3, min_num_clients=2, num_rounds=2, wait_after_min_clients=30, heart_beat_timeout=30
    )
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0)
    server.start_run(mmar)
    port = server.start()
    yield server, ws, f"127.0.0.1:{port}"
    server.stop(0)


def _stub(ws, site, target, creds=None):
    channel = grpc.secure_channel(target, creds or channel_credentials(load_kit(ws / site)))
    return TrainingStub(channel), channel


def _register(ws, site, target):
    stub, channel = _stub(ws, site, target)
    token = stub.Register(pb.RegisterRequest(client_name=site), timeout=10).token
    return stub, ((("fl-token", token),)), channel


def _submit(stub, md, tensors, round_number=0, weight=1.0, run_number=1, num_tensors=None, extra=()):
    header = pb.ModelHeader(
        run_number=run_number,
        round=round_number,
        kind="delta_w",
        weight=weight,
        num_tensors=len(tensors) if num_tensors is None else num_tensors,
    )
    chunks = [pb.ModelChunk(header=header), *encode_tensors(tensors), *extra]
    return stub.SubmitUpdate(iter(chunks), metadata=md, timeout=10)


def _fetch(stub, md):
    return list(stub.GetModel(pb.GetModelRequest(wait_seconds=0.5), metadata=md, timeout=10))


def _three_sites_with_the_model(ws, target):
    """site-1..3 registered, each having fetched the round's model: (stub, metadata) per site."""
    sites = []
    for site in ("site-1", "site-2", "site-3"):
        stub, md, _ = _register(ws, site, target)
        _fetch(stub, md)
        sites.append((stub, md))
    return sites


def _summary(server):
    return json.loads((server.run.run_dir / "summary.json").read_text())


def test_site_without_a_certificate_is_refused_at_the_handshake(federation):
    server, ws, target = federation
    ca_only = grpc.ssl_channel_credentials((ws / "server" / "startup" / "rootCA.pem").read_bytes())
    stub, channel = _stub(ws, "site-1", target, ca_only)
    with pytest.raises(grpc.RpcError) as err:
        stub.Register(pb.RegisterRequest(client_name="site-1"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.registry.names() == set()


def test_site_with_a_certificate_from_another_ca_is_refused(federation, tmp_path):
    server, ws, target = federation
    other = prepare_workspace(tmp_path / "other", clients=1)
    intruder = grpc.ssl_channel_credentials(
        (ws / "server" / "startup" / "rootCA.pem").read_bytes(),
        (other / "site-1" / "startup" / "key.pem").read_bytes(),
        (other / "site-1" / "startup" / "cert.pem").read_bytes(),
    )
    stub, channel = _stub(ws, "site-1", target, intruder)
    with pytest.raises(grpc.RpcError) as err:
        stub.Register(pb.RegisterRequest(client_name="site-1"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.registry.names() == set()


def test_registering_under_another_sites_name_is_refused(federation):
    server, ws, target = federation
    stub, channel = _stub(ws, "site-1", target)
    with pytest.raises(grpc.RpcError) as err:
        stub.Register(pb.RegisterRequest(client_name="site-2"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'site-2' does not match the certificate's name 'site-1'" in err.value.details()


def test_unknown_token_is_refused(federation):
    server, ws, target = federation
    stub, channel = _stub(ws, "site-1", target)
    with pytest.raises(grpc.RpcError) as err:
        _fetch(stub, (("fl-token", "forged"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        _submit(stub, (("fl-token", "forged"),), W0)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "register again" in err.value.details()


def test_token_used_with_another_sites_certificate_is_refused(federation):
    server, ws, target = federation
    _, md1, _ = _register(ws, "site-1", target)
    stub2, channel = _stub(ws, "site-2", target)
    with pytest.raises(grpc.RpcError) as err:
        _fetch(stub2, md1)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to 'site-1'" in err.value.details()


def test_token_replayed_from_another_certificate_of_the_same_site_is_refused(federation):
    server, ws, target = federation
    _, md, _ = _register(ws, "site-1", target)
    ca_cert = x509.load_pem_x509_certificate((ws / "ca" / "rootCA.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ws / "ca" / "rootCA.key").read_bytes(), None)
    cert, key = issue_cert(ca_cert, ca_key, "site-1", "client")
    pem = serialization.Encoding.PEM
    twin = grpc.ssl_channel_credentials(
        ca_cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert.public_bytes(pem),
    )
    stub, _ = _stub(ws, "site-1", target, twin)
    with pytest.raises(grpc.RpcError) as err:
        _fetch(stub, md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "issued to another certificate" in err.value.details()


def test_model_download_streams_the_initial_global_model(federation):
    server, ws, target = federation
    stub, md, _ = _register(ws, "site-1", target)
    chunks = _fetch(stub, md)
    header = chunks[0].header
    assert header.status == pb.TRAIN and header.round == 0 and header.num_tensors == 2
    from fedcommon.tensor_codec import decode_tensors

    model = decode_tensors(chunks[1:])
    assert {k: v.tolist() for k, v in model.items()} == {k: v.tolist() for k, v in W0.items()}


BAD_UPDATES = [
    ({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, "NaN or Inf"),
    ({"w": np.full((2, 3), np.inf, np.float32)}, "NaN or Inf"),
    ({"w": np.zeros((3, 2), np.float32)}, r"variable 'w': shape [3, 2]"),
    ({"w": np.zeros((2, 3), np.float64)}, "variable 'w': dtype float64"),
    ({"w": np.zeros((2, 3), np.float32), "evil": np.zeros(1, np.float32)}, "unknown variable 'evil'"),
]


def test_bad_contributions_are_refused_and_the_round_goes_on_with_the_others(federation):
    server, ws, target = federation
    (stub1, md1), (stub2, md2), (stub3, md3) = _three_sites_with_the_model(ws, target)
    for update, reason in BAD_UPDATES:
        reply = _submit(stub3, md3, update)
        assert not reply.accepted
        assert reason in reply.reason
    reply = _submit(stub3, md3, W0, num_tensors=3)
    assert not reply.accepted and "announced 3 variables but carried 2" in reply.reason
    reply = _submit(stub3, md3, W0, weight=-1.0)
    assert not reply.accepted and "positive" in reply.reason
    reply = _submit(stub3, md3, W0, run_number=7)
    assert not reply.accepted and "run 7" in reply.reason

    ones = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    assert _submit(stub1, md1, ones, weight=1.0).accepted
    dup = _submit(stub1, md1, ones)
    assert not dup.accepted and "duplicate contribution: site-1 already contributed to round 0" in dup.reason
    threes = {k: 3 * v for k, v in ones.items()}
    assert _submit(stub2, md2, threes, weight=3.0).accepted
    # site-3 never sent a valid update: the round waits for it (it is alive) until wait_after_min_clients,
    # so end site-3's session to let the round close with the two good contributions.
    server.registry.remove("site-3")
    summary = _wait_round_closed(server, 0)
    record = summary["rounds"][0]
    assert record["contributors"] == ["site-1", "site-2"]
    assert len(record["rejected"]) >= len(BAD_UPDATES) + 3
    assert any(r["site"] == "site-1" and "duplicate" in r["reason"] for r in record["rejected"])
    model, _ = load_model(server.run.model_path)
    np.testing.assert_allclose(model["w"], np.full((2, 3), (1 * 1 + 3 * 3) / 4.0))

    stub3, md3, _ = _register(ws, "site-3", target)
    stale = _submit(stub3, md3, W0, round_number=0)
    assert not stale.accepted
    assert "stale contribution: it is for round 0, the open round is 1" in stale.reason


def test_upload_that_breaks_off_mid_tensor_is_refused_and_frees_the_round(federation):
    server, ws, target = federation
    stub1, md1, _ = _register(ws, "site-1", target)
    _fetch(stub1, md1)
    header = pb.ModelHeader(run_number=1, round=0, kind="delta_w", weight=1.0, num_tensors=2)
    partial = list(encode_tensors({"w": np.ones((2, 3), np.float32)}, chunk_bytes=8))[:-1]
    reply = stub1.SubmitUpdate(iter([pb.ModelChunk(header=header), *partial]), metadata=md1, timeout=10)
    assert not reply.accepted and "ended early" in reply.reason
    assert _submit(stub1, md1, W0).accepted, "a broken upload must not count as the site's contribution"


def test_site_already_contributed_gets_wait_until_the_next_round(federation):
    server, ws, target = federation
    stub1, md1, _ = _register(ws, "site-1", target)
    _fetch(stub1, md1)
    assert _submit(stub1, md1, W0).accepted
    chunks = _fetch(stub1, md1)
    assert chunks[0].header.status == pb.WAIT and len(chunks) == 1


def _wait_round_closed(server, round_number, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = _summary(server)
        if any(r["round"] == round_number for r in summary["rounds"]):
            return summary
        time.sleep(0.05)
    raise AssertionError(f"round {round_number} did not close: {_summary(server)}")


def test_a_site_revoked_mid_run_is_refused_and_leaves_the_run_at_once(federation):
    server, ws, target = federation
    stub, md, _ = _register(ws, "site-1", target)
    assert "site-1" in server.registry.names()
    ca_cert = x509.load_pem_x509_certificate((ws / "ca" / "rootCA.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ws / "ca" / "rootCA.key").read_bytes(), None)
    site_cert = x509.load_pem_x509_certificate((ws / "site-1" / "startup" / "cert.pem").read_bytes())
    crl = ws / "server" / "startup" / "crl.pem"
    write_crl(crl, ca_cert, ca_key, [site_cert.serial_number])
    st = crl.stat()
    os.utime(crl, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(grpc.RpcError) as err:
        _fetch(stub, md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in err.value.details()
    assert "site-1" not in server.registry.names()


def test_a_huge_claimed_weight_cannot_turn_the_global_model_into_nan(federation):
    """Hardening item 3: an all-1.0 update claiming weight 1e39 (finite) overflowed the float32 sum, the next
    global model was NaN and every honest update after it was refused; 1e30 replaced the model outright."""
    server, ws, target = federation
    (stub1, md1), (stub2, md2), (stub3, md3) = _three_sites_with_the_model(ws, target)
    ones = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    for weight in (1e39, 1e30):
        reply = _submit(stub3, md3, ones, weight=weight)
        assert not reply.accepted and "max_contribution_weight" in reply.reason
    huge = {"w": np.full((2, 3), 1e35, np.float32), "b": np.ones(3, np.float32)}
    reply = _submit(stub3, md3, huge, weight=1.0)
    assert not reply.accepted and "variable 'w' holds 1e+35" in reply.reason
    # The largest weight a site may claim, with the largest values an update may hold, still sums finitely.
    assert _submit(stub1, md1, {k: v * 3e32 for k, v in ones.items()}, weight=1e9).accepted
    assert _submit(stub2, md2, {k: v * 3e32 for k, v in ones.items()}, weight=1e9).accepted
    server.registry.remove("site-3")
    _wait_round_closed(server, 0)
    model, _ = load_model(server.run.model_path)
    assert all(np.isfinite(v).all() for v in model.values())

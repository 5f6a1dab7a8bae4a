"""The revocation list: CA-signed, re-read on change, and never lifted by a bad or vanished file."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization

from fedcommon.pki import create_ca, write_crl
from fedcommon.revocation import RevocationError, RevocationList, load_revoked_serials


@pytest.fixture
def ca():
    cert, key = create_ca("proj")
    return cert, key, cert.public_bytes(serialization.Encoding.PEM)


def bump(path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_a_missing_file_at_start_is_refused_naming_what_to_do(tmp_path, ca):
    with pytest.raises(RevocationError, match=r"crl\.pem: missing.*fedadmin provision"):
        RevocationList(tmp_path / "crl.pem", ca[2])


def test_an_older_crl_put_back_does_not_lift_a_revocation(tmp_path, ca):
    cert, key, pem = ca
    path = tmp_path / "crl.pem"
    write_crl(tmp_path / "old.pem", cert, key, [])
    write_crl(path, cert, key, [7])
    revocations = RevocationList(path, pem)
    (tmp_path / "old.pem").replace(path)
    bump(path)
    assert revocations.is_revoked(7)


def test_a_written_crl_revokes_its_serials_and_a_change_is_seen_without_a_restart(tmp_path, ca):
    cert, key, pem = ca
    path = tmp_path / "crl.pem"
    write_crl(path, cert, key, [7])
    revocations = RevocationList(path, pem)
    assert revocations.is_revoked(7) and not revocations.is_revoked(8)
    write_crl(path, cert, key, [7, 8])
    bump(path)
    assert revocations.is_revoked(8)


def test_a_crl_from_another_ca_is_refused(tmp_path, ca):
    other_cert, other_key = create_ca("other")
    write_crl(tmp_path / "crl.pem", other_cert, other_key, [7])
    with pytest.raises(RevocationError, match="not signed by this project's CA"):
        load_revoked_serials(tmp_path / "crl.pem", ca[2])
    with pytest.raises(RevocationError):
        RevocationList(tmp_path / "crl.pem", ca[2])


def test_garbage_is_refused_naming_the_file(tmp_path, ca):
    (tmp_path / "crl.pem").write_text("not a crl")
    with pytest.raises(RevocationError, match=r"crl\.pem: not a PEM certificate revocation list"):
        load_revoked_serials(tmp_path / "crl.pem", ca[2])


def test_a_broken_or_removed_file_keeps_the_revocations_in_force(tmp_path, ca):
    cert, key, pem = ca
    path = tmp_path / "crl.pem"
    write_crl(path, cert, key, [7])
    revocations = RevocationList(path, pem)
    path.write_text("garbage")
    bump(path)
    assert revocations.is_revoked(7)
    path.unlink()
    assert revocations.is_revoked(7)

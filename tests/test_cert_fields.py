"""fedcommon.cert_fields: a certificate's serial and subject names read from DER as cryptography reads them, and
anything that is not a certificate refused with CertificateFieldError, never another exception."""

from __future__ import annotations

import datetime
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from fedcommon.cert_fields import CertificateFieldError, certificate_fields, pem_to_der
from fedcommon.identity import identity_of
from fedcommon.pki import create_ca, issue_cert, new_private_key


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _first(cert: x509.Certificate, oid) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def _self_signed(subject: x509.Name, serial: int) -> x509.Certificate:
    key = new_private_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    return builder.sign(key, hashes.SHA256())


def _assert_read_as_cryptography_reads(cert: x509.Certificate) -> None:
    fields = certificate_fields(_der(cert))
    assert fields.serial == cert.serial_number
    assert fields.common_name == _first(cert, NameOID.COMMON_NAME)
    assert fields.organization == _first(cert, NameOID.ORGANIZATION_NAME)
    assert fields.unit == _first(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)


def test_the_projects_own_certificates_read_as_cryptography_reads_them():
    ca, ca_key = create_ca("proj")
    _assert_read_as_cryptography_reads(ca)
    for name, role, host, admin_role in (
        ("server", "server", "localhost", None),
        ("site-1", "client", None, None),
        ("a@b.org", "admin", None, "lead"),
    ):
        cert, _ = issue_cert(ca, ca_key, name, role, host=host, admin_role=admin_role, org="hospital-a")
        _assert_read_as_cryptography_reads(cert)
        peer = identity_of(_der(cert))
        assert (peer.name, peer.org, peer.serial) == (name, "hospital-a", cert.serial_number)
        assert (peer.kind, peer.role) == ((role, admin_role) if role == "admin" else (role, None))
        assert identity_of(pem_to_der(cert.public_bytes(serialization.Encoding.PEM))) == peer


@pytest.mark.parametrize(
    "attributes",
    [
        [[(NameOID.COMMON_NAME, "x")]],  # no O, no OU
        [[(NameOID.ORGANIZATIONAL_UNIT_NAME, "client"), (NameOID.COMMON_NAME, "multi-valued")]],
        [[(NameOID.COMMON_NAME, "first")], [(NameOID.COMMON_NAME, "second")], [(NameOID.COUNTRY_NAME, "FR")]],
        [[(NameOID.COMMON_NAME, "ünïcødé ✓ 病院")], [(NameOID.ORGANIZATION_NAME, "Hôpital")]],
        [[(NameOID.COMMON_NAME, "bmp 病院", x509.name._ASN1Type.BMPString)]],
        [[(NameOID.ORGANIZATION_NAME, "printable", x509.name._ASN1Type.PrintableString)]],
        [[(NameOID.ORGANIZATIONAL_UNIT_NAME, "ia5", x509.name._ASN1Type.IA5String)]],
        [[(NameOID.COMMON_NAME, "universal 𝄞", x509.name._ASN1Type.UniversalString)]],
        [[(NameOID.COMMON_NAME, "c" * 64)], [(NameOID.ORGANIZATION_NAME, "o" * 64)]],
        [],  # an empty subject
    ],
)
def test_subjects_of_every_string_type_and_shape_read_as_cryptography_reads_them(attributes):
    rdns = [x509.RelativeDistinguishedName([x509.NameAttribute(*a) for a in rdn]) for rdn in attributes]
    for serial in (1, 127, 128, 255, 256, (1 << 159) - 1):
        _assert_read_as_cryptography_reads(_self_signed(x509.Name(rdns), serial))


def test_anything_that_is_not_a_certificate_is_refused_with_one_error():
    ca, ca_key = create_ca("proj")
    der = _der(issue_cert(ca, ca_key, "site-1", "client")[0])
    for cut in range(len(der)):
        with pytest.raises(CertificateFieldError):
            certificate_fields(der[:cut])
    with pytest.raises(CertificateFieldError, match="bytes after"):
        certificate_fields(der + b"\x00")
    with pytest.raises(CertificateFieldError, match="at most"):
        certificate_fields(b"\x30" * (1 << 17))
    # A long-form length where the short form fits is not DER.
    with pytest.raises(CertificateFieldError, match="not DER"):
        certificate_fields(b"\x30\x81\x05" + b"\x02\x01\x01\x30\x00")
    rng = random.Random(7)
    for _ in range(3000):  # bytes flipped anywhere: an answer or CertificateFieldError, nothing else
        flipped = bytearray(der)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        try:
            certificate_fields(bytes(flipped))
        except CertificateFieldError:
            pass
    for pem in (b"", b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", b"junk"):
        with pytest.raises(CertificateFieldError, match="not a PEM certificate"):
            pem_to_der(pem)

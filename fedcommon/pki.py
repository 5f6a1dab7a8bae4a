"""Issue a project CA, participant certificates and its revocation list; write them as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcommon.admin_defs import ADMIN_ROLES, PARTICIPANT_ROLES
from fedcommon.atomic import atomic_write_bytes

CA_VALID_DAYS = 3650
CERT_VALID_DAYS = 365


# Backdating absorbs small clock differences between the machine that issues and those that verify.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class PkiError(ValueError):
    """Bad input or workspace state for certificate issuance; the message says what to change."""


def check_project(project: str) -> str:
    """Return project unchanged if usable as a project name, else raise PkiError."""
    if not isinstance(project, str) or not _PROJECT_RE.fullmatch(project):
        raise PkiError(
            f"project name {project!r} is not valid: use 1-48 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return project


def _check_certificate_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise PkiError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_name(name: str) -> str:
    """Return name unchanged if usable as a participant name (certificate CN), else raise PkiError."""
    return _check_certificate_name(name, "participant name")


def check_org(org: str) -> str:
    """Return org unchanged if usable as an organization (certificate O), else raise PkiError."""
    return _check_certificate_name(org, "organization")


def check_host(host: str) -> str:
    """Return host unchanged if it is an IP address or DNS name sites can connect to, else raise PkiError."""
    if not isinstance(host, str) or not host:
        raise PkiError("server host is empty: give the DNS name or IP address that sites connect to")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
            raise PkiError(
                f"server host {host!r} is neither an IP address nor a DNS name "
                "(give a bare host, without scheme or port)"
            ) from None
        return host
    if address.is_unspecified:
        raise PkiError(f"server host {host!r} is a bind-all address: give the address sites connect to, e.g. 127.0.0.1")
    return host


def check_port(port: int, what: str) -> int:
    """Return port unchanged if it is an int in 1..65535, else raise PkiError naming what."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PkiError(f"{what} {port!r} is not a port number (1..65535)")
    return port


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(project: str, valid_days: int = CA_VALID_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a self-signed root CA (CA=true, path length 0) for project, valid for valid_days."""
    check_project(project)
    key = new_private_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{project} root CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _server_alt_names(host: str | None) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    if host is None:
        return names
    check_host(host)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        extra: x509.GeneralName = x509.DNSName(host.rstrip("."))
    else:
        extra = x509.IPAddress(address)
    if extra not in names:
        names.append(extra)
    return names


def issue_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    role: str,
    host: str | None = None,
    admin_role: str | None = None,
    valid_days: int = CERT_VALID_DAYS,
    org: str | None = None,
    not_before: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a certificate (signed by the CA) and its new key for a server, client or admin.

    The subject is CN=name, O=org (default: the CA's O, the project) and OU=role, where an admin's OU is
    its admin_role. A server certificate gets serverAuth and SANs for localhost, 127.0.0.1 and host;
    client and admin certificates get clientAuth. Valid from not_before (default: now, backdated a few
    minutes) for valid_days, and never beyond the CA.
    """
    check_name(name)
    if role not in PARTICIPANT_ROLES:
        raise PkiError(f"role {role!r} is not one of {', '.join(PARTICIPANT_ROLES)}")
    if role == "admin":
        if admin_role not in ADMIN_ROLES:
            raise PkiError(f"admin {name!r} needs admin_role, one of {', '.join(ADMIN_ROLES)}")
    elif admin_role is not None:
        raise PkiError(f"{name!r}: admin_role is only for admin certificates, not {role}")
    if host is not None and role != "server":
        raise PkiError(f"{name!r}: host is only for the server certificate, not {role}")

    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if org is None:
        attributes += ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    else:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, check_org(org)))
    attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, admin_role or role))

    key = new_private_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    if not_before is None:
        start, not_after = now - _CLOCK_SKEW, now + datetime.timedelta(days=valid_days)
    else:
        if not_before.tzinfo is None:
            not_before = not_before.replace(tzinfo=datetime.timezone.utc)
        start, not_after = not_before, not_before + datetime.timedelta(days=valid_days)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if role == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName(_server_alt_names(host)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_pem_cert(path: str | os.PathLike, cert: x509.Certificate) -> None:
    """Write cert to path as PEM, replacing any file there."""
    Path(path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_private_key(path: str | os.PathLike, key: ec.EllipticCurvePrivateKey) -> None:
    """Write key as unencrypted PKCS#8 PEM to a new file created with mode 0600; never overwrites."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600 by open(2) itself, so the key is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_crl(
    path: str | os.PathLike,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked_serials: Iterable[int],
) -> None:
    """Write a PEM X.509 CRL, signed by the CA, listing revoked_serials; replaces path atomically.

    The CRL is valid until the CA expires; an empty list gives a CRL that revokes nothing.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(ca_cert.not_valid_after_utc)
        # A CRL number must grow with every CRL the CA issues; microseconds since the epoch do.
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1_000_000)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - _CLOCK_SKEW).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM))

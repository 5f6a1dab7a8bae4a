"""Who is calling: name, kind, admin role and org, read from the peer's authenticated certificate only."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fedcommon.admin_defs import ADMIN_ROLES

# Every certificate this project issues carries its kind in the subject's OU: "server", "client"
# (a site) or the admin role. The O is the participant's organisation.
SERVER_OU = "server"
CLIENT_OU = "client"


@dataclass(frozen=True)
class PeerIdentity:
    """A certificate's holder: CN, kind (server, client, admin or unknown), admin role, O, serial, fingerprint."""

    name: str
    kind: str
    role: str | None
    org: str
    serial: int
    fingerprint: str  # sha256 of the DER certificate, hex

    def describe(self) -> str:
        """'name' with its role or kind, for messages: "'alice' (org_admin of hospital-a)"."""
        what = self.role if self.kind == "admin" else "site" if self.kind == "client" else self.kind
        return f"{self.name!r} ({what}{f' of {self.org}' if self.org else ''})"


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    """The PeerIdentity a certificate states."""
    unit = _attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if unit in ADMIN_ROLES:
        kind, role = "admin", unit
    elif unit in (SERVER_OU, CLIENT_OU):
        kind, role = unit, None
    else:
        kind, role = "unknown", None
    der = cert.public_bytes(serialization.Encoding.DER)
    return PeerIdentity(
        name=_attribute(cert, NameOID.COMMON_NAME),
        kind=kind,
        role=role,
        org=_attribute(cert, NameOID.ORGANIZATION_NAME),
        serial=cert.serial_number,
        fingerprint=hashlib.sha256(der).hexdigest(),
    )


# Parsed once per certificate, not per call: every long-poll of every site passes through here.
@functools.lru_cache(maxsize=1 << 16)
def _identity_of_pem(pem: bytes) -> PeerIdentity:
    return identity_of(x509.load_pem_x509_certificate(pem))


def peer_identity(context: grpc.ServicerContext) -> PeerIdentity | None:
    """The identity in the caller's TLS client certificate, or None on a connection without one."""
    values = context.auth_context().get("x509_pem_cert")
    if not values:
        return None
    return _identity_of_pem(values[0])

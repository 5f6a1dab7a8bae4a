"""Who is calling: name, kind, admin role and org, read from the peer's authenticated certificate only."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedcommon.admin_defs import ADMIN_ROLES
from fedcommon.cert_fields import CertificateFieldError, certificate_fields, pem_to_der

if TYPE_CHECKING:
    import grpc

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


def identity_of(der: bytes) -> PeerIdentity:
    """The PeerIdentity a DER certificate states; CertificateFieldError when it is not one."""
    fields = certificate_fields(der)
    unit = fields.unit or ""
    if unit in ADMIN_ROLES:
        kind, role = "admin", unit
    elif unit in (SERVER_OU, CLIENT_OU):
        kind, role = unit, None
    else:
        kind, role = "unknown", None
    return PeerIdentity(
        name=fields.common_name or "",
        kind=kind,
        role=role,
        org=fields.organization or "",
        serial=fields.serial,
        fingerprint=hashlib.sha256(der).hexdigest(),
    )


# Parsed once per certificate, not per call: every long-poll of every site passes through here.
@functools.lru_cache(maxsize=1 << 16)
def _identity_of_pem(pem: bytes) -> PeerIdentity | None:
    try:
        return identity_of(pem_to_der(pem))
    except CertificateFieldError:
        return None


def peer_identity(context: grpc.ServicerContext) -> PeerIdentity | None:
    """The identity in the caller's TLS client certificate (which the TLS handshake checked against the project CA),
    or None on a connection without one."""
    values = context.auth_context().get("x509_pem_cert")
    if not values:
        return None
    return _identity_of_pem(values[0])

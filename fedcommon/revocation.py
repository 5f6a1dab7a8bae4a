"""The project's certificate revocation list (a CA-signed X.509 CRL), re-read whenever its file changes."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from cryptography import x509

log = logging.getLogger(__name__)

CRL_FILE = "crl.pem"


class RevocationError(ValueError):
    """A CRL that cannot be trusted: unreadable, not a CRL, or not signed by the project's CA."""


def load_revoked_serials(path: Path, ca_pem: bytes) -> frozenset[int]:
    """The serials a CRL file revokes, after checking it is signed by the CA; raise RevocationError if not."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RevocationError(f"{path}: cannot read ({e.strerror})") from None
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise RevocationError(f"{path}: not a PEM certificate revocation list") from None
    ca = x509.load_pem_x509_certificate(ca_pem)
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):
        raise RevocationError(f"{path}: not signed by this project's CA (a CRL from another project?)")
    return frozenset(entry.serial_number for entry in crl)


class RevocationList:
    """Revoked serials from `path`; a changed file is picked up on the next check, without a restart.

    No file at start revokes nothing. A file that later vanishes, or becomes unreadable or untrustworthy,
    keeps the last good list in force (and says so in the log), so a bad copy never lifts a revocation.
    """

    def __init__(self, path: Path, ca_pem: bytes):
        self.path = Path(path)
        self._ca_pem = ca_pem
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        self._reload(raise_errors=True)

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _reload(self, raise_errors: bool = False) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        if stamp is None:
            if self._stamp is not None:
                log.error("%s: removed; keeping the %d revocations already in force", self.path, len(self._revoked))
                self._stamp = None
                return
            revoked: frozenset[int] = frozenset()
        else:
            try:
                revoked = load_revoked_serials(self.path, self._ca_pem)
            except RevocationError as e:
                if raise_errors:
                    raise
                log.error("%s; keeping the %d revocations already in force", e, len(self._revoked))
                self._stamp = stamp
                return
        if revoked != self._revoked:
            log.info("%s: %d certificate(s) revoked", self.path, len(revoked))
        self._stamp, self._revoked = stamp, revoked

    def is_revoked(self, serial: int) -> bool:
        """Whether the certificate with this serial is revoked (re-reads the file if it changed)."""
        with self._lock:
            self._reload()
            return serial in self._revoked

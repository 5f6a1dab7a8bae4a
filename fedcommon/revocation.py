"""The project's certificate revocation list (a CA-signed X.509 CRL), re-read whenever its file changes."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CRL_FILE = "crl.pem"


class RevocationError(ValueError):
    """A CRL that cannot be trusted: missing, unreadable, not a CRL, or not signed by the project's CA."""


def load_crl(path: Path, ca_pem: bytes) -> tuple[int, frozenset[int]]:
    """(CRL number, revoked serials) of a CRL file signed by the CA; raise RevocationError if not."""
    from cryptography import x509  # here: the server runs this in a child (fedserver.crypto_child)

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
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return number, frozenset(entry.serial_number for entry in crl)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of the file, None when there is none: a CRL that changed has another stamp."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def load_revoked_serials(path: Path, ca_pem: bytes) -> frozenset[int]:
    """The serials a CRL file revokes, after checking it is signed by the CA; raise RevocationError if not."""
    return load_crl(path, ca_pem)[1]


class RevocationList:
    """Revoked serials from `path`; a changed file is picked up on the next check, without a restart.

    The file must exist at start (provisioning writes it, empty when nothing is revoked): a server
    without it would silently honour no revocation. Afterwards a file that vanishes, becomes
    unreadable or untrustworthy, or is older than the list in force (a lower CRL number: a stale copy
    or a restored backup) keeps the list in force and says so in the log, so no bad copy lifts a
    revocation.
    """

    def __init__(self, path: Path, ca_pem: bytes, load: Callable[[Path, bytes], tuple[int, frozenset[int]]] = load_crl):
        self.path = Path(path)
        self._ca_pem = ca_pem
        self._load = load  # load_crl, or the server's, which checks the signature in a child process
        self._lock = threading.Lock()
        try:
            self._stamp: tuple[int, int, int] | None = file_stamp(self.path)
        except OSError as e:
            raise RevocationError(f"{self.path}: cannot read ({e.strerror})") from None
        if self._stamp is None:
            raise RevocationError(
                f"{self.path}: missing; the server needs the project's revocation list: run `fedadmin provision` "
                "(or `poc prepare`) again, or copy ca/crl.pem from the provisioning folder here"
            )
        self._number, self._revoked = load(self.path, ca_pem)

    def _reload(self) -> None:
        try:
            stamp = file_stamp(self.path)
        except OSError as e:
            stamp = (-1, -1, -1)
            problem: str | None = f"{self.path}: cannot read ({e.strerror})"
        else:
            problem = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if problem is None and stamp is None:
            problem = f"{self.path}: removed"
        if problem is None:
            try:
                number, revoked = self._load(self.path, self._ca_pem)
            except RevocationError as e:
                problem = str(e)
            else:
                if number < self._number:
                    problem = f"{self.path}: CRL number {number} is older than the one in force ({self._number})"
        if problem is not None:
            log.error("%s; keeping the %d revocations already in force", problem, len(self._revoked))
            return
        if revoked != self._revoked:
            log.info("%s: %d certificate(s) revoked", self.path, len(revoked))
        self._number, self._revoked = number, revoked

    def revoked(self) -> frozenset[int]:
        """The serials revoked now (re-reads the file if it changed)."""
        with self._lock:
            self._reload()
            return frozenset(self._revoked)

    def is_revoked(self, serial: int) -> bool:
        """Whether the certificate with this serial is revoked (re-reads the file if it changed)."""
        with self._lock:
            self._reload()
            return serial in self._revoked

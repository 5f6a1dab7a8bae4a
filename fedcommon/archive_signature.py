"""Signed MMAR archives: an admin signs an archive's digest; every participant verifies before it extracts.

The signature is ECDSA (SHA-256) by the admin's kit key over `statement(sha256, size)`, a short text that binds
the archive's digest, its size and PURPOSE; it travels with the signer's certificate (PEM). A verifier trusts
the signature only if that certificate chains to its own project CA, is an admin's, is within its validity and is
not revoked, and the signature matches the digest it computes itself from the bytes it holds.
cryptography is imported only when a key or certificate is used: the console imports this module at start.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

# The bounds live with the deploy command that carries a signature to the sites (fedcommon.commands).
from fedcommon.commands import MAX_CERTIFICATE_BYTES, MAX_SIGNATURE_BYTES, MAX_SIGNATURE_TEXT

if TYPE_CHECKING:
    from cryptography import x509

    from fedcommon.identity import PeerIdentity

PURPOSE = "fedlearn-mmar-v1"
_HASH_CHUNK = 1 << 20
_SHA256 = r"[0-9a-f]{64}"
_PEM_CERT = r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?"


class SignatureError(ValueError):
    """An archive signature that is missing, malformed or not trusted; the message says why.

    `permission` is True when the signature is well formed but its signer may not deploy (untrusted, revoked,
    expired, not an admin, not the uploader): a peer sees PERMISSION_DENIED then, else INVALID_ARGUMENT.
    """

    def __init__(self, message: str, permission: bool = False):
        super().__init__(message)
        self.permission = permission


@dataclass(frozen=True)
class ArchiveSignature:
    """A signature over an archive's statement and the PEM certificate of the admin who made it."""

    signature: bytes
    signer_certificate: bytes

    def to_text(self) -> dict[str, str]:
        """As text fields (a deploy request's headers, the stored record): base64 signature and PEM certificate."""
        import base64

        return {
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "signer_certificate": self.signer_certificate.decode("ascii"),
        }

    @classmethod
    def from_text(cls, signature: Any, signer_certificate: Any) -> ArchiveSignature | None:
        """From text fields (None when both are missing or empty); SignatureError names the one that is wrong."""
        if not signature and not signer_certificate:
            return None
        return cls(signature_bytes(signature), certificate_pem(signer_certificate).encode("ascii"))


def signature_bytes(value: Any, name: str = "signature") -> bytes:
    """The bytes of a base64 signature of at most MAX_SIGNATURE_BYTES; SignatureError names what is wrong."""
    import base64
    import binascii

    if not isinstance(value, str) or not value:
        raise SignatureError("unsigned archive: no signature")
    if len(value) > MAX_SIGNATURE_TEXT:
        raise SignatureError(f"{name} is {len(value)} characters long; at most {MAX_SIGNATURE_TEXT} are taken")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{name} is not base64") from None
    if not data:
        raise SignatureError("unsigned archive: the signature is empty")
    return data


def certificate_pem(value: Any, name: str = "signer_certificate") -> str:
    """One PEM certificate of at most MAX_CERTIFICATE_BYTES, as given (not parsed); SignatureError if not."""
    if not isinstance(value, str) or not value:
        raise SignatureError("unsigned archive: no signer certificate")
    if len(value) > MAX_CERTIFICATE_BYTES:
        raise SignatureError(f"{name} is {len(value)} bytes long; at most {MAX_CERTIFICATE_BYTES} are taken")
    if not re.fullmatch(_PEM_CERT, value):
        raise SignatureError(f"{name} is not one PEM certificate")
    return value


def statement(sha256: str, size: int, purpose: str = PURPOSE) -> bytes:
    """The canonical bytes a signature covers: purpose, the archive's hex sha256 and size in bytes."""
    if not isinstance(sha256, str) or not re.fullmatch(_SHA256, sha256):
        raise ValueError(f"sha256 {sha256!r} is not a lowercase hex digest")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size {size!r} is not a byte count")
    return f"{purpose}\nsha256:{sha256}\nsize:{size}\n".encode("ascii")


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size) of the bytes in a file, read in chunks."""
    import hashlib  # not at import: the console imports this module at start, and hashes only when it uploads

    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while data := f.read(_HASH_CHUNK):
            digest.update(data)
            size += len(data)
    return digest.hexdigest(), size


def sign_digest(sha256: str, size: int, key_pem: bytes, cert_pem: bytes) -> ArchiveSignature:
    """Sign the statement of an archive with this digest and size by the admin's key; its certificate goes along.

    SignatureError when the key is not an EC key or does not match the certificate (a broken kit).
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = _load_certificate(cert_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SignatureError("the kit's key is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError("the kit's key is not an ECDSA key: archives are signed with ECDSA")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise SignatureError("the kit's key does not match its certificate")
    signature = key.sign(statement(sha256, size), ec.ECDSA(hashes.SHA256()))
    return ArchiveSignature(signature, cert_pem)


def _load_certificate(pem: bytes) -> x509.Certificate:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem)


class SignatureChecks(Protocol):
    """What checks archive signatures: ArchiveVerifier, or the server's, which runs it in a child process."""

    def check_signer(self, signature: ArchiveSignature | None, uploader: str | None = None) -> PeerIdentity: ...

    def verify_digest(
        self, signature: ArchiveSignature | None, sha256: str, size: int, uploader: str | None = None
    ) -> PeerIdentity: ...

    def verify_file(
        self, path: str | os.PathLike, signature: ArchiveSignature | None, uploader: str | None = None
    ) -> PeerIdentity: ...


class ArchiveVerifier:
    """Checks archive signatures against one project CA and, when given, its revocation list.

    is_revoked: whether a certificate serial is revoked now (the server's RevocationList.is_revoked, or a site's
    CRL); None when this participant has no CRL.
    """

    def __init__(self, ca_pem: bytes, is_revoked: Callable[[int], bool] | None = None):
        self._ca_pem = ca_pem
        self._is_revoked = is_revoked

    @classmethod
    def of_startup(cls, startup: Path) -> ArchiveVerifier:
        """The verifier of a participant's kit folder: its rootCA.pem, and its crl.pem when it has one.

        The CRL is read at each check, so a revocation copied in later counts; one that cannot be trusted
        refuses every archive rather than honouring no revocation. SignatureError when there is no CA.
        """
        from fedcommon.kit import CA_FILE
        from fedcommon.revocation import CRL_FILE, RevocationError, load_revoked_serials

        try:
            ca_pem = (startup / CA_FILE).read_bytes()
        except OSError as e:
            raise SignatureError(
                f"no project CA to verify the archive's signature against ({startup / CA_FILE}: {e.strerror})",
                permission=True,
            ) from None
        crl = startup / CRL_FILE

        def is_revoked(serial: int) -> bool:
            if not crl.exists():
                return False
            try:
                return serial in load_revoked_serials(crl, ca_pem)
            except RevocationError as e:
                raise SignatureError(f"the revocation list cannot be trusted ({e})", permission=True) from None

        return cls(ca_pem, is_revoked)

    def check_signer(self, signature: ArchiveSignature | None, uploader: str | None = None) -> PeerIdentity:
        """The signer, if its certificate is an admin's of this project, valid now and not revoked (and is
        `uploader`, when given); SignatureError names why not. The signature itself is not checked here."""
        import datetime

        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.serialization import Encoding

        from fedcommon.cert_fields import CertificateFieldError
        from fedcommon.identity import identity_of

        if signature is None:
            raise SignatureError("unsigned archive: every deployed archive must be signed by an admin")
        if len(signature.signature) > MAX_SIGNATURE_BYTES or not signature.signature:
            raise SignatureError(f"malformed signature: {len(signature.signature)} bytes")
        try:
            certificate_pem(signature.signer_certificate.decode("ascii"))
            cert = x509.load_pem_x509_certificate(signature.signer_certificate)
        except (UnicodeDecodeError, ValueError) as e:
            raise SignatureError(f"the signer's certificate is not a PEM certificate ({e})") from None
        ca = x509.load_pem_x509_certificate(self._ca_pem)
        try:
            signer = identity_of(cert.public_bytes(Encoding.DER))
        except CertificateFieldError as e:
            raise SignatureError(f"the signer's certificate cannot be read ({e})") from None
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            # The name is the certificate's own claim, not vouched for by any CA of ours: shown cut short.
            raise SignatureError(
                f"signer {signer.name[:64]!r} is not an admin of this project (its certificate is not issued by "
                "this project's CA)",
                permission=True,
            ) from None
        if signer.kind != "admin":
            raise SignatureError(
                f"signer {signer.describe()} is not an admin of this project (only an admin's certificate signs "
                "archives)",
                permission=True,
            )
        now = datetime.datetime.now(datetime.timezone.utc)
        for what, c in (("signer's", cert), ("project CA's", ca)):
            if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                raise SignatureError(
                    f"the {what} certificate is not valid now (valid {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                    f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)",
                    permission=True,
                )
        if self._is_revoked is not None and self._is_revoked(cert.serial_number):
            raise SignatureError(f"signer's certificate is revoked ({signer.describe()})", permission=True)
        if uploader is not None and signer.name != uploader:
            raise SignatureError(
                f"the archive is signed by {signer.name!r}, not by the uploading admin {uploader!r}", permission=True
            )
        return signer

    def verify_digest(
        self, signature: ArchiveSignature | None, sha256: str, size: int, uploader: str | None = None
    ) -> PeerIdentity:
        """The signer, if `signature` is trusted (check_signer) and signs the statement of this digest and size.

        The digest must be one the caller computed from the bytes it holds, never one a peer claimed.
        """
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        signer = self.check_signer(signature, uploader)
        public_key = _load_certificate(signature.signer_certificate).public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise SignatureError(f"signer {signer.name!r}: the certificate's key is not an ECDSA key")
        try:
            public_key.verify(signature.signature, statement(sha256, size), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SignatureError(
                f"signature does not match the archive (signed by {signer.name!r}; the archive's sha256 is "
                f"{sha256[:16]}…, {size} bytes)"
            ) from None
        return signer

    def verify_file(
        self, path: str | os.PathLike, signature: ArchiveSignature | None, uploader: str | None = None
    ) -> PeerIdentity:
        """The signer, if `signature` is trusted and signs the archive at path (its digest computed here)."""
        self.check_signer(signature, uploader)  # cheap refusals first, before the file is read
        sha256, size = file_digest(path)
        return self.verify_digest(signature, sha256, size, uploader)

"""Signed uploads for tests that speak the admin plane's raw gRPC: what the console sends for a valid upload."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedcommon.archive_signature import ArchiveSignature, sign_digest
from fedcommon.kit import load_kit
from fedcommon.wire import admin_pb2 as apb


def signature_of(kit_folder: Path, data: bytes) -> ArchiveSignature:
    """`data` signed by the key of the kit in kit_folder."""
    kit = load_kit(kit_folder)
    return sign_digest(hashlib.sha256(data).hexdigest(), len(data), kit.key_pem, kit.cert_pem)


def signed_header(kit_folder: Path, data: bytes, name: str = "mmar.zip", sha256: str | None = None) -> apb.BlobHeader:
    """The BlobHeader of an upload of `data`, signed by the kit's admin (sha256: a header that claims another)."""
    signed = signature_of(kit_folder, data)
    return apb.BlobHeader(
        name=name,
        size=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        signature=signed.signature,
        signer_certificate=signed.signer_certificate,
    )


def signed_upload(kit_folder: Path, data: bytes, name: str = "mmar.zip") -> list[apb.BlobChunk]:
    """The chunks of a signed upload of `data`: its header, then 1 MiB data chunks."""
    chunks = [apb.BlobChunk(header=signed_header(kit_folder, data, name))]
    return chunks + [apb.BlobChunk(data=data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]


def deploy_headers(kit_folder: Path, data: bytes) -> dict[str, str]:
    """The signature fields of a deploy request for `data`, signed by the kit's admin."""
    return signature_of(kit_folder, data).to_text()

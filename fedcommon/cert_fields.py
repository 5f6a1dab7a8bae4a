"""The few fields of an X.509 certificate that name its holder (serial, subject CN, O, OU), read from DER without
the cryptography package: the server reads them for every peer, and a server that never loads that library is
10-12 MiB smaller (benchmarks/README.md, issue 25).

Only what RFC 5280 §4.1 lays out before the subject is walked; every length is checked against what encloses it.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

MAX_DER_BYTES = 64 * 1024
_SEQUENCE, _SET, _INTEGER, _OID, _VERSION = 0x30, 0x31, 0x02, 0x06, 0xA0
# Attribute types (X.520, RFC 5280 appendix A): id-at-commonName 2.5.4.3, organizationName 2.5.4.10,
# organizationalUnitName 2.5.4.11, as their DER encodings.
COMMON_NAME, ORGANIZATION, ORGANIZATIONAL_UNIT = b"\x55\x04\x03", b"\x55\x04\x0a", b"\x55\x04\x0b"
# The string types a DirectoryString or an attribute value may take, and how their bytes decode.
_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x14: "latin-1",  # TeletexString, read as cryptography reads it
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]{1,100000}?)-----END CERTIFICATE-----")


class CertificateFieldError(ValueError):
    """The bytes are not a DER certificate as RFC 5280 lays it out; the message says where it went wrong."""


@dataclass(frozen=True)
class CertificateFields:
    """A certificate's serial number and the first CN, O and OU of its subject (None when absent)."""

    serial: int
    common_name: str | None
    organization: str | None
    unit: str | None


def pem_to_der(pem: bytes) -> bytes:
    """The DER bytes of the first certificate in `pem`; CertificateFieldError when there is none."""
    found = _PEM.search(pem[: 2 * MAX_DER_BYTES])
    if found is None:
        raise CertificateFieldError("not a PEM certificate")
    try:
        return binascii.a2b_base64(re.sub(rb"[\r\n]", b"", found.group(1)), strict_mode=True)
    except binascii.Error as e:
        raise CertificateFieldError(f"not a PEM certificate ({e})") from None


def certificate_fields(der: bytes) -> CertificateFields:
    """Serial and subject names of the DER certificate `der`."""
    if len(der) > MAX_DER_BYTES:
        raise CertificateFieldError(f"certificate of {len(der)} bytes (at most {MAX_DER_BYTES})")
    start, end = _expect(der, 0, len(der), _SEQUENCE, "certificate")
    if end != len(der):
        raise CertificateFieldError("bytes after the certificate")
    start, tbs_end = _expect(der, start, end, _SEQUENCE, "tbsCertificate")
    tag, _, after = _element(der, start, tbs_end)
    if tag == _VERSION:
        start = after
    serial_start, start = _expect(der, start, tbs_end, _INTEGER, "serialNumber")
    if start == serial_start:
        raise CertificateFieldError("empty serialNumber")
    serial = int.from_bytes(der[serial_start:start], "big", signed=True)
    for what in ("signature", "issuer", "validity"):
        _, start = _expect(der, start, tbs_end, _SEQUENCE, what)
    subject_start, subject_end = _expect(der, start, tbs_end, _SEQUENCE, "subject")
    names = _names(der, subject_start, subject_end)
    return CertificateFields(serial, names.get(COMMON_NAME), names.get(ORGANIZATION), names.get(ORGANIZATIONAL_UNIT))


def _names(der: bytes, start: int, end: int) -> dict[bytes, str]:
    """The first value of each attribute type in a Name (a SEQUENCE OF SET OF AttributeTypeAndValue), in order."""
    found: dict[bytes, str] = {}
    while start < end:
        rdn, start = _expect(der, start, end, _SET, "subject's RelativeDistinguishedName")
        rdn_end = start
        while rdn < rdn_end:
            pair, rdn = _expect(der, rdn, rdn_end, _SEQUENCE, "subject's AttributeTypeAndValue")
            oid_start, value_at = _expect(der, pair, rdn, _OID, "attribute type")
            tag, value_start, value_end = _element(der, value_at, rdn)
            if value_end != rdn:
                raise CertificateFieldError("an attribute with more than a type and a value")
            oid = der[oid_start:value_at]
            if oid not in (COMMON_NAME, ORGANIZATION, ORGANIZATIONAL_UNIT) or oid in found:
                continue
            encoding = _STRINGS.get(tag)
            if encoding is None:
                raise CertificateFieldError(f"a subject name of ASN.1 type 0x{tag:02x}, not a string")
            try:
                found[oid] = der[value_start:value_end].decode(encoding)
            except UnicodeDecodeError:
                raise CertificateFieldError(f"a subject name that is not valid {encoding}") from None
    return found


def _expect(der: bytes, start: int, end: int, tag: int, what: str) -> tuple[int, int]:
    """(start, end) of the value of the element at `start`, which must have `tag`."""
    found, value_start, value_end = _element(der, start, end)
    if found != tag:
        raise CertificateFieldError(f"{what}: ASN.1 tag 0x{found:02x} where 0x{tag:02x} belongs")
    return value_start, value_end


def _element(der: bytes, start: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the DER element at `start`, which must lie within `end`."""
    if start + 2 > end:
        raise CertificateFieldError("truncated")
    tag, length = der[start], der[start + 1]
    if tag & 0x1F == 0x1F:
        raise CertificateFieldError("a multi-byte ASN.1 tag")
    start += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 3 or start + count > end:
            raise CertificateFieldError("a length that is not DER")
        length = int.from_bytes(der[start : start + count], "big")
        if length < 0x80 or der[start] == 0:  # DER takes the shortest form
            raise CertificateFieldError("a length that is not DER")
        start += count
    if start + length > end:
        raise CertificateFieldError("an element longer than what holds it")
    return tag, start, start + length

"""Issue a project CA and participant certificates, and lay out proof-of-concept startup kits."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("server", "client", "admin")
ADMIN_ROLES = ("project_admin", "org_admin", "lead", "member")
CA_VALID_DAYS = 3650
CERT_VALID_DAYS = 365
DEFAULT_ADMIN_NAME = "admin"

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


def check_name(name: str) -> str:
    """Return name unchanged if usable as a participant name (certificate CN), else raise PkiError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PkiError(
            f"participant name {name!r} is not valid: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


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
        raise PkiError(
            f"server host {host!r} is a bind-all address: give the address sites connect to, e.g. 127.0.0.1"
        )
    return host


def check_port(port: int, what: str) -> int:
    """Return port unchanged if it is an int in 1..65535, else raise PkiError naming what."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PkiError(f"{what} {port!r} is not a port number (1..65535)")
    return port


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(
    project: str, valid_days: int = CA_VALID_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
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
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a certificate (CN=name, signed by the CA) and its new key for a server, client or admin.

    A server certificate gets serverAuth and SANs for localhost, 127.0.0.1 and host; client and admin
    certificates get clientAuth; an admin's admin_role goes in the subject's OrganizationalUnit.
    """
    check_name(name)
    if role not in ROLES:
        raise PkiError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if role == "admin":
        if admin_role not in ADMIN_ROLES:
            raise PkiError(f"admin {name!r} needs admin_role, one of {', '.join(ADMIN_ROLES)}")
    elif admin_role is not None:
        raise PkiError(f"{name!r}: admin_role is only for admin certificates, not {role}")
    if host is not None and role != "server":
        raise PkiError(f"{name!r}: host is only for the server certificate, not {role}")

    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    organization = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    attributes += organization
    if admin_role is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, admin_role))

    key = new_private_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
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
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
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


def existing_kits(workspace: Path) -> list[Path]:
    """Return the CA folder and participant startup/ folders already present under workspace."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        return []
    found = [workspace / "ca"] if (workspace / "ca").exists() else []
    found += sorted(p / "startup" for p in workspace.iterdir() if (p / "startup").is_dir())
    return found


def _write_kit(
    folder: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    config: dict,
) -> None:
    folder.mkdir(mode=0o700)
    write_pem_cert(folder / "cert.pem", cert)
    write_private_key(folder / "key.pem", key)
    write_pem_cert(folder / "rootCA.pem", ca_cert)
    (folder / "fed.json").write_text(json.dumps(config, indent=2) + "\n")


def prepare_poc(
    workspace: Path,
    clients: int,
    host: str,
    fl_port: int,
    admin_port: int,
    project: str,
    force: bool,
) -> list[str]:
    """Create a CA and startup kits for server, site-1..site-N and admin under workspace.

    Returns the participant names. Refuses (PkiError, nothing written) when workspace already holds a
    CA or a startup kit, unless force, which replaces the CA and every existing startup/ folder and
    leaves everything else in the workspace alone.
    """
    workspace = Path(workspace)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise PkiError(f"clients must be a whole number >= 1, got {clients!r}")
    check_port(fl_port, "fl_port")
    check_port(admin_port, "admin_port")
    if fl_port == admin_port:
        raise PkiError(f"fl_port and admin_port must differ (both are {fl_port})")
    check_host(host)
    check_project(project)
    if workspace.exists() and not workspace.is_dir():
        raise PkiError(f"workspace {workspace} exists and is not a folder")
    present = existing_kits(workspace)
    if present and not force:
        shown = ", ".join(str(p) for p in present[:3]) + (" ..." if len(present) > 3 else "")
        raise PkiError(f"{workspace} already holds startup kits ({shown}); use --force to replace them")

    sites = [f"site-{i}" for i in range(1, clients + 1)]
    participants = ["server", *sites, DEFAULT_ADMIN_NAME]
    server = {"host": host, "fl_port": fl_port, "admin_port": admin_port}
    ca_cert, ca_key = create_ca(project)
    issued = [("server", "server", *issue_cert(ca_cert, ca_key, "server", "server", host=host), None)]
    issued += [(site, "client", *issue_cert(ca_cert, ca_key, site, "client"), None) for site in sites]
    issued.append(
        (
            DEFAULT_ADMIN_NAME,
            "admin",
            *issue_cert(ca_cert, ca_key, DEFAULT_ADMIN_NAME, "admin", admin_role="project_admin"),
            "project_admin",
        )
    )

    workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Everything is written into a private staging folder first, so a failure part-way leaves no
    # half-written kit behind, and only complete folders are moved into place.
    staging = Path(tempfile.mkdtemp(prefix=".poc-", dir=workspace))
    try:
        (staging / "ca").mkdir(mode=0o700)
        write_pem_cert(staging / "ca" / "rootCA.pem", ca_cert)
        write_private_key(staging / "ca" / "rootCA.key", ca_key)
        for name, role, cert, key, admin_role in issued:
            config: dict = {"name": name, "role": role, "project": project, "server": server}
            if admin_role is not None:
                config["admin_role"] = admin_role
            (staging / name).mkdir(mode=0o700)
            _write_kit(staging / name / "startup", cert, key, ca_cert, config)
        for old in present:
            shutil.rmtree(old)
        (staging / "ca").rename(workspace / "ca")
        for name in participants:
            (workspace / name).mkdir(mode=0o700, exist_ok=True)
            (staging / name / "startup").rename(workspace / name / "startup")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return participants

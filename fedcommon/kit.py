"""Load a participant's startup kit, check it, and turn it into mutual-TLS gRPC credentials."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fedcommon.admin_defs import ADMIN_ROLES, PARTICIPANT_ROLES

if TYPE_CHECKING:
    from cryptography import x509

logger = logging.getLogger(__name__)

STARTUP_DIR = "startup"
CONFIG_FILE = "fed.json"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "rootCA.pem"


class KitError(Exception):
    """A startup kit is missing, malformed or inconsistent; the message names the file and the fault."""


@dataclass(frozen=True)
class Kit:
    """One participant's identity (certificate, key, CA) and where its server listens."""

    folder: Path
    name: str
    role: str
    project: str
    org: str
    server_host: str
    fl_port: int
    admin_port: int
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)
    admin_role: str | None = None
    # The server's bulk channel for tensor bytes (fed.json "server.bulk_port"): 0 a free port it advertises to
    # sites, a fixed port where a firewall needs one, -1 (or false) none.
    bulk_port: int = 0

    @property
    def fl_target(self) -> str:
        """The gRPC target of the server's training/agent port, "host:fl_port"."""
        return _target(self.server_host, self.fl_port)

    @property
    def admin_target(self) -> str:
        """The gRPC target of the server's admin port, "host:admin_port"."""
        return _target(self.server_host, self.admin_port)


def _target(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KitError(f"{path}: missing") from None
    except OSError as exc:
        raise KitError(f"{path}: cannot read ({exc.strerror})") from None


def _locate(folder: Path) -> tuple[Path, Path]:
    """Return (participant folder, startup folder) for a participant folder or its startup/ folder."""
    if not folder.is_dir():
        raise KitError(f"{folder}: no such folder (expected a participant folder holding {STARTUP_DIR}/)")
    if (folder / STARTUP_DIR).is_dir():
        return folder, folder / STARTUP_DIR
    if folder.name == STARTUP_DIR or (folder / CONFIG_FILE).exists():
        return folder.parent, folder
    raise KitError(f"{folder / STARTUP_DIR}: missing (expected the startup kit of a participant)")


def _get(config: dict[str, Any], key: str, kind: type, path: Path, prefix: str = "") -> Any:
    if key not in config:
        raise KitError(f"{path}: missing key '{prefix}{key}'")
    value = config[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        expected = {str: "a string", int: "an integer", dict: "an object"}[kind]
        raise KitError(f"{path}: key '{prefix}{key}' must be {expected}, got {value!r}")
    return value


def _load_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(_read(path).decode("utf-8"))
    except UnicodeDecodeError:
        raise KitError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise KitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(config, dict):
        raise KitError(f"{path}: expected a JSON object at the top level")
    out: dict[str, Any] = {key: _get(config, key, str, path) for key in ("name", "role", "project")}
    if out["role"] not in PARTICIPANT_ROLES:
        raise KitError(f"{path}: key 'role' must be one of {', '.join(PARTICIPANT_ROLES)}, got {out['role']!r}")
    out["org"] = _get(config, "org", str, path) if "org" in config else None
    server = _get(config, "server", dict, path)
    out["server_host"] = _get(server, "host", str, path, "server.")
    for key in ("fl_port", "admin_port"):
        port = _get(server, key, int, path, "server.")
        if not 1 <= port <= 65535:
            raise KitError(f"{path}: key 'server.{key}' must be a port number (1..65535), got {port}")
        out[key] = port
    out["bulk_port"] = _bulk_port(server, path)
    out["admin_role"] = None
    if out["role"] == "admin":
        admin_role = _get(config, "admin_role", str, path)
        if admin_role not in ADMIN_ROLES:
            raise KitError(f"{path}: key 'admin_role' must be one of {', '.join(ADMIN_ROLES)}, got {admin_role!r}")
        out["admin_role"] = admin_role
    return out


def _bulk_port(server: dict[str, Any], path: Path) -> int:
    value = server.get("bulk_port", 0)
    if value is False:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 65535:
        raise KitError(
            f"{path}: key 'server.bulk_port' must be a port number, 0 (a free port) or -1 / false (off), got {value!r}"
        )
    return value


def _load_cert(path: Path) -> tuple[bytes, x509.Certificate]:
    from cryptography import x509

    data = _read(path)
    try:
        return data, x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KitError(f"{path}: not a PEM certificate") from None


def _subject(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def _check_validity(cert: x509.Certificate, path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise KitError(f"{path}: certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise KitError(f"{path}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def load_kit(folder: str | os.PathLike, check_certificates: bool = True) -> Kit:
    """Load and check the kit in a participant folder or its startup/ folder; raise KitError if unusable.

    Checks that fed.json is complete, the key matches the certificate, the certificate is issued by the
    kit's CA, is in its validity period, and names the participant: CN its name, O its org (fed.json's
    "org", else taken from the certificate), OU "server", "client" or an admin's role.

    Without `check_certificates`, only fed.json is checked and the PEM files read (no cryptography import, ~90 ms
    less for a one-shot console call); the TLS handshake then checks them, and a caller whose connection fails
    loads the kit again with the checks to say why. The org is then fed.json's, or "" when it names none.
    """
    participant, startup = _locate(Path(folder).resolve())
    config_path, cert_path, key_path, ca_path = (
        startup / CONFIG_FILE,
        startup / CERT_FILE,
        startup / KEY_FILE,
        startup / CA_FILE,
    )
    config = _load_config(config_path)
    if not check_certificates:
        config["org"] = config["org"] or ""
        return Kit(
            folder=participant, cert_pem=_read(cert_path), key_pem=_read(key_path), ca_pem=_read(ca_path), **config
        )
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    cert_pem, cert = _load_cert(cert_path)
    ca_pem, ca_cert = _load_cert(ca_path)
    key_pem = _read(key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KitError(f"{key_path}: not an unencrypted PEM private key") from None
    if key_path.stat().st_mode & 0o077:
        logger.warning("%s: private key is readable by group or others; it should be mode 0600", key_path)

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise KitError(f"{key_path}: private key does not match the certificate in {cert_path}")
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KitError(f"{ca_path}: not a CA certificate")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise KitError(
            f"{cert_path}: not issued by the CA in {ca_path} (kits from different projects mixed?)"
        ) from None
    _check_validity(ca_cert, ca_path)
    _check_validity(cert, cert_path)

    common_name = _subject(cert, NameOID.COMMON_NAME)
    if common_name != config["name"]:
        raise KitError(f"{cert_path}: certificate is for {common_name!r} but {config_path} names {config['name']!r}")
    cert_role = _subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if config["admin_role"] is not None:
        if cert_role != config["admin_role"]:
            raise KitError(
                f"{cert_path}: certificate grants admin role {cert_role!r} "
                f"but {config_path} says {config['admin_role']!r}"
            )
    elif cert_role != config["role"]:
        hint = " (a kit from before every certificate carried its role: issue it again)" if cert_role is None else ""
        raise KitError(
            f"{cert_path}: certificate is for role (OU) {cert_role!r} but {config_path} says {config['role']!r}{hint}"
        )
    cert_org = _subject(cert, NameOID.ORGANIZATION_NAME)
    if cert_org is None:
        raise KitError(f"{cert_path}: certificate names no organization (O)")
    if config["org"] is None:
        config["org"] = cert_org
    elif config["org"] != cert_org:
        raise KitError(
            f"{cert_path}: certificate is for organization {cert_org!r} but {config_path} says {config['org']!r}"
        )
    return Kit(folder=participant, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem, **config)


def server_credentials(kit: Kit) -> grpc.ServerCredentials:
    """Mutual-TLS server credentials from the server's kit: clients must present a cert from its CA."""
    if kit.role != "server":
        raise KitError(f"{kit.folder}: server credentials need the server's kit, this is {kit.name!r} ({kit.role})")
    return grpc.ssl_server_credentials(
        [(kit.key_pem, kit.cert_pem)], root_certificates=kit.ca_pem, require_client_auth=True
    )


def _tls_context(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_ssl_context(kit: Kit) -> ssl.SSLContext:
    """The TLS settings of server_credentials for a socket of the server's own (the bulk channel): the kit's
    certificate, and a client certificate from the kit's CA required."""
    if kit.role != "server":
        raise KitError(f"{kit.folder}: a server TLS context needs the server's kit, this is {kit.name!r} ({kit.role})")
    context = _tls_context(ssl.PROTOCOL_TLS_SERVER)
    context.load_verify_locations(cadata=kit.ca_pem.decode("ascii"))
    startup = kit.folder / STARTUP_DIR
    context.load_cert_chain(startup / CERT_FILE, startup / KEY_FILE)
    return context


def client_ssl_context(files: Mapping[str, str | os.PathLike | None], where: str) -> ssl.SSLContext:
    """What tls_channel_credentials gives gRPC, for a socket of the participant's own: trust only the root
    certificate (hostnames checked), present the participant's certificate. Same `files` and errors."""
    names = list(files)
    paths = [files[name] for name in names]
    for name, path in zip(names, paths, strict=True):
        if not path:
            raise ValueError(f"{where} is missing {name!r}")
    context = _tls_context(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=paths[0])
        context.load_cert_chain(paths[1], paths[2])
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"{where}: cannot load the TLS files {', '.join(names)}: {e}") from None
    return context


def tls_channel_credentials(files: Mapping[str, str | os.PathLike | None], where: str) -> grpc.ChannelCredentials:
    """Mutual-TLS channel credentials from PEM files outside a kit.

    `files` maps the names of the root certificate, the participant's certificate and its private key, in that
    order, to their paths; ValueError, starting with `where`, names one that is not given or cannot be read.
    """
    pems = []
    for name, path in files.items():
        if not path:
            raise ValueError(f"{where} is missing {name!r}")
        try:
            pems.append(Path(path).read_bytes())
        except OSError as e:
            raise ValueError(f"{where}: cannot read {name} {path}: {e.strerror}") from None
    root_cert, cert, private_key = pems
    return grpc.ssl_channel_credentials(root_cert, private_key, cert)


def channel_credentials(kit: Kit) -> grpc.ChannelCredentials:
    """Mutual-TLS channel credentials: present the kit's certificate, trust only the kit's CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=kit.ca_pem, private_key=kit.key_pem, certificate_chain=kit.cert_pem
    )


_KIT_OF = {"server": "the server", "client": "a site", "admin": "an admin"}


def load_participant_kit(folder: Path, role: str, command: str) -> Kit:
    """The kit in `folder`, which must be of `role` ("server" or "client"); KitError names what it holds instead.

    `command` is what needs it ("fedserver start"), for the message.
    """
    kit = load_kit(folder)
    if kit.role != role:
        raise KitError(
            f"{kit.folder} holds the kit of {kit.name} ({_KIT_OF.get(kit.role, kit.role)}), not "
            f"{'the server' if role == 'server' else 'a site'}'s: `{command}` needs "
            f"{'the server' if role == 'server' else 'a site'}'s kit"
        )
    return kit

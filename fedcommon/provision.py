"""Provision startup kits from a project description: the CA, its state, the CRL and one kit per participant."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcommon.atomic import atomic_write_bytes
from fedcommon.deployed_code import SERVER_CODE_POLICY
from fedcommon.pki import (
    ADMIN_ROLES,
    CA_VALID_DAYS,
    CERT_VALID_DAYS,
    PkiError,
    check_host,
    check_name,
    check_org,
    check_port,
    check_project,
    create_ca,
    issue_cert,
    write_crl,
    write_pem_cert,
    write_private_key,
)

RESERVED_SITE_NAMES = ("server", "client", "all")
DEFAULT_ADMIN_NAME = "admin"
DEFAULT_SERVER_NAME = "server"
CA_DIR = "ca"
CA_CERT_FILE = "rootCA.pem"
CA_KEY_FILE = "rootCA.key"
STATE_FILE = "state.json"
CRL_FILE = "crl.pem"
STARTUP_DIR = "startup"
_STATE_VERSION = 1


class ProvisionError(PkiError):
    """Provisioning refused before anything was written; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems (nothing was written):\n" + "\n".join(
                f"  {problem}" for problem in self.problems
            )
        super().__init__(message)


def existing_kits(workspace: Path) -> list[Path]:
    """Return the CA folder and participant startup/ folders already present under workspace."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        return []
    found = [workspace / CA_DIR] if (workspace / CA_DIR).exists() else []
    found += sorted(p / STARTUP_DIR for p in workspace.iterdir() if (p / STARTUP_DIR).is_dir())
    return found


@dataclass(frozen=True)
class Participant:
    """One participant as a project names it: kind server, client (a site) or admin; role is its OU.

    role is "server" for the server, "client" for a site and the admin role for an admin.
    """

    name: str
    kind: str
    org: str
    role: str
    where: str = field(default="", compare=False)  # where the project file names it, e.g. "sites[1]"


@dataclass(frozen=True)
class Project:
    """A federation to provision: its name, the server's address, and every participant (server first)."""

    name: str
    host: str
    fl_port: int
    admin_port: int
    participants: tuple[Participant, ...]
    cert_lifetime_days: int = CERT_VALID_DAYS
    source: str = "project file"

    @property
    def server(self) -> Participant:
        """The server participant."""
        return self.participants[0]

    @property
    def address(self) -> dict[str, Any]:
        """The server address every kit embeds: host, fl_port, admin_port."""
        return {"host": self.host, "fl_port": self.fl_port, "admin_port": self.admin_port}


@dataclass(frozen=True)
class IssuedCert:
    """One certificate the CA issued, as the CA state records it."""

    name: str
    kind: str
    org: str
    role: str
    serial: int
    not_after: datetime.datetime
    revoked: bool = False

    def to_json(self) -> dict[str, Any]:
        """The state.json form: the serial as a hex string, not_after in ISO 8601."""
        return {
            "name": self.name,
            "kind": self.kind,
            "org": self.org,
            "role": self.role,
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
            "revoked": self.revoked,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IssuedCert:
        """The record that to_json wrote."""
        revoked = data["revoked"]
        if not isinstance(revoked, bool):
            raise TypeError(f"revoked must be true or false, got {revoked!r}")
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            org=str(data["org"]),
            role=str(data["role"]),
            serial=int(data["serial"], 16),
            not_after=datetime.datetime.fromisoformat(data["not_after"]),
            revoked=revoked,
        )


@dataclass(frozen=True)
class _CaState:
    project: str
    server: dict[str, Any]  # name, host, fl_port, admin_port
    participants: dict[str, IssuedCert]  # each participant's current certificate
    superseded: tuple[IssuedCert, ...] = ()  # certificates replaced by a reissue, all revoked

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "project": self.project,
            "server": self.server,
            "participants": [record.to_json() for record in self.participants.values()],
            "superseded": [record.to_json() for record in self.superseded],
        }

    def revoked_serials(self) -> list[int]:
        return [r.serial for r in (*self.participants.values(), *self.superseded) if r.revoked]


@dataclass(frozen=True)
class ProvisionedParticipant:
    """One participant after a provision run; status is issued, kept, reissued or revoked."""

    name: str
    kind: str
    org: str
    role: str
    status: str
    serial: int
    not_after: datetime.datetime
    kit: Path
    listed: bool  # whether the project names it; one it no longer names keeps a valid certificate


@dataclass(frozen=True)
class Provisioned:
    """What a provision run left under out: the CA, its state, the CRL and every participant's kit."""

    out: Path
    project: str
    host: str
    fl_port: int
    admin_port: int
    server_name: str
    participants: tuple[ProvisionedParticipant, ...]
    revoked_serials: tuple[int, ...]

    @property
    def ca_dir(self) -> Path:
        """The CA folder (rootCA.key is in it and in no kit)."""
        return self.out / CA_DIR

    @property
    def state_file(self) -> Path:
        """The CA state: every certificate issued, its serial and whether it is revoked."""
        return self.out / CA_DIR / STATE_FILE

    @property
    def crl_files(self) -> tuple[Path, Path]:
        """The CRL in the server's startup folder (the one the server reads) and its copy in the CA folder."""
        return self.out / self.server_name / STARTUP_DIR / CRL_FILE, self.out / CA_DIR / CRL_FILE


def _read_yaml(path: Path) -> Any:
    import yaml  # only provisioning reads YAML; servers and agents never load it

    class StrictLoader(yaml.SafeLoader):
        """A safe loader that refuses a key given twice in one mapping instead of keeping the last."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping",
                            node.start_mark,
                            f"found the key {key_node.value!r} twice",
                            key_node.start_mark,
                        )
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProvisionError([f"{path}: not UTF-8 text"]) from None
    except OSError as exc:
        raise ProvisionError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ProvisionError([f"{path}: not valid YAML: {problem}{where}"]) from None


class _Problems:
    """Collects every problem of a project file, each naming the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{self.source}: {key}: {message}" if key else f"{self.source}: {message}")

    def mapping(self, value: Any, key: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict | None:
        """value if it is a mapping, reporting its unknown and missing keys; None if not a mapping."""
        if not isinstance(value, dict):
            self.add(key, f"must be a mapping with keys {', '.join(required + optional)}, got {value!r}")
            return None
        allowed = required + optional
        for k in value:
            if k not in allowed:
                self.add(_key(key, k), f"unknown key (expected one of {', '.join(allowed)})")
        for k in required:
            if k not in value:
                self.add(_key(key, k), "required")
        return value

    def value(self, mapping: dict, prefix: str, key: str, check: Callable[[Any], Any], default: Any = None) -> Any:
        """check(mapping[key]), or default when absent; a PkiError from check is reported, giving None."""
        if key not in mapping:
            return default
        try:
            return check(mapping[key])
        except PkiError as exc:
            self.add(_key(prefix, key), str(exc))
            return None


def _key(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise PkiError(f"must be a port number (1..65535), got {value!r}")
    return value


def _lifetime(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= CA_VALID_DAYS:
        raise PkiError(f"must be a whole number of days from 1 to {CA_VALID_DAYS}, got {value!r}")
    return value


def _admin_role(value: Any) -> str:
    if value not in ADMIN_ROLES:
        raise PkiError(f"must be one of {', '.join(ADMIN_ROLES)}, got {value!r}")
    return value


def _list(problems: _Problems, data: dict, key: str) -> list:
    value = data.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(key, f"must be a list, got {value!r}")
        return []
    return value


def parse_project(data: Any, source: str) -> Project:
    """The Project that data (a project file's parsed YAML) describes; source names the file in messages.

    Raises ProvisionError listing every problem, each as "<source>: <key>: <what is wrong>".
    """
    problems = _Problems(source)
    if data is None:
        raise ProvisionError([f"{source}: empty; expected the keys project, server, sites and admins"])
    top = problems.mapping(data, "", ("project", "server"), ("cert_lifetime_days", "sites", "admins"))
    if top is None:
        raise ProvisionError(problems.items)
    name = problems.value(top, "", "project", check_project)
    lifetime = problems.value(top, "", "cert_lifetime_days", _lifetime, CERT_VALID_DAYS)

    host = fl_port = admin_port = None
    participants: list[Participant] = []
    seen: dict[str, str] = {}

    def add(where: str, pname: Any, kind: str, org: Any, role: Any) -> None:
        if pname is None:
            return
        if pname in seen:
            problems.add(
                f"{where}.name",
                f"{pname!r} is already the name of {seen[pname]}; names are unique across server, sites and admins",
            )
            return
        seen[pname] = where
        if org is not None and role is not None:
            participants.append(Participant(pname, kind, org, role, where))

    server = None
    if "server" in top:
        server = problems.mapping(top["server"], "server", ("host", "fl_port", "admin_port"), ("name", "org"))
    if server is not None:
        server_name = problems.value(server, "server", "name", _server_name, DEFAULT_SERVER_NAME)
        host = problems.value(server, "server", "host", check_host)
        fl_port = problems.value(server, "server", "fl_port", _port)
        admin_port = problems.value(server, "server", "admin_port", _port)
        if fl_port is not None and fl_port == admin_port:
            problems.add("server.admin_port", f"must differ from server.fl_port (both are {fl_port})")
        org = problems.value(server, "server", "org", check_org, name)
        add("server", server_name, "server", org, "server")

    for i, entry in enumerate(_list(problems, top, "sites")):
        where = f"sites[{i}]"
        site = problems.mapping(entry, where, ("name", "org"), ())
        if site is not None:
            site_name = problems.value(site, where, "name", _site_name)
            add(where, site_name, "client", problems.value(site, where, "org", check_org), "client")

    for i, entry in enumerate(_list(problems, top, "admins")):
        where = f"admins[{i}]"
        admin = problems.mapping(entry, where, ("name", "org", "role"), ())
        if admin is not None:
            admin_name = problems.value(admin, where, "name", check_name)
            org = problems.value(admin, where, "org", check_org)
            add(where, admin_name, "admin", org, problems.value(admin, where, "role", _admin_role))

    if problems.items:
        raise ProvisionError(problems.items)
    return Project(name, host, fl_port, admin_port, tuple(participants), lifetime, source)


def _server_name(value: Any) -> str:
    check_name(value)
    if value in RESERVED_SITE_NAMES and value != DEFAULT_SERVER_NAME:
        raise PkiError(f"{value!r} is a command target that means the sites; choose another server name")
    return value


def _site_name(value: Any) -> str:
    check_name(value)
    if value in RESERVED_SITE_NAMES:
        raise PkiError(
            f"{value!r} is reserved for command targets ({', '.join(RESERVED_SITE_NAMES)}); choose another site name"
        )
    return value


def load_project(path: str | os.PathLike) -> Project:
    """Read and check a project file (YAML); raise ProvisionError listing every problem with file and key."""
    path = Path(path)
    return parse_project(_read_yaml(path), str(path))


def _read_state(out: Path) -> _CaState | None:
    path = out / CA_DIR / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        server = data["server"]
        state = _CaState(
            project=str(data["project"]),
            server={
                "name": str(server["name"]),
                "host": str(server["host"]),
                "fl_port": int(server["fl_port"]),
                "admin_port": int(server["admin_port"]),
            },
            participants={r.name: r for r in map(IssuedCert.from_json, data["participants"])},
            superseded=tuple(map(IssuedCert.from_json, data["superseded"])),
        )
    except OSError as exc:
        raise PkiError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PkiError(f"{path}: not a CA state written by provision ({type(exc).__name__}: {exc})") from None
    return state


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{cert_path}: cannot load the CA certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"{key_path}: cannot load the CA key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: not an EC private key")
    return cert, key


def _plan(
    project: Project, out: Path, state: _CaState | None, revoke: tuple[str, ...], reissue: tuple[str, ...], fresh: bool
) -> tuple[dict[str, str], list[str]]:
    """Each listed participant's status (issued, kept, reissued, revoked) and every reason to refuse."""
    problems: list[str] = []
    source = project.source
    current = state.participants if state is not None else {}
    if state is None and not fresh and (present := existing_kits(out)):
        shown = ", ".join(str(p) for p in present[:3]) + (" ..." if len(present) > 3 else "")
        problems.append(
            f"{out}: holds {shown} but no CA state {out / CA_DIR / STATE_FILE}; "
            "it was not made by provision: give another --out folder"
        )
    if state is not None:
        state_file = out / CA_DIR / STATE_FILE
        if state.project != project.name:
            problems.append(
                f"{source}: project: {project.name!r}, but {state_file} is for project {state.project!r}; "
                "use another --out folder for another project"
            )
        if state.server["name"] != project.server.name:
            problems.append(
                f"{source}: server.name: {project.server.name!r}, but the server in {state_file} is "
                f"{state.server['name']!r}; the server cannot be renamed"
            )
        for key in ("host", "fl_port", "admin_port"):
            old, new = state.server[key], project.address[key]
            if old != new:
                problems.append(
                    f"{source}: server.{key}: changed from {old!r} to {new!r}; every kit under {out} embeds "
                    f"{old!r}: put it back, or provision a new federation into another --out folder"
                )

    statuses: dict[str, str] = {}
    for p in project.participants:
        record = current.get(p.name)
        kit = out / p.name / STARTUP_DIR
        if record is None:
            if p.name in reissue:
                problems.append(f"--reissue {p.name}: no certificate issued yet; it is issued without --reissue")
            elif not fresh and kit.exists():
                problems.append(
                    f"{source}: {p.where} {p.name!r}: {kit} exists but {out / CA_DIR / STATE_FILE} has no "
                    "certificate for it; move that folder away"
                )
            statuses[p.name] = "issued"
        elif p.name in reissue:
            statuses[p.name] = "reissued"
        elif record.revoked or p.name in revoke:
            statuses[p.name] = "revoked"
        elif (record.kind, record.org, record.role) != (p.kind, p.org, p.role):
            changes = [
                f"{what} from {old!r} to {new!r}"
                for what, old, new in (
                    ("kind", record.kind, p.kind),
                    ("org", record.org, p.org),
                    ("role", record.role, p.role),
                )
                if old != new
            ]
            problems.append(
                f"{source}: {p.where} {p.name!r}: {', '.join(changes)} changed since its certificate was "
                f"issued; use --reissue {p.name} to issue a new one (the old one is revoked)"
            )
        elif not (kit / "cert.pem").is_file():
            problems.append(f"{p.name}: kit {kit} is missing; use --reissue {p.name} to issue a new one")
        else:
            statuses[p.name] = "kept"

    listed = {p.name for p in project.participants}
    for name in reissue:
        if name not in listed:
            problems.append(f"--reissue {name}: not in {source}; a new certificate needs its entry there")
    for name in revoke:
        record = current.get(name)
        if record is None:
            problems.append(f"--revoke {name}: no certificate was issued to {name!r} under {out}")
        elif record.kind == "server":
            problems.append(
                f"--revoke {name}: the server's certificate cannot be revoked (only the server reads the CRL); "
                f"use --reissue {name} for a new server key"
            )
        elif name in reissue:
            problems.append(f"--revoke {name} and --reissue {name}: choose one")
    return statuses, problems


def _kit_config(project: Project, participant: Participant) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": participant.name,
        "role": participant.kind,
        "project": project.name,
        "org": participant.org,
        "server": project.address,
    }
    if participant.kind == "admin":
        config["admin_role"] = participant.role
    return config


def _write_kit(
    folder: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    config: dict,
) -> None:
    folder.mkdir(mode=0o700, parents=True)
    write_pem_cert(folder / "cert.pem", cert)
    write_private_key(folder / "key.pem", key)
    write_pem_cert(folder / "rootCA.pem", ca_cert)
    (folder / "fed.json").write_text(json.dumps(config, indent=2) + "\n")


def provision(
    project: Project, out: str | os.PathLike, revoke: Iterable[str] = (), reissue: Iterable[str] = ()
) -> Provisioned:
    """Issue under out what project names: a CA on the first run, then a kit per participant not yet issued.

    Kits already issued are kept byte for byte; each name in reissue gets a new key and certificate (the old
    one is revoked); each name in revoke is marked revoked. The CA state and the CRL are rewritten on every
    run. Raises ProvisionError listing every reason to refuse, with nothing written.
    """
    return _provision(project, Path(out), tuple(dict.fromkeys(revoke)), tuple(dict.fromkeys(reissue)), False)


def _provision(
    project: Project, out: Path, revoke: tuple[str, ...], reissue: tuple[str, ...], replace: bool
) -> Provisioned:
    """provision(); with replace, any CA and kits under out are ignored while planning and removed at the end."""
    if out.exists() and not out.is_dir():
        raise ProvisionError([f"{out}: exists and is not a folder"])
    state = None if replace else _read_state(out)
    statuses, problems = _plan(project, out, state, revoke, reissue, fresh=replace)
    if problems:
        raise ProvisionError(problems)

    if state is None:
        ca_cert, ca_key = create_ca(project.name)
        current: dict[str, IssuedCert] = {}
        superseded: tuple[IssuedCert, ...] = ()
    else:
        ca_cert, ca_key = _load_ca(out / CA_DIR)
        current, superseded = dict(state.participants), state.superseded

    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Every new kit is written into a private staging folder first, so a failure part-way leaves no
    # half-written kit behind, and only complete folders are moved into place.
    staging = Path(tempfile.mkdtemp(prefix=".provision-", dir=out))
    try:
        issued: list[str] = []
        for p in project.participants:
            if statuses[p.name] not in ("issued", "reissued"):
                continue
            cert, key = issue_cert(
                ca_cert,
                ca_key,
                p.name,
                p.kind,
                host=project.host if p.kind == "server" else None,
                admin_role=p.role if p.kind == "admin" else None,
                valid_days=project.cert_lifetime_days,
                org=p.org,
            )
            _write_kit(staging / p.name / STARTUP_DIR, cert, key, ca_cert, _kit_config(project, p))
            if p.name in current:
                superseded += (dataclasses.replace(current[p.name], revoked=True),)
            current[p.name] = IssuedCert(p.name, p.kind, p.org, p.role, cert.serial_number, cert.not_valid_after_utc)
            issued.append(p.name)
        for name in revoke:
            current[name] = dataclasses.replace(current[name], revoked=True)
        new_state = _CaState(project.name, {"name": project.server.name, **project.address}, current, superseded)
        state_json = (json.dumps(new_state.to_json(), indent=2) + "\n").encode()

        # The state goes in before any kit: a certificate that has left staging is always on record, so it
        # can be revoked; a run cut short leaves at worst a recorded kit that is missing (--reissue fixes it).
        if state is None:
            (staging / CA_DIR).mkdir(mode=0o700)
            write_pem_cert(staging / CA_DIR / CA_CERT_FILE, ca_cert)
            write_private_key(staging / CA_DIR / CA_KEY_FILE, ca_key)
            (staging / CA_DIR / STATE_FILE).write_bytes(state_json)
            for old in existing_kits(out) if replace else []:
                shutil.rmtree(old)
            (staging / CA_DIR).rename(out / CA_DIR)
        else:
            atomic_write_bytes(out / CA_DIR / STATE_FILE, state_json)
        for name in issued:
            kit = out / name / STARTUP_DIR
            (out / name).mkdir(mode=0o700, exist_ok=True)
            if kit.exists():
                kit.rename(staging / name / "replaced")
            (staging / name / STARTUP_DIR).rename(kit)
        for crl in (out / project.server.name / STARTUP_DIR / CRL_FILE, out / CA_DIR / CRL_FILE):
            write_crl(crl, ca_cert, ca_key, new_state.revoked_serials())
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    listed = {p.name for p in project.participants}
    order = [p.name for p in project.participants] + [name for name in current if name not in listed]
    rows = []
    for name in order:
        record = current[name]
        status = "revoked" if record.revoked else statuses.get(name, "kept")
        rows.append(
            ProvisionedParticipant(
                name,
                record.kind,
                record.org,
                record.role,
                status,
                record.serial,
                record.not_after,
                out / name / STARTUP_DIR,
                name in listed,
            )
        )
    return Provisioned(
        out,
        project.name,
        project.host,
        project.fl_port,
        project.admin_port,
        project.server.name,
        tuple(rows),
        tuple(sorted(new_state.revoked_serials())),
    )


def _refuse_to_replace_a_provisioned_federation(workspace: Path) -> None:
    """--force may replace a POC, never a federation `provision` made: its CA cannot be had back."""
    state = _read_state(workspace)
    if state is None:
        return
    poc_name = re.compile(rf"({DEFAULT_SERVER_NAME}|{DEFAULT_ADMIN_NAME}|site-[0-9]+)")
    others = sorted(name for name in state.participants if not poc_name.fullmatch(name))
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise PkiError(
            f"{workspace} holds a federation made by `fedadmin provision` (participants {shown}); "
            "--force would destroy its CA: use another workspace"
        )


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

    Every participant's org is the project. Returns the participant names. Refuses (PkiError, nothing
    written) when workspace already holds a CA or a startup kit, unless force, which replaces the CA and
    every existing startup/ folder and leaves everything else in the workspace alone.
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
    if present:
        _refuse_to_replace_a_provisioned_federation(workspace)

    participants = (
        Participant(DEFAULT_SERVER_NAME, "server", project, "server"),
        *(Participant(f"site-{i}", "client", project, "client") for i in range(1, clients + 1)),
        Participant(DEFAULT_ADMIN_NAME, "admin", project, "project_admin"),
    )
    spec = Project(project, host, fl_port, admin_port, participants, source="poc prepare")
    _provision(spec, workspace, (), (), replace=True)
    # A POC is one user on one machine: the server may run deployed code (the MMAR's initial model) as that user
    # when it cannot change to another (it does not run as root). A real federation decides this itself.
    code_policy = workspace / DEFAULT_SERVER_NAME / SERVER_CODE_POLICY
    if not code_policy.exists():
        code_policy.parent.mkdir(mode=0o700, exist_ok=True)
        code_policy.write_text(json.dumps({"allow_as_server_user": True}, indent=2) + "\n")
    return [p.name for p in participants]

"""Tests for `fedadmin provision`: kits from a project file, re-runs, revocation, reissue and the CRL."""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedcommon import pki
from fedcommon import provision as provisioning
from fedcommon.kit import KitError, load_kit

ROOT = Path(__file__).resolve().parent.parent
KIT_FILES = {"cert.pem", "key.pem", "rootCA.pem", "fed.json"}

PROJECT: dict[str, Any] = {
    "project": "consortium",
    "server": {"host": "127.0.0.1", "fl_port": 8102, "admin_port": 8103},
    "sites": [{"name": "hospital-a", "org": "hospital-a"}, {"name": "hospital-b", "org": "hospital-b"}],
    "admins": [
        {"name": "admin@consortium", "org": "consortium", "role": "project_admin"},
        {"name": "alice@hospital-a", "org": "hospital-a", "role": "org_admin"},
        {"name": "bob@hospital-b", "org": "hospital-b", "role": "lead"},
        {"name": "carol@hospital-a", "org": "hospital-a", "role": "member"},
    ],
}
NAMES = [
    "server",
    "hospital-a",
    "hospital-b",
    "admin@consortium",
    "alice@hospital-a",
    "bob@hospital-b",
    "carol@hospital-a",
]


def project(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(PROJECT)
    data.update(changes)
    return data


def write_yml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def provision(tmp_path: Path, data: dict[str, Any], revoke=(), reissue=()) -> provisioning.Provisioned:
    spec = provisioning.load_project(write_yml(tmp_path / "project.yml", data))
    return provisioning.provision(spec, tmp_path / "out", revoke, reissue)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def kit_files(root: Path) -> dict[str, bytes]:
    """Every participant's kit files, without the CRL the server's kit receives on every run."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith("ca/") and not k.endswith("crl.pem")}


def cert_of(out: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out / name / "startup" / "cert.pem").read_bytes())


def subject(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [a.value for a in cert.subject.get_attributes_for_oid(oid)]


def load_crl(path: Path, out: Path) -> set[int]:
    """The serials a CRL revokes, after checking that the project's CA signed it."""
    crl = x509.load_pem_x509_crl(path.read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca" / "rootCA.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    return {entry.serial_number for entry in crl}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def state(out: Path) -> dict[str, Any]:
    return json.loads((out / "ca" / "state.json").read_text())


@pytest.fixture
def out(tmp_path) -> Path:
    """A provisioned federation of PROJECT."""
    provision(tmp_path, PROJECT)
    return tmp_path / "out"


def test_provision_lays_out_the_ca_and_one_private_loadable_kit_per_participant(tmp_path):
    result = provision(tmp_path, PROJECT)
    out = tmp_path / "out"
    assert [p.name for p in result.participants] == NAMES
    assert {p.status for p in result.participants} == {"issued"}
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, "ca"])
    assert {p.name for p in (out / "ca").iterdir()} == {"rootCA.pem", "rootCA.key", "state.json", "crl.pem"}
    assert mode(out / "ca") == 0o700
    assert mode(out / "ca" / "rootCA.key") == 0o600
    for name in NAMES:
        startup = out / name / "startup"
        assert {p.name for p in startup.iterdir()} == (KIT_FILES | {"crl.pem"} if name == "server" else KIT_FILES)
        assert mode(startup) == 0o700
        assert mode(startup / "key.pem") == 0o600
        assert (startup / "rootCA.pem").read_bytes() == (out / "ca" / "rootCA.pem").read_bytes()
        kit = load_kit(out / name)
        assert (kit.name, kit.project, kit.fl_target, kit.admin_target) == (
            name,
            "consortium",
            "127.0.0.1:8102",
            "127.0.0.1:8103",
        )
    assert load_kit(out / "hospital-a").org == "hospital-a"
    assert load_kit(out / "bob@hospital-b").admin_role == "lead"
    assert json.loads((out / "hospital-b" / "startup" / "fed.json").read_text())["org"] == "hospital-b"


def test_state_records_every_certificate_issued(out):
    recorded = state(out)
    assert recorded["project"] == "consortium"
    assert recorded["server"] == {"name": "server", "host": "127.0.0.1", "fl_port": 8102, "admin_port": 8103}
    rows = {p["name"]: p for p in recorded["participants"]}
    assert list(rows) == NAMES
    for name, row in rows.items():
        cert = cert_of(out, name)
        assert row["serial"] == f"{cert.serial_number:x}"
        assert datetime.datetime.fromisoformat(row["not_after"]) == cert.not_valid_after_utc
        assert row["revoked"] is False
    assert (rows["alice@hospital-a"]["kind"], rows["alice@hospital-a"]["org"], rows["alice@hospital-a"]["role"]) == (
        "admin",
        "hospital-a",
        "org_admin",
    )


@pytest.mark.parametrize(
    ("name", "org", "ou"),
    [
        ("server", "consortium", "server"),
        ("hospital-a", "hospital-a", "client"),
        ("admin@consortium", "consortium", "project_admin"),
        ("alice@hospital-a", "hospital-a", "org_admin"),
        ("bob@hospital-b", "hospital-b", "lead"),
        ("carol@hospital-a", "hospital-a", "member"),
    ],
)
def test_certificate_subject_names_the_participant_its_org_and_its_role(out, name, org, ou):
    cert = cert_of(out, name)
    assert subject(cert, NameOID.COMMON_NAME) == [name]
    assert subject(cert, NameOID.ORGANIZATION_NAME) == [org]
    assert subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == [ou]


def test_server_org_defaults_to_the_project_name(tmp_path):
    result = provision(tmp_path, PROJECT)
    assert result.participants[0].org == "consortium"
    assert subject(cert_of(tmp_path / "out", "server"), NameOID.ORGANIZATION_NAME) == ["consortium"]


def test_certificate_lifetime_is_honoured_and_the_ca_lasts_ten_years(tmp_path):
    provision(tmp_path, project(cert_lifetime_days=30))
    out = tmp_path / "out"
    cert = cert_of(out, "hospital-a")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, minutes=10)
    ca = x509.load_pem_x509_certificate((out / "ca" / "rootCA.pem").read_bytes())
    assert datetime.timedelta(days=3650) <= ca.not_valid_after_utc - ca.not_valid_before_utc
    assert ca.not_valid_after_utc - ca.not_valid_before_utc <= datetime.timedelta(days=3650, minutes=10)


def test_first_run_writes_an_empty_crl_to_the_server_kit_and_the_ca(out):
    assert load_crl(out / "server" / "startup" / "crl.pem", out) == set()
    assert load_crl(out / "ca" / "crl.pem", out) == set()


def test_rerun_with_an_added_site_keeps_existing_kits_byte_for_byte_and_adds_the_new_one(tmp_path, out):
    before = kit_files(out)
    ca_before = (out / "ca" / "rootCA.key").read_bytes()
    sites = [*PROJECT["sites"], {"name": "hospital-c", "org": "hospital-c"}]
    result = provision(tmp_path, project(sites=sites))
    statuses = {p.name: p.status for p in result.participants}
    assert statuses == {**dict.fromkeys(NAMES, "kept"), "hospital-c": "issued"}
    after = kit_files(out)
    assert {k: after[k] for k in before} == before
    assert (out / "ca" / "rootCA.key").read_bytes() == ca_before
    assert load_kit(out / "hospital-c").org == "hospital-c"
    assert load_kit(out / "hospital-c").ca_pem == (out / "ca" / "rootCA.pem").read_bytes()
    assert [p["name"] for p in state(out)["participants"]] == [*NAMES, "hospital-c"]


def test_rerun_without_changes_keeps_every_kit(tmp_path, out):
    before = kit_files(out)
    result = provision(tmp_path, PROJECT)
    assert {p.status for p in result.participants} == {"kept"}
    assert kit_files(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_participant_dropped_from_the_file_keeps_its_kit_and_is_reported_unlisted(tmp_path, out):
    before = kit_files(out)
    result = provision(tmp_path, project(sites=PROJECT["sites"][:1]))
    dropped = next(p for p in result.participants if p.name == "hospital-b")
    assert (dropped.status, dropped.listed) == ("kept", False)
    assert kit_files(out) == before


def _refused(tmp_path: Path, out: Path, data: dict[str, Any], *fragments: str, revoke=(), reissue=()) -> None:
    before = snapshot(out)
    with pytest.raises(provisioning.ProvisionError) as caught:
        provision(tmp_path, data, revoke, reissue)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_changed_org_is_refused_naming_the_entry_and_reissue_and_nothing_is_written(tmp_path, out):
    sites = [{"name": "hospital-a", "org": "hospital-z"}, PROJECT["sites"][1]]
    extra = [*PROJECT["admins"], {"name": "dave@hospital-b", "org": "hospital-b", "role": "member"}]
    _refused(
        tmp_path,
        out,
        project(sites=sites, admins=extra),
        "sites[0] 'hospital-a'",
        "org from 'hospital-a' to 'hospital-z'",
        "--reissue hospital-a",
    )
    assert not (out / "dave@hospital-b").exists()


def test_changed_admin_role_is_refused_naming_the_entry(tmp_path, out):
    admins = copy.deepcopy(PROJECT["admins"])
    admins[3]["role"] = "lead"
    _refused(
        tmp_path,
        out,
        project(admins=admins),
        "admins[3] 'carol@hospital-a'",
        "role from 'member' to 'lead'",
        "--reissue carol@hospital-a",
    )


@pytest.mark.parametrize(
    ("key", "new", "old"),
    [("host", "10.0.0.5", "'127.0.0.1'"), ("fl_port", 9102, "8102"), ("admin_port", 9103, "8103")],
)
def test_server_address_change_is_refused_naming_old_and_new(tmp_path, out, key, new, old):
    data = project()
    data["server"][key] = new
    _refused(tmp_path, out, data, f"server.{key}: changed from {old} to {new!r}")


def test_another_project_name_is_refused(tmp_path, out):
    _refused(tmp_path, out, project(project="other"), "'other'", "'consortium'")


def test_a_site_clashing_with_an_unrecorded_folder_is_refused(tmp_path, out):
    (out / "hospital-c" / "startup").mkdir(parents=True)
    sites = [*PROJECT["sites"], {"name": "hospital-c", "org": "hospital-c"}]
    _refused(tmp_path, out, project(sites=sites), "hospital-c", "move that folder away")


def test_missing_kit_of_an_issued_participant_is_refused_until_reissued(tmp_path, out):
    shutil.rmtree(out / "hospital-b" / "startup")
    _refused(tmp_path, out, PROJECT, "hospital-b", "--reissue hospital-b")
    provision(tmp_path, PROJECT, reissue=["hospital-b"])
    assert load_kit(out / "hospital-b").name == "hospital-b"


BAD_FILE = {
    "project": "consortium",
    "colour": "blue",
    "server": {"host": "127.0.0.1", "fl_port": 8102, "admin_port": 8103},
    "sites": [
        {"name": "hospital-a", "org": "hospital-a"},
        {"name": "hospital-b"},
        {"name": "all", "org": "x"},
        {"name": "hospital-a", "org": "hospital-a"},
    ],
    "admins": [{"name": "root@x", "org": "x", "role": "superuser"}],
}


def test_every_problem_of_a_project_file_is_reported_with_file_and_key_before_anything_is_written(tmp_path):
    path = write_yml(tmp_path / "project.yml", BAD_FILE)
    with pytest.raises(provisioning.ProvisionError) as caught:
        provisioning.load_project(path)
    problems = caught.value.problems
    expected = [
        "colour: unknown key",
        "sites[1].org: required",
        "sites[2].name: 'all' is reserved",
        "sites[3].name: 'hospital-a' is already the name of sites[0]",
        "admins[0].role: must be one of project_admin, org_admin, lead, member, got 'superuser'",
    ]
    assert len(problems) == len(expected)
    for problem, fragment in zip(problems, expected, strict=True):
        assert problem.startswith(f"{path}: ")
        assert fragment in problem
    assert "5 problems (nothing was written)" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project.yml"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("project: p\nserver: {host: 127.0.0.1, fl_port: 1, admin_port: 2}\nsites: [\n", "not valid YAML"),
        ("project: p\nproject: q\nserver: {host: 127.0.0.1, fl_port: 1, admin_port: 2}\n", "'project' twice"),
        ("- project\n", "must be a mapping"),
        ("", "empty"),
        ("project: p\n", "server: required"),
        ("project: p\nserver: {host: 127.0.0.1, fl_port: 1, admin_port: 1}\n", "server.admin_port: must differ"),
        ("project: p\nserver: {host: 'http://x', fl_port: 1, admin_port: 2}\n", "server.host: server host"),
        ("project: p\nserver: {host: 127.0.0.1, fl_port: 0, admin_port: 2}\n", "server.fl_port: must be a port"),
        ("project: p\nserver: {name: all, host: 127.0.0.1, fl_port: 1, admin_port: 2}\n", "server.name"),
        ("project: p q\nserver: {host: 127.0.0.1, fl_port: 1, admin_port: 2}\n", "project: project name"),
        (
            "project: p\ncert_lifetime_days: 0\nserver: {host: 127.0.0.1, fl_port: 1, admin_port: 2}\n",
            "cert_lifetime_days: must be a whole number of days",
        ),
        ("project: p\nserver: {host: 127.0.0.1, fl_port: 1, admin_port: 2}\nsites: {a: b}\n", "sites: must be a list"),
        (
            "project: p\nserver: {host: 127.0.0.1, fl_port: 1, admin_port: 2}\nsites: [{name: s, org: 'a b'}]\n",
            "sites[0].org: organization",
        ),
    ],
)
def test_project_file_problem_names_the_file_and_the_key(tmp_path, text, fragment):
    path = tmp_path / "project.yml"
    path.write_text(text)
    with pytest.raises(provisioning.ProvisionError) as caught:
        provisioning.load_project(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert fragment in str(caught.value)


def test_revoke_puts_the_serial_in_the_signed_crl_and_changes_no_kit(tmp_path, out):
    before = kit_files(out)
    serial = cert_of(out, "carol@hospital-a").serial_number
    result = provision(tmp_path, PROJECT, revoke=["carol@hospital-a"])
    assert {p.name: p.status for p in result.participants}["carol@hospital-a"] == "revoked"
    assert kit_files(out) == before
    assert load_crl(out / "server" / "startup" / "crl.pem", out) == {serial}
    assert load_crl(out / "ca" / "crl.pem", out) == {serial}
    rows = {p["name"]: p for p in state(out)["participants"]}
    assert rows["carol@hospital-a"]["revoked"] is True
    assert [name for name, row in rows.items() if row["revoked"]] == ["carol@hospital-a"]


def test_revoke_shuts_out_a_participant_whose_kit_was_lost(tmp_path, out):
    serial = cert_of(out, "hospital-b").serial_number
    shutil.rmtree(out / "hospital-b" / "startup")
    result = provision(tmp_path, PROJECT, revoke=["hospital-b"])
    assert {p.name: p.status for p in result.participants}["hospital-b"] == "revoked"
    assert load_crl(out / "server" / "startup" / "crl.pem", out) == {serial}


def test_revoked_participant_still_in_the_file_is_not_reissued_later(tmp_path, out):
    provision(tmp_path, PROJECT, revoke=["hospital-b"])
    serial = cert_of(out, "hospital-b").serial_number
    before = kit_files(out)
    result = provision(tmp_path, PROJECT)
    assert {p.name: p.status for p in result.participants}["hospital-b"] == "revoked"
    assert kit_files(out) == before
    assert load_crl(out / "server" / "startup" / "crl.pem", out) == {serial}


def test_reissue_gives_a_new_key_and_revokes_the_old_serial(tmp_path, out):
    before = kit_files(out)
    old_serial = cert_of(out, "hospital-a").serial_number
    result = provision(tmp_path, PROJECT, reissue=["hospital-a"])
    assert {p.name: p.status for p in result.participants}["hospital-a"] == "reissued"
    new_serial = cert_of(out, "hospital-a").serial_number
    assert new_serial != old_serial
    after = kit_files(out)
    assert after["hospital-a/startup/key.pem"] != before["hospital-a/startup/key.pem"]
    assert mode(out / "hospital-a" / "startup" / "key.pem") == 0o600
    assert {k: v for k, v in after.items() if not k.startswith("hospital-a/")} == {
        k: v for k, v in before.items() if not k.startswith("hospital-a/")
    }
    assert load_kit(out / "hospital-a").org == "hospital-a"
    assert load_crl(out / "server" / "startup" / "crl.pem", out) == {old_serial}
    recorded = state(out)
    assert {p["name"]: p["serial"] for p in recorded["participants"]}["hospital-a"] == f"{new_serial:x}"
    assert [(p["name"], p["serial"], p["revoked"]) for p in recorded["superseded"]] == [
        ("hospital-a", f"{old_serial:x}", True)
    ]


def test_reissue_takes_a_changed_org(tmp_path, out):
    sites = [{"name": "hospital-a", "org": "hospital-z"}, PROJECT["sites"][1]]
    provision(tmp_path, project(sites=sites), reissue=["hospital-a"])
    assert load_kit(out / "hospital-a").org == "hospital-z"
    assert subject(cert_of(out, "hospital-a"), NameOID.ORGANIZATION_NAME) == ["hospital-z"]


@pytest.mark.parametrize(
    ("revoke", "reissue", "fragment"),
    [
        (["hospital-x"], [], "--revoke hospital-x: no certificate was issued"),
        (["server"], [], "--revoke server: the server's certificate cannot be revoked"),
        ([], ["hospital-x"], "--reissue hospital-x: not in"),
        (["hospital-a"], ["hospital-a"], "choose one"),
    ],
)
def test_revoke_and_reissue_of_the_wrong_names_are_refused(tmp_path, out, revoke, reissue, fragment):
    _refused(tmp_path, out, PROJECT, fragment, revoke=revoke, reissue=reissue)


def test_poc_workspace_is_a_provisioned_federation_that_provision_can_extend(tmp_path):
    ws = tmp_path / "out"
    provisioning.prepare_poc(ws, 2, "127.0.0.1", 8002, 8003, "trial", False)
    assert load_crl(ws / "server" / "startup" / "crl.pem", ws) == set()
    before = kit_files(ws)
    data = {
        "project": "trial",
        "server": {"host": "127.0.0.1", "fl_port": 8002, "admin_port": 8003},
        "sites": [{"name": f"site-{i}", "org": "trial"} for i in (1, 2, 3)],
        "admins": [{"name": "admin", "org": "trial", "role": "project_admin"}],
    }
    result = provision(tmp_path, data)
    assert {p.name: p.status for p in result.participants} == {
        "server": "kept",
        "site-1": "kept",
        "site-2": "kept",
        "admin": "kept",
        "site-3": "issued",
    }
    assert {k: v for k, v in kit_files(ws).items() if k in before} == before
    assert load_kit(ws / "site-3").org == "trial"


def test_load_kit_refuses_an_org_in_fed_json_that_the_certificate_does_not_carry(out, tmp_path):
    site = Path(shutil.copytree(out / "hospital-a", tmp_path / "copy"))
    config = json.loads((site / "startup" / "fed.json").read_text())
    config["org"] = "hospital-b"
    (site / "startup" / "fed.json").write_text(json.dumps(config))
    with pytest.raises(KitError, match=r"cert\.pem: certificate is for organization 'hospital-a'.*'hospital-b'"):
        load_kit(site)
    del config["org"]
    (site / "startup" / "fed.json").write_text(json.dumps(config))
    assert load_kit(site).org == "hospital-a"


def test_load_kit_refuses_a_certificate_whose_role_is_not_the_kits(out, tmp_path):
    site = Path(shutil.copytree(out / "hospital-a", tmp_path / "copy"))
    config = json.loads((site / "startup" / "fed.json").read_text())
    config["role"] = "server"
    (site / "startup" / "fed.json").write_text(json.dumps(config))
    with pytest.raises(KitError, match=r"cert\.pem: certificate is for role \(OU\) 'client'"):
        load_kit(site)


def test_load_kit_refuses_an_expired_provisioned_certificate(out, tmp_path):
    from cryptography.hazmat.primitives import serialization

    site = Path(shutil.copytree(out / "hospital-a", tmp_path / "copy"))
    ca_cert = x509.load_pem_x509_certificate((out / "ca" / "rootCA.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca" / "rootCA.key").read_bytes(), password=None)
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    cert, key = pki.issue_cert(
        ca_cert, ca_key, "hospital-a", "client", org="hospital-a", valid_days=1, not_before=long_ago
    )
    for name in ("cert.pem", "key.pem"):
        (site / "startup" / name).unlink()
    pki.write_pem_cert(site / "startup" / "cert.pem", cert)
    pki.write_private_key(site / "startup" / "key.pem", key)
    with pytest.raises(KitError, match=r"cert\.pem: certificate expired"):
        load_kit(site)


def fedadmin(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "COLUMNS": "250",  # a table row per participant, names unbroken
    }
    env.pop("FEDADMIN_KIT", None)
    return subprocess.run(
        [sys.executable, "-m", "fedadmin.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_provisions_into_workspace_project_by_default_and_reports_json(tmp_path):
    yml = write_yml(tmp_path / "project.yml", PROJECT)
    result = fedadmin("--json", "provision", str(yml), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    out = (tmp_path / "workspace" / "consortium").resolve()
    assert (report["command"], report["ok"], report["out"]) == ("provision", True, str(out))
    assert report["ca"]["state"] == str(out / "ca" / "state.json")
    assert report["crl"] == [str(out / "server" / "startup" / "crl.pem"), str(out / "ca" / "crl.pem")]
    rows = {p["name"]: p for p in report["participants"]}
    assert list(rows) == NAMES
    assert rows["bob@hospital-b"] | {"serial": None, "expires": None} == {
        "name": "bob@hospital-b",
        "kind": "admin",
        "org": "hospital-b",
        "role": "lead",
        "status": "issued",
        "serial": None,
        "expires": None,
        "kit": str(out / "bob@hospital-b" / "startup"),
        "listed": True,
    }
    assert rows["bob@hospital-b"]["serial"] == f"{cert_of(out, 'bob@hospital-b').serial_number:x}"

    revoked = fedadmin("--json", "provision", str(yml), "--revoke", "bob@hospital-b", cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    report = json.loads(revoked.stdout)
    assert {p["name"]: p["status"] for p in report["participants"]}["bob@hospital-b"] == "revoked"
    assert report["revoked_serials"] == [rows["bob@hospital-b"]["serial"]]


def test_cli_prints_the_participants_and_where_the_ca_key_and_crl_are(tmp_path):
    yml = write_yml(tmp_path / "project.yml", PROJECT)
    out = tmp_path / "out"
    result = fedadmin("provision", str(yml), "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for word in ("hospital-a", "issued", "project_admin", "keep it private", "crl.pem", "no restart"):
        assert word in text


def test_cli_reports_project_file_problems_cleanly_and_writes_nothing(tmp_path):
    yml = write_yml(tmp_path / "project.yml", BAD_FILE)
    out = tmp_path / "out"
    result = fedadmin("provision", str(yml), "--out", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{yml}: sites[1].org: required" in result.stderr
    assert not out.exists()
    as_json = fedadmin("--json", "provision", str(yml), "--out", str(out))
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert (report["command"], report["ok"]) == ("provision", False)
    assert "admins[0].role" in report["error"]


def test_cli_refuses_a_missing_project_file_as_a_usage_error(tmp_path):
    result = fedadmin("provision", str(tmp_path / "nope.yml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_example_project_file_provisions_the_consortium(tmp_path):
    spec = provisioning.load_project(ROOT / "examples" / "project.yml")
    result = provisioning.provision(spec, tmp_path / "out")
    assert [(p.name, p.org, p.role) for p in result.participants] == [
        ("server", "consortium", "server"),
        ("hospital-a", "hospital-a", "client"),
        ("hospital-b", "hospital-b", "client"),
        ("admin@consortium", "consortium", "project_admin"),
        ("alice@hospital-a", "hospital-a", "org_admin"),
        ("bob@hospital-b", "hospital-b", "lead"),
        ("carol@hospital-a", "hospital-a", "member"),
    ]


def test_running_provision_leaves_numpy_and_torch_unloaded(tmp_path):
    yml = write_yml(tmp_path / "project.yml", PROJECT)
    args = ["--json", "provision", str(yml), "--out", str(tmp_path / "out")]
    code = (
        "import sys\n"
        "from fedadmin.cli import main\n"
        f"main({args!r}, standalone_mode=False)\n"
        "print([m for m in ('numpy', 'torch') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_poc_prepare_force_refuses_to_destroy_a_provisioned_federation(tmp_path):
    provisioning.provision(provisioning.load_project(ROOT / "examples" / "project.yml"), tmp_path / "out")
    before = (tmp_path / "out" / "ca" / "rootCA.key").read_bytes()
    with pytest.raises(pki.PkiError, match="made by `fedadmin provision`.*would destroy its CA"):
        provisioning.prepare_poc(tmp_path / "out", 2, "127.0.0.1", 8002, 8003, "consortium", True)
    assert (tmp_path / "out" / "ca" / "rootCA.key").read_bytes() == before

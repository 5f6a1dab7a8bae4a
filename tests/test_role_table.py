"""The role table of docs/admin-protocol.md, checked cell by cell against a real server over mutual TLS.

Every role × every admin command × a site of the admin's own org, a site of another org and the server:
the expectation is read from the docs (the "Rights:" line and the role × right scope table), never from
the code's own tables, so remapping a command's right in the code turns this red.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from conftest import ROOT
from provisioned import ProvisionedFederation, running
from signing import signed_header

from fedcommon.commands import COMMANDS, Targets
from fedcommon.wire import admin_pb2 as apb
from fedcommon.wire import admin_pb2_grpc as admin_grpc

pytestmark = pytest.mark.e2e

DOC = ROOT / "docs" / "admin-protocol.md"
OWN, OTHER = "hospital-a", "hospital-b"
SITES = {OWN: "org-a", OTHER: "org-b"}
ROLES = ("project_admin", "org_admin", "lead", "member")
ADMINS = {f"{role}@org-a": ("org-a", role) for role in ROLES}
# Every command that would change a site is vetoed by the sites' own policy, so an allowed one reaches the
# site (the server's decision is visible in its reply) and changes nothing there.
SITE_VETO = {
    "rules": [
        {
            "name": "role-table",
            "deny": ["shutdown", "restart", "abort", "delete-run", "start", "start-mgpu", "run-validation", "deploy"],
        }
    ]
}
# Valid arguments whose effect, when allowed, is harmless: an unknown blob, a run that does not exist, ...
ARGS = {
    "set-run": {"run_number": 1},
    "deploy": {"blob_id": "0" * 64},
    "start-mgpu": {"gpu_number": 1},
    "run-validation": {"run_number": 1},
    "shell": {"argv": ["pwd"]},
    "delete-run": {"run_number": 999},
    "logs": {"lines": 1},
    "set-timeout": {"seconds": 10},
    "submit": {"blob_id": "0" * 64},
    **{f"job-{act}": {"job_id": 999} for act in ("show", "abort", "clone", "delete", "download")},
}
SERVER_POLICY = "refused by the server's default policy"


# ---- the docs ------------------------------------------------------------------------------------


def doc_rights(text: str) -> dict[str, set[str]]:
    """command → the rights that allow it, from the paragraph that starts with "Rights:"."""
    found = re.search(r"^Rights:(.*?)(?:\n[ \t]*\n|\n(?=\S+:))", text, re.S | re.M)
    assert found, f"{DOC}: no 'Rights:' line"
    rights: dict[str, set[str]] = {}
    for right, commands in re.findall(r"`(\w+)`\s*\(([^)]*)\)", " ".join(found.group(1).split())):
        for command in commands.split(","):
            rights.setdefault(command.strip(), set()).add(right)
    return rights


def doc_scopes(text: str) -> dict[str, dict[str, str]]:
    """role → right → scope, from the table whose header starts with `| role |`."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"\|\s*role\s*\|", line)), None)
    assert start is not None, f"{DOC}: no role table"
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    scopes: dict[str, dict[str, str]] = {}
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set("".join(cells)) <= set("-: "):
            continue
        scopes[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return scopes


def test_the_docs_role_table_parses_and_names_every_command_the_server_declares():
    text = DOC.read_text()
    rights, scopes = doc_rights(text), doc_scopes(text)
    assert set(rights) == set(COMMANDS), "the docs' Rights line and the declared commands differ"
    assert set(scopes) == set(ROLES)
    assert all(set(s) == {"view", "train", "operate", "shell", "code"} for s in scopes.values()), scopes
    assert rights["logs"] == {"shell"} and rights["abort"] == {"train", "operate"}


def allowed(scopes: dict[str, dict[str, str]], rights: set[str], role: str, where: str) -> bool:
    """What the docs say: some right of the command is `any`, or `own_org` and the target is the admin's org's."""
    return any(scopes[role][r] == "any" or (scopes[role][r] == "own_org" and where == "own") for r in rights)


# ---- the federation ------------------------------------------------------------------------------


class Federation(ProvisionedFederation):
    def hold_off_restarts(self) -> None:
        """Five restarts just now: an allowed `restart server` is refused by the restart guard, not obeyed."""
        (self.out / "server" / "restarts.json").write_text(json.dumps([time.time()] * 5))


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Federation:
    with running(
        tmp_path_factory.mktemp("roles"), "roles", SITES, ADMINS, "project_admin@org-a", dict.fromkeys(SITES, SITE_VETO)
    ) as out:
        yield Federation(out)


def _cases(command: str) -> list[tuple[str, list[str], dict]]:
    """(where, targets, args) for each target kind the command takes: own, other (a site of org-b), server."""
    args = ARGS.get(command, {})
    if command == "remove-client":  # it acts on the site it names
        return [("own", ["server"], {"site": OWN}), ("other", ["server"], {"site": OTHER})]
    if COMMANDS[command].targets == Targets.SERVER:
        return [("server", ["server"], args)]
    return [("own", [OWN], args), ("other", [OTHER], args), ("server", ["server"], args)]


def _upload(stub: admin_grpc.AdminServiceStub, kits: Path, admin: str) -> tuple[bool, str]:
    """(refused by the policy, what the server said) for a tiny Upload, signed by the admin's kit."""
    data = f"role table {admin}".encode()
    header = signed_header(kits / admin, data, "x.zip")
    try:
        stub.Upload(iter([apb.BlobChunk(header=header), apb.BlobChunk(data=data)]), timeout=30)
    except grpc.RpcError as e:
        return e.code() is grpc.StatusCode.PERMISSION_DENIED and SERVER_POLICY in e.details(), e.details()
    return False, "stored"


def test_every_role_command_and_target_is_allowed_or_refused_as_the_docs_role_table_says(fed):
    text = DOC.read_text()
    rights, scopes = doc_rights(text), doc_scopes(text)
    wrong: list[str] = []
    checked = 0
    for role in ROLES:
        admin = f"{role}@org-a"
        stub = fed.stub(admin)
        for command in sorted(rights):
            if command == "upload":  # an RPC of its own, with no target: the server's right
                refused, said = _upload(stub, fed.out, admin)
                expected = allowed(scopes, rights[command], role, "server")
                if refused == expected:
                    wrong.append(f"{role} upload: docs say {'allowed' if expected else 'refused'}; server: {said}")
                checked += 1
                continue
            for where, targets, args in _cases(command):
                if command == "restart":
                    fed.hold_off_restarts()
                request = apb.CommandRequest(command=command, targets=targets, args_json=json.dumps(args), timeout=10)
                reply = stub.Execute(request, timeout=60)
                refused = not reply.ok and SERVER_POLICY in reply.error
                expected = allowed(scopes, rights[command], role, where)
                checked += 1
                case = f"{role} {command} {' '.join(targets)} {json.dumps(args)} ({where})"
                if refused == expected:
                    wrong.append(
                        f"{case}: docs say {'allowed' if expected else 'refused'}; server: "
                        f"{reply.error or [(r.target, r.ok, r.error) for r in reply.replies]}"
                    )
                elif refused and f"rule {role}." not in reply.error:
                    wrong.append(f"{case}: the refusal does not name the rule: {reply.error}")
                elif not refused:
                    lost = [
                        r.error for r in reply.replies if "is not connected" in r.error or "no reply within" in r.error
                    ]
                    assert not lost, f"{case}: the federation was disturbed: {lost}"
    assert checked >= 4 * 30, checked
    assert not wrong, f"{len(wrong)} of {checked} cases differ from {DOC.name}:\n" + "\n".join(wrong)


def test_deploying_code_needs_train_and_code_on_every_target_as_the_docs_role_table_says(fed):
    """Issue 18 item 1: a deploy whose archive brings code (a file under custom/) is allowed only where the docs'
    table gives the role both train and code: a lead to its own org's sites, never to the server."""
    scopes = doc_scopes(DOC.read_text())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("mmar/config/config_fed_server.json", "{}")
        zf.writestr("mmar/custom/model.py", "import os\n")
    blob = fed.upload("project_admin@org-a", buf.getvalue())
    wrong = []
    for role in ROLES:
        stub = fed.stub(f"{role}@org-a")
        for where, targets in (("own", [OWN]), ("other", [OTHER]), ("server", ["server"])):
            request = apb.CommandRequest(
                command="deploy", targets=targets, timeout=10, args_json=json.dumps({"blob_id": blob})
            )
            reply = stub.Execute(request, timeout=60)
            refused = not reply.ok and SERVER_POLICY in reply.error
            expected = allowed(scopes, {"train"}, role, where) and allowed(scopes, {"code"}, role, where)
            if refused == expected:
                wrong.append(
                    f"{role} deploy code to {where}: docs say {'allowed' if expected else 'refused'}; "
                    f"server: {reply.error or [(r.target, r.ok, r.error) for r in reply.replies]}"
                )
            elif refused and f"rule {role}." not in reply.error:
                wrong.append(f"{role} deploy code to {where}: the refusal does not name the rule: {reply.error}")
    assert not wrong, "\n".join(wrong)

"""Deployed code (issue 18 item 1, "a lead runs code on the server"): who may deploy it, where it runs, as whom.

A provisioned federation of real processes over mutual TLS checks the code right and a site's refusal; an
in-process server (its init-model child a real process) shows that the MMAR's custom/model.py runs as nobody,
with a scrubbed environment, unable to read the server's key or append to its audit log.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
from conftest import DIGITS, copy_mmar, prepare_workspace
from provisioned import ProvisionedFederation, running

from fedcommon.admin_defs import AdminIdentity
from fedcommon.deployed_code import archive_code, custom_code
from fedcommon.kit import load_kit
from fedcommon.safe_zip import extract_zip_safely
from fedserver import untrusted_code
from fedserver.authorization import DEFAULT_POLICY, Need, Policy, Refused
from fedserver.errors import ServerError
from fedserver.server import FederationServer

OWN, OTHER = "hospital-a", "hospital-b"
SITES = {OWN: "org-a", OTHER: "org-b"}
ADMINS = {"root@consortium": ("consortium", "project_admin"), "lea@org-a": ("org-a", "lead")}
CODE = "the archive brings code (custom/model.py)"


def _zip(entries: dict[str, bytes | None]) -> bytes:
    """A zip of these entries (None: a folder entry)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def _mmar_zip(folder: Path, top: str = "") -> bytes:
    return _zip(
        {
            f"{top}{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        }
    )


# ---- what counts as code -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries",
    [
        {"config/a.json": b"{}", "custom/model.py": b"x = 1"},
        {"top/config/a.json": b"{}", "top/custom/pkg/__init__.py": b"", "top/custom/": None},
        {"top/": None, "top/custom/__pycache__/__init__.py": b"", "__MACOSX/top/custom/._x.py": b""},
        {"config/a.json": b"{}", "docs/custom/readme.txt": b"not code: not the MMAR's custom/"},
        {"a/custom/x.py": b"", "b/config/a.json": b"{}"},
        {"custom": b"a file named custom", "config/a.json": b"{}"},
    ],
)
def test_the_server_tells_code_in_an_archive_exactly_as_extraction_places_it(tmp_path, entries):
    """Issue 18 item 1: the server's listing of an upload's custom/ files matches what every participant installs,
    so no layout (a top folder, folder entries, __pycache__, __MACOSX) lets code pass as code-free."""
    archive = tmp_path / "mmar.zip"
    archive.write_bytes(_zip(entries))
    placed = extract_zip_safely(archive, tmp_path / "out")
    assert archive_code(archive) == custom_code(placed)


def test_the_code_right_is_needed_besides_train_and_a_lead_has_it_on_its_own_orgs_sites_only():
    """Issue 18 item 1: deploying code needs `code` besides `train`; by default a lead may deploy code to its own
    org's sites but never to the server or another org's, and the refusal names the rule and the files."""
    policy, lead = Policy(DEFAULT_POLICY), AdminIdentity("lea@org-a", "lead", "org-a")
    need = [Need("code", CODE)]
    policy.check(lead, "deploy", ["server", OTHER], SITES)  # no code: train is enough
    policy.check(lead, "deploy", [OWN], SITES, need)
    policy.check(AdminIdentity("root@consortium", "project_admin", "consortium"), "deploy", ["server"], SITES, need)
    with pytest.raises(Refused) as e:
        policy.check(lead, "deploy", ["server"], SITES, need)
    assert str(e.value) == (
        "refused by the server's default policy: lead 'lea@org-a' may not deploy code to the "
        "server (rule lead.code = own_org allows only sites of org 'org-a'): " + CODE
    )
    with pytest.raises(Refused, match=r"to hospital-b \(org org-b\) \(rule lead\.code = own_org"):
        policy.check(lead, "deploy", [OWN, OTHER], SITES, need)
    org_admin = Policy({**DEFAULT_POLICY, "org_admin": {**DEFAULT_POLICY["org_admin"], "train": "any"}})
    with pytest.raises(Refused, match=r"may not deploy code \(rule org_admin\.code = none\)"):
        org_admin.check(AdminIdentity("oz@org-a", "org_admin", "org-a"), "deploy", [OWN], SITES, need)


# ---- a provisioned federation: the code right and a site's refusal ----------------------------------


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> ProvisionedFederation:
    with running(
        tmp_path_factory.mktemp("code"), "code", SITES, ADMINS, "root@consortium", {OTHER: {"custom_code": False}}
    ) as out:
        fed = ProvisionedFederation(out)
        assert fed.execute("root@consortium", "set-run", ["server"], {"run_number": 1}).ok
        yield fed


@pytest.mark.e2e
def test_a_lead_may_not_deploy_code_to_the_server_nor_another_orgs_site_but_may_to_its_own(fed):
    """Issue 18 item 1: deploying an MMAR whose custom/ holds code is the code right: a lead's deploy of it to the
    server or to another org's site is refused by the server (naming the rule and the file); to its own org's
    site it goes through, and so does the project admin's to the server."""
    blob = fed.upload("root@consortium", _mmar_zip(DIGITS, top="digits/"))
    for targets in (["server"], [OTHER], [OWN, "server"]):
        reply = fed.execute("lea@org-a", "deploy", targets, {"blob_id": blob})
        assert not reply.ok and not reply.replies, reply
        assert "refused by the server's default policy: lead 'lea@org-a' may not deploy code to" in reply.error
        assert "rule lead.code = own_org" in reply.error and "custom/model.py" in reply.error
    own = fed.execute("lea@org-a", "deploy", [OWN], {"blob_id": blob})
    assert own.ok, own
    # A blob is deleted once every target of its deploy took it: the next deploy uploads again, as the console does.
    again = fed.upload("root@consortium", _mmar_zip(DIGITS, top="digits/"))
    server = fed.execute("root@consortium", "deploy", ["server"], {"blob_id": again})
    assert server.ok, server
    audit = [json.loads(line) for line in (fed.out / "server" / "audit.log").read_text().splitlines()]
    refused = [e for e in audit if e.get("admin") == "lea@org-a" and e.get("command") == "deploy" and e["ok"] is False]
    assert len(refused) == 3 and all("rule lead.code" in e["error"] for e in refused)


@pytest.mark.e2e
def test_a_site_whose_local_policy_refuses_custom_code_refuses_it_from_anyone_and_audits_it(fed):
    """Issue 18 item 1: a site's local/authorization.json "custom_code": false refuses an MMAR that brings code,
    even from a project admin, naming the file and the key; the site audits the refusal and installs nothing."""
    blob = fed.upload("root@consortium", _mmar_zip(DIGITS))
    reply = fed.execute("root@consortium", "deploy", [OTHER], {"blob_id": blob})
    assert not reply.ok
    (site,) = reply.replies
    assert not site.ok and "custom_code" in site.error and "custom/model.py" in site.error, site
    assert not (fed.out / OTHER / "run_1" / "mmar").exists()
    audit = [json.loads(line) for line in (fed.out / OTHER / "audit.log").read_text().splitlines()]
    assert any(e["command"] == "deploy" and e["ok"] is False and "custom_code" in e.get("error", "") for e in audit)


@pytest.mark.e2e
def test_code_deployed_before_a_site_refused_custom_code_is_not_started_there(fed):
    """Issue 18 item 1: a site that turns "custom_code" off refuses custom code entirely: a run it had already
    installed does not start, and the refusal names the key and the files."""
    blob = fed.upload("root@consortium", _mmar_zip(DIGITS))
    assert fed.execute("root@consortium", "deploy", [OWN], {"blob_id": blob}).ok
    local = fed.out / OWN / "local" / "authorization.json"
    local.parent.mkdir(exist_ok=True)
    local.write_text(json.dumps({"custom_code": False}))
    try:
        reply = fed.execute("root@consortium", "start", [OWN], {})
        (site,) = reply.replies
        assert not site.ok and "start refused" in site.error and "custom_code" in site.error, site
        assert "custom/model.py" in site.error
    finally:
        local.unlink()
        fed.execute("root@consortium", "abort", [OWN], {})


# ---- the server: custom code runs as nobody, or not at all ----------------------------------------

SPY = """
import json, os
import torch
from torch import nn

REPORT = {"euid": os.geteuid(), "egid": os.getegid(), "groups": os.getgroups(), "cwd": os.getcwd(),
          "env": sorted(os.environ)}
for name, path, mode in (("key", KEY, "rb"), ("audit", AUDIT, "ab")):
    try:
        with open(path, mode) as f:
            f.write(b'{"forged": true}\\n') if "a" in mode else f.read()
        REPORT[name] = "done"
    except OSError as e:
        REPORT[name] = type(e).__name__
with open(os.path.join(DROP, "report.json"), "w") as f:
    json.dump(REPORT, f)


class SpyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2, 2)
"""


def _spy_mmar(dst: Path, server_ws: Path, drop: Path) -> Path:
    mmar = copy_mmar(dst, server={"initial_model": {"path": "spy.SpyNet", "args": {}}})
    constants = (
        f"KEY = {str(server_ws / 'startup' / 'key.pem')!r}\nAUDIT = {str(server_ws / 'audit.log')!r}\n"
        f"DROP = {str(drop)!r}\n"
    )
    (mmar / "custom" / "spy.py").write_text(constants + SPY)
    return mmar


@pytest.fixture
def drop_box() -> Path:
    """A folder anyone may write to (outside pytest's private tmp), where the spy leaves its report."""
    box = Path(tempfile.mkdtemp(prefix="fedlearn-spy-"))
    box.chmod(0o1777)
    yield box
    shutil.rmtree(box, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a server running as root can give its user up")
def test_server_side_custom_code_runs_as_nobody_with_a_scrubbed_env_and_cannot_read_the_key_or_forge_audit(
    tmp_path, drop_box, monkeypatch
):
    """Issue 18 item 1: when a server running as root builds a run's initial model, the MMAR's custom code runs in
    a child that has become nobody, with none of the server's environment and its cwd outside the workspace: it
    cannot read server/startup/key.pem nor append to server/audit.log, and the run still starts."""
    monkeypatch.setenv("FEDLEARN_TEST_SECRET", "server-only")
    ws = prepare_workspace(tmp_path / "ws", clients=2) / "server"
    server = FederationServer(ws, load_kit(ws), fl_port=0, admin_port=0)
    (ws / "audit.log").write_text("")
    before = (ws / "audit.log").read_bytes()
    server.set_run_number(1)
    server.deploy(_spy_mmar(tmp_path / "mmar", ws, drop_box), 1)
    server.start_training(1)
    report = json.loads((drop_box / "report.json").read_text())
    nobody = pwd.getpwnam("nobody")
    assert (report["euid"], report["egid"], report["groups"]) == (nobody.pw_uid, nobody.pw_gid, [])
    assert report["key"] == "PermissionError" and report["audit"] == "PermissionError", report
    assert (ws / "audit.log").read_bytes() == before
    assert "FEDLEARN_TEST_SECRET" not in report["env"]
    assert not Path(report["cwd"]).is_relative_to(ws.parent), report["cwd"]
    assert server.training_run() is not None and server.training_run().run_number == 1
    server.abort_training()


def test_a_server_that_cannot_change_user_refuses_custom_code_unless_its_local_config_allows_it(tmp_path, monkeypatch):
    """Issue 18 item 1: a server that cannot drop privileges (not root) refuses to build a run's initial model from
    the MMAR's custom code, saying what to do, unless local/custom_code.json says allow_as_server_user."""
    ws = prepare_workspace(tmp_path / "ws", clients=2) / "server"
    (ws / "local" / "custom_code.json").unlink()  # a real federation's server, not a POC's
    monkeypatch.setattr(untrusted_code.os, "geteuid", lambda: 4242)
    server = FederationServer(ws, load_kit(ws), fl_port=0, admin_port=0)
    server.set_run_number(1)
    server.deploy(copy_mmar(tmp_path / "mmar"), 1)
    with pytest.raises(ServerError) as e:
        server.start_training(1)
    assert "start refused: run 1 brings code (custom/model.py, custom/trainer.py)" in str(e.value)
    assert '"allow_as_server_user": true' in str(e.value) and "local/custom_code.json" in str(e.value)
    assert server.training_run() is None
    (ws / "local" / "custom_code.json").write_text(json.dumps({"allow_as_server_user": True}))
    allowed = FederationServer(ws, load_kit(ws), fl_port=0, admin_port=0)
    allowed.start_training(1)
    allowed.abort_training()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"run_as": "no-such-user-here"}', "run_as: no user 'no-such-user-here'"),
        ('{"run_as": "root"}', "run_as: 'root' is root (uid 0)"),
        ('{"allow_as_server_user": "yes"}', "allow_as_server_user: must be true or false"),
        ('{"runas": "nobody"}', "runas: unknown key"),
        ("[", "cannot be read as JSON"),
    ],
)
def test_a_bad_custom_code_json_stops_the_server_from_starting_naming_the_key(tmp_path, content, says):
    """Issue 18 item 1: the server's local/custom_code.json is read at start; a bad one stops the server, naming
    the file and the key, rather than running deployed code under rules its owner did not mean."""
    if "run_as" in says and os.geteuid() != 0:
        pytest.skip("run_as names a user only a server running as root becomes")
    ws = prepare_workspace(tmp_path / "ws", clients=1) / "server"
    (ws / "local" / "custom_code.json").write_text(content)
    with pytest.raises(ServerError) as e:
        FederationServer(ws, load_kit(ws), fl_port=0, admin_port=0)
    assert "custom_code.json" in str(e.value) and says in str(e.value), str(e.value)


def test_a_sites_custom_code_key_refuses_code_naming_the_key_and_is_re_read_when_it_changes(tmp_path):
    """Issue 18 item 1: a site's local/authorization.json may say "custom_code": false (alone or beside its rules);
    then every MMAR that brings code is refused, naming the key and the files; a bad value refuses everything."""
    from fedclient.local_policy import LocalPolicy

    (tmp_path / "local").mkdir()
    path = tmp_path / "local" / "authorization.json"
    policy = LocalPolicy(tmp_path)
    assert policy.code_refusal(["custom/model.py"]) is None
    path.write_text(json.dumps({"custom_code": False}))
    refusal = policy.code_refusal(["custom/a.py", "custom/b.py", "custom/c.py", "custom/d.py"])
    assert refusal == (
        'refused by local/authorization.json "custom_code": false: this site runs no deployed code, '
        "and the MMAR brings custom/a.py, custom/b.py, custom/c.py and 1 more"
    )
    assert policy.code_refusal([]) is None
    assert policy.refusal(AdminIdentity("a", "lead", "org-a"), "deploy") is None
    path.write_text(json.dumps({"rules": [], "custom_code": "no"}))
    os.utime(path, ns=(1, 1))
    assert "custom_code: must be true or false" in policy.code_refusal([])
    assert "custom_code: must be true or false" in policy.refusal(AdminIdentity("a", "lead", "org-a"), "status")
    path.write_text(json.dumps({"rules": [{"name": "n", "deny": ["shell"]}], "custom_code": True}))
    assert policy.code_refusal(["custom/model.py"]) is None


def test_the_readme_says_what_deploying_code_means_and_how_to_restrict_it():
    """Issue 18 item 1: the README's security section says that deploying to a participant runs code there, and
    names each way to restrict it: the server's code right, a site's custom_code key, the server's run_as."""
    from conftest import ROOT

    text = " ".join((ROOT / "README.md").read_text().split())
    assert "Deploying an MMAR to a participant means running its code there." in text
    for knob in (
        "`code`",
        '{"custom_code": false}',
        "`run_as`",
        "local/custom_code.json",
        '{"allow_as_server_user": true}',
    ):
        assert knob in text, knob


def test_the_server_hands_no_link_of_a_deployed_mmar_to_the_code_it_runs(tmp_path):
    """Issue 18 item 1: the copy the server's code child works on holds the MMAR's own files only: a symbolic link
    (to the server's key, say) is refused, never read with the server's rights nor handed to the child's user."""
    mmar = copy_mmar(tmp_path / "mmar")
    (mmar / "resources").mkdir(exist_ok=True)
    (tmp_path / "server-key.pem").write_text("secret")
    (mmar / "resources" / "key.pem").symlink_to(tmp_path / "server-key.pem")
    policy = untrusted_code.CodePolicy(allow_as_server_user=True)
    with pytest.raises(untrusted_code.CodeRefused, match=r"run 1: resources/key\.pem is a symbolic link"):
        with untrusted_code.code_sandbox(mmar, policy, "run 1"):
            pass


def test_the_installed_packages_an_archives_code_imports_are_named_from_its_source_never_its_own(tmp_path):
    """Issue 18 item 1: the server's code child imports, before it changes user, the installed packages the
    archive's code imports (a Python under a private home folder stays usable), never a module of the archive."""
    from fedserver.untrusted_code import installed_imports

    custom = tmp_path / "custom"
    (custom / "helpers").mkdir(parents=True)
    (custom / "net.py").write_text(
        "import json\nimport numpy as np\nfrom helpers import x\nimport net2\n"
        "from . import sibling\nfrom email.mime import text\nimport no_such_pkg_xyz\n"
    )
    (custom / "net2.py").write_text("import collections.abc\n")
    (custom / "json.py").write_text("")  # the archive's own json shadows nothing: it is never imported early
    assert installed_imports(custom) == ["numpy", "email.mime", "collections.abc"]


def test_a_child_that_imports_one_module_imports_ahead_only_what_that_module_and_its_own_imports_name(tmp_path):
    """Issue 25: the initial-model child imports ahead what the model's module needs, not what the trainer beside it
    imports (the digits trainer's fallback to scikit-learn's loader cost that child a second of CPU)."""
    from fedserver.untrusted_code import installed_imports

    custom = tmp_path / "custom"
    (custom / "layers").mkdir(parents=True)
    (custom / "model.py").write_text("import json\nfrom layers import blocks\nimport torch_free_helper\n")
    (custom / "torch_free_helper.py").write_text("import email.mime\n")
    (custom / "layers" / "__init__.py").write_text("import numbers\n")
    (custom / "layers" / "blocks.py").write_text("from . import norms\n")
    (custom / "layers" / "norms.py").write_text("def f():\n    import decimal\n")
    (custom / "trainer.py").write_text("import numpy\n\ndef load():\n    from sklearn.datasets import load_digits\n")
    assert sorted(installed_imports(custom, ["model"])) == ["decimal", "email.mime", "json", "numbers"]
    assert installed_imports(custom, ["fedcommon.model_file"]) == ["fedcommon.model_file"]
    assert installed_imports(custom, []) == []
    everything = installed_imports(custom)
    assert "numpy" in everything and "json" in everything and "decimal" in everything

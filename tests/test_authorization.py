"""The server's role policy: defaults per role, org scoping, overrides from local/authorization.json."""

from __future__ import annotations

import json

import pytest

from fedcommon.admin_defs import AdminIdentity
from fedserver.authorization import COMMAND_RIGHTS, DEFAULT_POLICY, Policy, PolicyError, Refused, load_policy

ORGS = {"hospital-a": "org-a", "hospital-b": "org-b"}
POLICY = Policy(DEFAULT_POLICY)


def caller(role: str, org: str = "org-a") -> AdminIdentity:
    return AdminIdentity(f"{role}@{org}", role, org)


@pytest.mark.parametrize("command", ["status", "sysinfo", "validate"])
@pytest.mark.parametrize("role", ["member", "lead", "org_admin", "project_admin"])
def test_every_role_may_view_everything(role, command):
    POLICY.check(caller(role), command, ["server", "hospital-a", "hospital-b"], ORGS)


@pytest.mark.parametrize(
    "command",
    [
        "start",
        "deploy",
        "set-run",
        "abort",
        "shell",
        "restart",
        "shutdown",
        "delete-run",
        "remove-client",
        "set-timeout",
        "upload",
    ],
)
def test_a_member_may_not_act_and_the_refusal_names_the_rule(command):
    with pytest.raises(Refused) as e:
        POLICY.check(caller("member"), command, ["hospital-a"], ORGS)
    assert "member 'member@org-a'" in str(e.value)
    assert f"may not run {command!r}" in str(e.value)
    assert "rule member." in str(e.value) and "= none" in str(e.value)


def test_a_lead_runs_training_everywhere_but_may_not_operate():
    for command in ("set-run", "deploy", "start", "abort", "upload"):
        POLICY.check(caller("lead"), command, ["server", "hospital-a", "hospital-b"], ORGS)
    with pytest.raises(Refused, match=r"rule lead\.operate = none"):
        POLICY.check(caller("lead"), "shutdown", ["hospital-a"], ORGS)


def test_an_org_admin_operates_and_uses_shell_on_its_own_orgs_sites_only():
    POLICY.check(caller("org_admin"), "shell", ["hospital-a"], ORGS)
    POLICY.check(caller("org_admin"), "restart", ["hospital-a"], ORGS)
    POLICY.check(caller("org_admin"), "abort", ["hospital-a"], ORGS)
    with pytest.raises(Refused) as e:
        POLICY.check(caller("org_admin"), "shell", ["hospital-b"], ORGS)
    assert "rule org_admin.shell = own_org" in str(e.value)
    assert "hospital-b (org org-b)" in str(e.value)
    with pytest.raises(Refused, match="the server"):
        POLICY.check(caller("org_admin"), "shutdown", ["server"], ORGS)
    with pytest.raises(Refused, match=r"rule org_admin\.train = none"):
        POLICY.check(caller("org_admin"), "start", ["hospital-a"], ORGS)


def test_one_target_outside_the_org_refuses_the_whole_command():
    with pytest.raises(Refused, match="hospital-b"):
        POLICY.check(caller("org_admin"), "restart", ["hospital-a", "hospital-b"], ORGS)


def test_a_site_whose_org_is_unknown_is_not_the_callers_org():
    with pytest.raises(Refused, match="org unknown"):
        POLICY.check(caller("org_admin"), "restart", ["hospital-x"], ORGS)


def test_a_project_admin_may_do_everything():
    for command in COMMAND_RIGHTS:
        POLICY.check(caller("project_admin", "consortium"), command, ["server", "hospital-a", "hospital-b"], ORGS)


def test_an_unknown_role_may_do_nothing():
    with pytest.raises(Refused):
        POLICY.check(AdminIdentity("x", "superuser", "org-a"), "status", ["server"], ORGS)


def test_the_policy_file_overrides_only_what_it_names(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "authorization.json").write_text(json.dumps({"roles": {"lead": {"shell": "none"}}}))
    policy = load_policy(tmp_path)
    with pytest.raises(Refused, match=r"server policy .*authorization\.json.*rule lead\.shell = none"):
        policy.check(caller("lead"), "shell", ["hospital-a"], ORGS)
    policy.check(caller("lead"), "start", ["hospital-a"], ORGS)
    assert load_policy(tmp_path / "none").rules == DEFAULT_POLICY


@pytest.mark.parametrize(
    "content, says",
    [
        ("{", "cannot be read as JSON"),
        ('{"role": {}}', "expected"),
        ('{"roles": {"boss": {}}}', "roles.boss: unknown role"),
        ('{"roles": {"lead": {"fly": "any"}}}', "roles.lead.fly: unknown right"),
        ('{"roles": {"lead": {"shell": "some"}}}', "roles.lead.shell: scope must be one of"),
    ],
)
def test_a_bad_policy_file_is_refused_naming_file_and_key(tmp_path, content, says):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "authorization.json").write_text(content)
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path)
    assert "authorization.json" in str(e.value) and says in str(e.value)

"""A site's local/authorization.json: deny rules by command and admin, re-read on change, closed when broken."""

from __future__ import annotations

import json
import os

import pytest

from fedclient.local_policy import LocalPolicy
from fedcommon.admin_defs import AdminIdentity

ALICE = AdminIdentity("alice", "org_admin", "hospital-a")
BOB = AdminIdentity("bob", "lead", "hospital-b")


def write(ws, rules) -> None:
    path = ws / "local" / "authorization.json"
    path.parent.mkdir(exist_ok=True)
    text = rules if isinstance(rules, str) else json.dumps({"rules": rules})
    path.write_text(text)
    # A new mtime even within the file system's timestamp granularity.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_without_a_file_nothing_is_refused(tmp_path):
    assert LocalPolicy(tmp_path).refusal(BOB, "shell") is None


def test_a_rule_refuses_its_commands_for_the_admins_it_names_and_says_which_rule(tmp_path):
    write(tmp_path, [{"name": "no-shell-from-outside", "deny": ["shell"], "except_orgs": ["hospital-a"]}])
    policy = LocalPolicy(tmp_path)
    assert policy.refusal(BOB, "shell") == "refused by local/authorization.json rule 'no-shell-from-outside'"
    assert policy.refusal(ALICE, "shell") is None
    assert policy.refusal(BOB, "status") is None


def test_a_rule_naming_validate_still_refuses_validation_run_on_demand(tmp_path):
    write(tmp_path, [{"name": "no-validation", "deny": ["validate"]}])
    assert LocalPolicy(tmp_path).refusal(BOB, "run-validation") == (
        "refused by local/authorization.json rule 'no-validation'"
    )


def test_all_conditions_of_a_rule_must_hold(tmp_path):
    write(tmp_path, [{"name": "leads-of-b", "deny": ["*"], "roles": ["lead"], "orgs": ["hospital-b"]}])
    policy = LocalPolicy(tmp_path)
    assert policy.refusal(BOB, "start")
    assert policy.refusal(AdminIdentity("carol", "lead", "hospital-a"), "start") is None
    assert policy.refusal(AdminIdentity("dan", "member", "hospital-b"), "start") is None


def test_the_first_rule_that_applies_is_named(tmp_path):
    write(
        tmp_path,
        [{"name": "only-alice", "deny": ["deploy"], "except_admins": ["alice"]}, {"name": "never", "deny": ["deploy"]}],
    )
    policy = LocalPolicy(tmp_path)
    assert "'only-alice'" in policy.refusal(BOB, "deploy")
    assert "'never'" in policy.refusal(ALICE, "deploy")


def test_a_local_path_that_cannot_be_read_refuses_every_command(tmp_path):
    (tmp_path / "local").write_text("a file where a folder should be")
    policy = LocalPolicy(tmp_path)
    assert "cannot be read" in policy.refusal(ALICE, "status")


def test_a_changed_file_takes_effect_without_a_restart(tmp_path):
    policy = LocalPolicy(tmp_path)
    assert policy.refusal(BOB, "start") is None
    write(tmp_path, [{"name": "closed", "deny": ["start"]}])
    assert "'closed'" in policy.refusal(BOB, "start")
    (tmp_path / "local" / "authorization.json").unlink()
    assert policy.refusal(BOB, "start") is None


@pytest.mark.parametrize(
    "content, says",
    [
        ("{not json", "cannot be read as JSON"),
        ('{"rule": []}', 'expected {"rules": [...]}'),
        ('{"rules": [{"deny": ["shell"]}]}', "rules[0].name: required"),
        ('{"rules": [{"name": "x"}]}', "rules[0].deny: required"),
        ('{"rules": [{"name": "x", "deny": "shell"}]}', "rules[0].deny: must be a non-empty list"),
        ('{"rules": [{"name": "x", "deny": ["shell"], "org": ["a"]}]}', "rules[0].org: unknown key"),
        ('{"rules": [{"name": "x", "deny": ["shel"]}]}', "rules[0].deny[0]: unknown command 'shel'"),
        ('{"rules": [{"name": "x", "deny": ["delete_run_number"]}]}', "rules[0].deny[0]: unknown command"),
        ('{"rules": [{"name": "x", "deny": ["*"], "roles": ["Lead"]}]}', "rules[0].roles[0]: unknown role 'Lead'"),
    ],
)
def test_a_broken_file_refuses_every_command_naming_the_fault(tmp_path, content, says):
    write(tmp_path, content)
    policy = LocalPolicy(tmp_path)
    assert says in policy.error
    refusal = policy.refusal(ALICE, "status")
    assert refusal is not None and says in refusal and "authorization.json" in refusal


def test_a_rule_denying_shell_denies_logs_and_logs_may_be_denied_alone(tmp_path):
    """Hardening issue 18 item 4: a site's veto of shell did not cover logs, and naming logs made the file invalid."""
    write(tmp_path, [{"name": "no-shell-from-outside", "deny": ["shell"], "except_orgs": ["hospital-a"]}])
    policy = LocalPolicy(tmp_path)
    assert policy.refusal(BOB, "logs") == "refused by local/authorization.json rule 'no-shell-from-outside'"
    assert policy.refusal(ALICE, "logs") is None
    write(tmp_path, [{"name": "no-logs", "deny": ["logs"]}])
    assert policy.refusal(BOB, "logs") == "refused by local/authorization.json rule 'no-logs'"
    assert policy.error is None and policy.refusal(BOB, "shell") is None

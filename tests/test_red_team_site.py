"""The outside red team's attacks on a site and on the operator's terminal (hardening issue 18), against real processes.

Every test names the item of the issue it proves fixed; the federation is test_hostile's (its own instance).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import test_hostile
from conftest import run_fedadmin
from test_hostile import Federation

pytestmark = pytest.mark.e2e

fed = test_hostile.fed  # the module fixture: a federation of this module's own
# What a hostile site's files carry: set the terminal's title, write its clipboard, clear the screen, Rich markup.
PAYLOAD = "\x1b]0;owned\x07\x1b]52;c;cm0gLXJmIH4K\x07\x1b[2J[bold red]alarm[/bold red]"
SEQUENCES = ("\x1b]0;", "\x1b]52;", "\x1b[2J")


def _policy(fed: Federation, site: str, rules: list[dict]) -> None:
    path = fed.out / site / "local" / "authorization.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"rules": rules}))


def _refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    out = json.loads(done.stdout)
    return " ".join([out.get("error") or "", *(r.get("error", "") for r in out.get("replies", []))])


def test_a_site_rule_that_denies_shell_to_outsiders_denies_them_its_logs(fed):
    """Hardening issue 18 item 4: a site's policy denying `shell` to outsiders still let them read its logs with
    `fedadmin logs`; a rule naming `logs` is valid and refuses logs alone."""
    policy = fed.out / "hospital-b" / "local" / "authorization.json"
    try:
        _policy(fed, "hospital-b", [{"name": "no-shell-for-outsiders", "deny": ["shell"], "except_orgs": ["org-b"]}])
        error = _refused(fed.run("root@consortium", "logs", "hospital-b"))
        assert "hospital-b: refused by local/authorization.json rule 'no-shell-for-outsiders'" in error
        done = fed.run("bob@org-b", "logs", "hospital-b")
        assert done.returncode == 0 and json.loads(done.stdout)["lines"], done.stdout + done.stderr

        _policy(fed, "hospital-b", [{"name": "no-logs", "deny": ["logs"]}])
        error = _refused(fed.run("bob@org-b", "logs", "hospital-b"))
        assert "rule 'no-logs'" in error and "every command is refused" not in error
        assert fed.run("bob@org-b", "shell", "hospital-b", "pwd").returncode == 0, "a valid file: shell is allowed"
    finally:
        policy.unlink(missing_ok=True)
    refused = [e for e in fed.audit("hospital-b") if e["command"] == "logs" and not e["ok"]]
    assert [e["admin"] for e in refused[-2:]] == ["root@consortium", "bob@org-b"]
    fed.assert_alive()


def _on_a_terminal(fed: Federation, *args: str) -> subprocess.CompletedProcess[str]:
    """fedadmin's human output with Rich forced to a colour terminal, as an operator's xterm would get it."""
    terminal = {"TERM": "xterm-256color", "FORCE_COLOR": "1", "COLUMNS": "200", "NO_COLOR": None}
    return run_fedadmin(*args, kit=fed.kit("root@consortium"), env=terminal)


def test_a_sites_files_and_their_names_cannot_drive_the_operators_terminal(fed):
    """Hardening issue 18 item 5: shell output from a site carried OSC 0 (title), OSC 52 (clipboard write) and
    CSI 2J into `fedadmin shell cat` on a real terminal; a file's name did the same through `shell ls`."""
    site = fed.out / "hospital-a"
    notes = site / "notes.txt"
    named = site / f"x{PAYLOAD.replace('/', '|')}.txt"
    notes.write_text(f"line one\n{PAYLOAD}\n")
    named.write_text("")
    try:
        for argv in (("shell", "hospital-a", "cat", "notes.txt"), ("shell", "hospital-a", "ls")):
            done = _on_a_terminal(fed, *argv)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "\x1b[" in done.stdout, "Rich styles its output on this terminal"
            assert not [s for s in SEQUENCES if s in done.stdout + done.stderr], repr(done.stdout)
            assert "\\x1b]52;c;cm0gLXJmIH4K\\x07" in done.stdout and "[bold red]alarm[" in done.stdout
        exact = fed.run("root@consortium", "shell", "hospital-a", "cat", "notes.txt")
        assert json.loads(exact.stdout)["replies"][0]["stdout"] == f"line one\n{PAYLOAD}\n", "--json stays exact"
    finally:
        notes.unlink()
        named.unlink()
    fed.assert_alive()

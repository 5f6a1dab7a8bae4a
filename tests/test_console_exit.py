"""`fedadmin` leaves without tearing the interpreter down: its output and exit status stay what they were."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, python_env, run_fedadmin

from fedadmin.cli import _exit_status


def test_console_output_reaches_a_pipe_whole_with_its_exit_status():
    version = run_fedadmin("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("fedadmin ")

    no_kit = run_fedadmin("--json", "status")
    assert no_kit.returncode == 2
    reply = json.loads(no_kit.stdout)
    assert (reply["command"], reply["ok"], reply["replies"]) == ("status", False, [])
    assert "no admin kit" in reply["error"]

    help_text = run_fedadmin("--help")
    assert help_text.returncode == 0
    assert "status" in help_text.stdout and help_text.stdout.endswith("\n")


def test_console_output_reaches_a_file_whole(tmp_path):
    """A file is block-buffered: what the command printed is flushed before the process leaves."""
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        code = subprocess.call(
            [sys.executable, "-m", "fedadmin.cli", "--json", "--kit", str(tmp_path / "missing"), "status"],
            cwd=ROOT,
            env=python_env(),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.DEVNULL,
        )
    assert code == 2
    reply = json.loads(out.read_text())
    assert reply["ok"] is False and "no such folder" in reply["error"]


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("went wrong", 1)])
def test_exit_status_is_what_sys_exit_gives(code, status, capsys):
    assert _exit_status(SystemExit(code)) == status
    assert capsys.readouterr().err == ("went wrong\n" if isinstance(code, str) else "")

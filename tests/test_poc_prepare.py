"""Tests for `fedadmin poc prepare` and the console's contract (exit codes, --json, light imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcommon.kit import load_kit

ROOT = Path(__file__).resolve().parent.parent
PARTICIPANTS = ["server", "site-1", "site-2", "admin"]


def fedadmin(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("FEDADMIN_KIT", None)
    return subprocess.run(
        [sys.executable, "-m", "fedadmin.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_poc_prepare_creates_loadable_kits_and_reports_them_as_json(tmp_path):
    ws = tmp_path / "ws"
    result = fedadmin("--json", "poc", "prepare", "--workspace", str(ws), "--clients", "2", "--project", "trial")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "poc prepare"
    assert report["ok"] is True
    assert report["workspace"] == str(ws.resolve())
    assert report["participants"] == PARTICIPANTS
    assert (ws / "ca" / "rootCA.key").is_file()
    server = report["server"]  # ports free when prepared (issue 19 item 1), the same in every kit
    for name in PARTICIPANTS:
        kit = load_kit(ws / name)
        assert (kit.name, kit.project, kit.fl_target, kit.admin_target) == (
            name,
            "trial",
            f"127.0.0.1:{server['fl_port']}",
            f"127.0.0.1:{server['admin_port']}",
        )
    assert load_kit(ws / "admin").admin_role == "project_admin"


def test_poc_prepare_prints_a_summary_of_the_kits(tmp_path):
    result = fedadmin("poc", "prepare", "-w", str(tmp_path / "ws"), "-n", "2", "--host", "localhost")
    assert result.returncode == 0, result.stderr
    for name in PARTICIPANTS:
        assert name in result.stdout
    assert "localhost" in result.stdout


def test_poc_prepare_refuses_to_overwrite_a_kit_without_force(tmp_path):
    ws = tmp_path / "ws"
    assert fedadmin("poc", "prepare", "-w", str(ws), "-n", "2").returncode == 0
    ca = (ws / "ca" / "rootCA.pem").read_bytes()
    site_key = (ws / "site-1" / "startup" / "key.pem").read_bytes()

    refused = fedadmin("poc", "prepare", "-w", str(ws), "-n", "2")
    assert refused.returncode == 1
    assert "already holds startup kits" in refused.stderr
    assert "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (ws / "ca" / "rootCA.pem").read_bytes() == ca
    assert (ws / "site-1" / "startup" / "key.pem").read_bytes() == site_key

    replaced = fedadmin("poc", "prepare", "-w", str(ws), "-n", "2", "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert (ws / "ca" / "rootCA.pem").read_bytes() != ca
    assert load_kit(ws / "site-1").ca_pem == (ws / "ca" / "rootCA.pem").read_bytes()


def test_poc_prepare_failure_under_json_is_one_json_object(tmp_path):
    ws = tmp_path / "ws"
    assert fedadmin("poc", "prepare", "-w", str(ws), "-n", "1").returncode == 0
    refused = fedadmin("--json", "poc", "prepare", "-w", str(ws), "-n", "1")
    assert refused.returncode == 1
    report = json.loads(refused.stdout)
    assert report["command"] == "poc prepare"
    assert report["ok"] is False
    assert "--force" in report["error"]


def test_debug_shows_the_traceback_of_a_failure(tmp_path):
    ws = tmp_path / "ws"
    assert fedadmin("poc", "prepare", "-w", str(ws), "-n", "1").returncode == 0
    refused = fedadmin("--debug", "poc", "prepare", "-w", str(ws), "-n", "1")
    assert refused.returncode == 1
    assert "Traceback" in refused.stderr
    assert "PkiError" in refused.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--clients", "0"],
        ["--clients", "two"],
        ["--clients", "1", "--fl-port", "0"],
        ["--clients", "1", "--admin-port", "65536"],
        ["--clients", "1", "--fl-port", "9000", "--admin-port", "9000"],
        ["--clients", "1", "--host", "http://fl.example.org"],
        ["--clients", "1", "--project", "my project"],
        [],
    ],
)
def test_poc_prepare_usage_errors_exit_2_and_write_nothing(tmp_path, args):
    ws = tmp_path / "ws"
    result = fedadmin("poc", "prepare", "--workspace", str(ws), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not ws.exists()


def test_importing_the_console_leaves_numpy_and_torch_unloaded():
    code = "import sys, fedadmin.cli; print([m for m in ('numpy', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_running_poc_prepare_leaves_numpy_and_torch_unloaded(tmp_path):
    args = ["--json", "poc", "prepare", "-w", str(tmp_path / "ws"), "-n", "1"]
    code = (
        "import sys\n"
        "from fedadmin.cli import main\n"
        f"main({args!r}, standalone_mode=False)\n"
        "print([m for m in ('numpy', 'torch') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"

"""What a new operator trips over at the console (issue 19 items 7 and 8): hints that work, names that agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, prepare_workspace, python_env, run_fedadmin


def fedadmin(*args: str, kit: Path | None = None) -> subprocess.CompletedProcess[str]:
    kit_args = ["--kit", str(kit)] if kit is not None else []
    return run_fedadmin(*kit_args, *args, env={"COLUMNS": "200"}, timeout=60)


def test_a_mistyped_command_gets_a_suggestion():
    """Item 7: mistyped commands got no suggestion (the lazy loader hid them from Click)."""
    done = fedadmin("stauts")
    assert done.returncode == 2 and "No such command 'stauts'. Did you mean status" in done.stderr
    done = fedadmin("poc", "strat")
    assert done.returncode == 2 and "Did you mean start" in done.stderr


def test_the_yes_hint_works_as_written_after_the_command(tmp_path):
    """Item 7: "pass --yes to proceed" led to `abort all --yes` → "No such option '--yes'"; global options are
    accepted after the command too."""
    refused = fedadmin("abort", "all", kit=tmp_path)
    assert refused.returncode == 2 and "pass --yes to proceed" in refused.stderr
    done = fedadmin("abort", "all", "--yes", kit=tmp_path)  # confirmed: it goes on to connect (the folder is no kit)
    assert done.returncode == 3 and "No such option" not in done.stderr, done.stderr
    late = fedadmin("status", "--json", kit=tmp_path)
    assert late.returncode == 3 and json.loads(late.stdout)["ok"] is False


def test_a_commands_own_option_and_a_shell_commands_flags_stay_where_they_are(tmp_path):
    from fedadmin.cli import main

    ctx = main.make_context("fedadmin", ["status"], resilient_parsing=True)
    moved = main._global_options_first(ctx, ["shell", "site-1", "grep", "--json", "x", "log.txt"])
    assert moved == ["shell", "site-1", "grep", "--json", "x", "log.txt"]
    moved = main._global_options_first(ctx, ["wait", "--timeout", "5", "--reply-timeout", "3", "--json"])
    assert moved == ["--reply-timeout", "3", "--json", "wait", "--timeout", "5"]


def test_a_missing_kit_is_a_usage_error_and_grpcs_own_lines_stay_off_stderr(tmp_path):
    """Item 7: a missing kit folder exited 3; gRPC's own handshake log lines reached the console's stderr."""
    from fedcommon.kit import load_kit
    from fedserver.server import FederationServer

    missing = fedadmin("status", kit=tmp_path / "nowhere")
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    ours = prepare_workspace(tmp_path / "ours", clients=1)
    other = prepare_workspace(tmp_path / "other", clients=1)  # another project's CA: the handshake fails
    admin_port = load_kit(ours / "admin").admin_port
    server = FederationServer(other / "server", load_kit(other / "server"), fl_port=0, admin_port=admin_port)
    server.start()
    try:
        done = fedadmin("status", kit=ours / "admin")
    finally:
        server.stop(0)
    assert done.returncode == 3 and "TLS handshake failed" in done.stderr
    assert [line for line in done.stderr.splitlines() if re.match(r"[IWEF]\d{4} ", line)] == [], done.stderr


def test_fedserver_on_a_sites_kit_says_it_is_a_site_kit(tmp_path):
    """Item 7: `fedserver start` on a site's kit blamed a missing CRL."""
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    done = subprocess.run(
        [sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(ws / "site-1")],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "holds the kit of site-1 (a site), not the server's" in done.stderr and "CRL" not in done.stderr


def test_one_spelling_for_a_run_and_distinct_names_for_the_two_timeouts():
    """Item 8: `--run N` in logs and metrics but `--run-number N` in validate (where --run was a flag); the global
    `--timeout` and `wait --timeout` meant different things."""
    for command in ("logs", "metrics", "validate"):
        assert re.search(r"--run\b.*INTEGER", fedadmin(command, "--help").stdout), command
    assert "--start" in fedadmin("validate", "--help").stdout
    top = fedadmin("--help").stdout
    assert "--reply-timeout" in top and not re.search(r"^\s+--timeout\b", top, re.M)
    assert re.search(r"--timeout\b", fedadmin("wait", "--help").stdout)


def test_deploy_checks_the_mmar_before_uploading_and_names_each_problem_once(tmp_path):
    """Item 7: `deploy` printed each problem once per target; it checks the MMAR locally first."""
    import zipfile

    from conftest import copy_mmar

    bad = copy_mmar(tmp_path / "bad", server={"num_rounds": -1, "min_num_clients": "two"})
    for mmar in (bad, _zipped(bad, tmp_path / "bad.zip", zipfile)):
        done = fedadmin("deploy", str(mmar), "server", "site-1", "site-2", kit=tmp_path)  # no kit: never connects
        assert done.returncode == 2, done.stderr
        assert "nothing was uploaded" in done.stderr
        assert done.stderr.count("num_rounds") == 1 and done.stderr.count("min_num_clients") == 1, done.stderr


def _zipped(folder: Path, archive: Path, zipfile) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in folder.rglob("*"):
            z.write(path, path.relative_to(folder))
    return archive


def test_validate_on_a_run_without_cross_site_validation_says_how_to_start_it():
    """Item 7: `validate` on a run without cross-site validation said the models "have not arrived yet"."""
    from rich.console import Console

    from fedadmin.commands.validate import ValidationResult
    from fedadmin.render import shown
    from fedcommon.outcome import CommandOutcome, TargetReply

    data = {
        "run_number": 1,
        "run_status": "completed",
        "owners": [],
        "validating_sites": ["site-1"],
        "results": {},
        "pending_owners": ["site-1", "server"],
        "enabled": False,
    }
    console = Console(width=200, record=True, color_system=None)
    console.print(shown(ValidationResult(CommandOutcome("validate", True, [TargetReply("server", True, data)]))))
    text = console.export_text()
    assert "cross-site validation was not turned on for run 1" in text and "fedadmin validate --start" in text
    assert "not arrived yet" not in text


def test_a_second_server_on_a_port_in_use_is_refused_naming_what_holds_it(tmp_path):
    """Item 1: two federations shared a port silently (gRPC's SO_REUSEPORT let both servers listen, and admin
    commands then hit either at random). A server refuses a port in use and names what holds it."""
    import pytest

    from fedcommon.kit import load_kit
    from fedserver.errors import ServerError
    from fedserver.server import FederationServer

    first_ws = prepare_workspace(tmp_path / "first", clients=1)
    second_ws = prepare_workspace(tmp_path / "second", clients=1)
    first = FederationServer(first_ws / "server", load_kit(first_ws / "server"), fl_port=0, admin_port=0)
    first.start()
    try:
        second = FederationServer(
            second_ws / "server", load_kit(second_ws / "server"), fl_port=0, admin_port=first.admin_port
        )
        with pytest.raises(ServerError) as e:
            second.start()
        second.stop(0)
    finally:
        first.stop(0)
    import os

    assert f"port {first.admin_port} is in use by pid {os.getpid()}" in str(e.value)


def test_poc_prepare_picks_free_ports_and_says_which(tmp_path):
    """Item 1: a second `poc prepare` on the default ports while the first ran reported "Every site is
    connected"; prepare now takes ports free at the time, different for each workspace, and says which."""
    ports = []
    for name in ("one", "two"):
        done = fedadmin("--json", "poc", "prepare", "--workspace", str(tmp_path / name), "--clients", "1")
        assert done.returncode == 0, done.stderr
        server = json.loads(done.stdout)["server"]
        ports += [server["fl_port"], server["admin_port"]]
    assert len(set(ports)) == 4 and 8002 not in ports
    shown = fedadmin("poc", "prepare", "--workspace", str(tmp_path / "three"), "--clients", "1")
    assert re.search(r"FL port \d+, admin port \d+", shown.stdout)

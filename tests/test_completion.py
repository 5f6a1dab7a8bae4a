"""Shell completion: TARGET completes to the keywords and the site names the last `status` saw with the kit, from
the console's state folder, without connecting; the shells' scripts come from Click."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.shell_completion import BashComplete
from click.testing import CliRunner
from conftest import ROOT, python_env

from fedadmin import completion
from fedadmin.cli import main
from fedcommon.outcome import CommandOutcome, TargetReply


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv(completion.STATE_ENV, str(tmp_path / "state"))
    monkeypatch.delenv("FEDADMIN_KIT", raising=False)
    return tmp_path / "state"


def complete(args: list[str], incomplete: str) -> list[str]:
    return [c.value for c in BashComplete(main, {}, "fedadmin", "_FEDADMIN_COMPLETE").get_completions(args, incomplete)]


def test_targets_complete_to_the_keywords_and_the_kits_cached_sites_not_given_yet(tmp_path, state):
    kit, other = tmp_path / "admin", tmp_path / "other-admin"
    completion.remember_sites(kit, ["site-2", "site-1", "server", "bad name", "site-1"])
    assert complete(["--kit", str(kit), "abort"], "") == ["server", "client", "all", "site-1", "site-2"]
    assert complete(["--kit", str(kit), "start"], "si") == ["site-1", "site-2"]
    assert complete(["--kit", str(kit), "abort", "site-1"], "s") == ["server", "site-2"]
    assert complete(["--kit", str(other), "abort"], "s") == ["server"]  # another kit is another federation
    assert complete(["--kit", str(kit), "logs"], "site-2") == ["site-2"]
    assert complete(["--kit", str(kit), "shell"], "a") == ["all"]
    assert (state.stat().st_mode & 0o777) == 0o700


def test_the_kit_comes_from_fedadmin_kit_when_not_given(tmp_path, state, monkeypatch):
    completion.remember_sites(tmp_path / "admin", ["hospital-a"])
    monkeypatch.setenv("FEDADMIN_KIT", str(tmp_path / "admin"))
    assert complete(["status"], "h") == ["hospital-a"]


def test_a_damaged_cache_completes_the_keywords_only(tmp_path, state):
    kit = tmp_path / "admin"
    completion.remember_sites(kit, ["site-1"])
    completion.sites_file(kit).write_text('{"sites": ["site-1", "; rm -rf /", 7]}')
    assert complete(["--kit", str(kit), "abort"], "") == ["server", "client", "all", "site-1"]
    completion.sites_file(kit).write_text("not json")
    assert complete(["--kit", str(kit), "abort"], "") == ["server", "client", "all"]


def test_status_of_the_whole_federation_keeps_the_site_names_it_saw(tmp_path, state, monkeypatch):
    import fedadmin.commands.status as status_module

    (tmp_path / "admin").mkdir()
    server = TargetReply("server", True, {"connected_sites": ["site-1", "site-3"]})
    outcome = CommandOutcome("status", True, [server, TargetReply("site-1", True, {}), TargetReply("site-2", False)])
    monkeypatch.setattr(status_module, "run_remote", lambda options, command, targets: outcome)
    CliRunner().invoke(main, ["--kit", str(tmp_path / "admin"), "--json", "status"])
    assert completion.cached_sites(tmp_path / "admin") == ["site-1", "site-2", "site-3"]
    only = CommandOutcome("status", True, [TargetReply("site-1", True, {})])
    monkeypatch.setattr(status_module, "run_remote", lambda options, command, targets: only)
    CliRunner().invoke(main, ["--kit", str(tmp_path / "admin"), "--json", "status", "site-1"])
    assert completion.cached_sites(tmp_path / "admin") == ["site-1", "site-2", "site-3"]  # one site is not all


def test_the_shell_asks_a_real_process_which_answers_from_the_cache_without_a_server(tmp_path, state):
    kit = tmp_path / "admin"  # no kit there at all: nothing could connect
    completion.remember_sites(kit, ["site-1", "site-2"])
    env = {**python_env(), completion.STATE_ENV: str(state), "_FEDADMIN_COMPLETE": "bash_complete"}
    env.update(COMP_WORDS=f"fedadmin --kit {kit} abort site-", COMP_CWORD="4")
    asked = subprocess.run(
        [sys.executable, "-m", "fedadmin.cli"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.split() == ["plain,site-1", "plain,site-2"]
    for shell in ("bash", "zsh", "fish"):
        env["_FEDADMIN_COMPLETE"] = f"{shell}_source"
        script = subprocess.run(
            [sys.executable, "-m", "fedadmin.cli"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert script.returncode == 0 and "_FEDADMIN_COMPLETE" in script.stdout, shell

"""Adding a command takes the places docs/admin-protocol.md names: here the console's part of its `ping` example.

The console lists and runs a newly declared command from its declaration and its module alone (no edit to
fedadmin/cli.py), and checks its arguments with that declaration before anything is sent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import test_console_remote as remote
from conftest import ROOT, python_env

from fedadmin.cli import CONSOLE_ONLY, main
from fedcommon.commands import COMMANDS

# The fake admin server over real mutual TLS, and the workspace it serves.
ws = remote.ws
fake = remote.fake

DOC = ROOT / "docs" / "admin-protocol.md"

_ECHO_MODULE = '''
"""`fedadmin echo-n TARGET... --count N`: a command with an argument, for the test."""

import click

from fedadmin.commands import ConsoleOptions, emit_remote, targets_argument


@click.command("echo-n")
@targets_argument(required=True)
@click.option("--count", type=int, required=True)
@click.pass_obj
def echo_n(options: ConsoleOptions, targets: tuple[str, ...], count: int) -> None:
    """Echo COUNT at each TARGET."""
    emit_remote(options, "echo-n", targets, {"count": count})
'''


def doc_example(first_line: str) -> str:
    """The python block of the "Adding a command" section that holds first_line, dedented."""
    section = DOC.read_text(encoding="utf-8").split("## Adding a command", 1)[1]
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        code = textwrap.dedent(block)
        if first_line in code:
            return code
    raise AssertionError(f"no python block with {first_line!r} in {DOC}")


def declared_ping() -> str:
    """The `Command("ping", ...)` expression of the docs' declaration."""
    line = next(x for x in doc_example('Command("ping"').splitlines() if 'Command("ping"' in x)
    return line.strip().rstrip(",")


def console_with(tmp_path: Path, declarations: list[str], modules: dict[str, str]) -> Path:
    """A script that runs `fedadmin` with more declarations and modules; fedadmin/cli.py is not touched."""
    folder = tmp_path / "more_commands"
    folder.mkdir()
    for name, source in modules.items():
        (folder / f"{name}.py").write_text(source, encoding="utf-8")
    script = tmp_path / "fedadmin_plus.py"
    script.write_text(
        "import fedadmin.commands\n"
        "from fedcommon import commands\n"
        "from fedcommon.commands import Arg, Command, Right, Targets, run_number\n"
        'commands.Topic.PING = "ping"\n'
        "Topic = commands.Topic\n"
        + "".join(f"commands.COMMANDS[{d}.name] = {d}\n" for d in declarations)
        + f"fedadmin.commands.__path__.append({str(folder)!r})\n"
        "from fedadmin.cli import main\n"
        'main(prog_name="fedadmin")\n',
        encoding="utf-8",
    )
    return script


def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        env={**python_env(), "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_docs_ping_is_listed_and_run_from_its_declaration_and_module(tmp_path, ws, fake):
    script = console_with(tmp_path, [declared_ping()], {"ping": doc_example('@click.command("ping")')})

    listed = run(script, "--help")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^\s+ping\s+Ask each TARGET to answer at once\.", listed.stdout, flags=re.M), listed.stdout

    result = run(script, "--kit", str(ws / "admin"), "--json", "ping", "site-1", "site-2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["command"], report["ok"]) == ("ping", True)
    assert [r["target"] for r in report["replies"]] == ["site-1", "site-2"]
    assert fake.commands() == ["ping"]
    assert list(fake.requests[0].targets) == ["site-1", "site-2"]


def test_a_new_commands_arguments_are_checked_with_its_declaration_before_sending(tmp_path, ws, fake):
    declaration = 'Command("echo-n", "echo", Targets.REQUIRED, (Right.VIEW,), "echo", args=(Arg("count", run_number),))'
    script = console_with(tmp_path, [declaration], {"echo_n": _ECHO_MODULE})

    refused = run(script, "--kit", str(ws / "admin"), "echo-n", "site-1", "--count", "0")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "count must be a whole number >= 1, got 0" in refused.stderr
    assert fake.requests == []

    sent = run(script, "--kit", str(ws / "admin"), "--json", "echo-n", "site-1", "--count", "3")
    assert sent.returncode == 0, sent.stderr
    assert fake.commands() == ["echo-n"]
    assert json.loads(fake.requests[0].args_json) == {"count": 3}


def test_every_declared_console_command_and_no_other_is_found_by_its_name():
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        assert main.get_command(ctx, name).name == name
    declared = {name for name, c in COMMANDS.items() if c.console}
    assert set(main.list_commands(ctx)) == declared | set(CONSOLE_ONLY)
    assert not declared & set(CONSOLE_ONLY)

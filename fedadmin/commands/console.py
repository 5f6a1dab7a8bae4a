"""`fedadmin console`: an interactive prompt with history and tab completion of commands and targets."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable
from pathlib import Path

import click

from fedadmin.commands import ConsoleOptions
from fedadmin.commands.batch import run_line
from fedcommon.commands import GROUP_TARGETS

HISTORY = Path("~/.fedadmin_history")
_LEAVE = ("exit", "quit")


def _site_names(options: ConsoleOptions) -> list[str]:
    """The sites the server knows, for completion; none when it cannot be asked."""
    if options.kit is None:
        return []
    from fedadmin.session import Session

    try:
        with Session(options.kit, 3.0) as session:
            server = session.status("server").data
    except Exception:
        return []
    names = set(server.get("connected_sites") or []) | set(server.get("registered_sites") or [])
    return sorted(n for n in names if isinstance(n, str))


def _completer(commands: list[str], sites: Callable[[], list[str]]) -> Callable[[str, int], str | None]:
    cache: list[list[str]] = []

    def complete(text: str, state: int) -> str | None:
        import readline

        words = readline.get_line_buffer()[: readline.get_begidx()].split()
        if not words:
            choices = [*commands, *_LEAVE]
        elif words[0] == "poc" and len(words) == 1:
            choices = ["prepare", "start", "stop", "run"]
        else:
            if not cache:
                cache.append(sites())
            choices = [*GROUP_TARGETS, *cache[0]]
        matches = [c for c in choices if c.startswith(text)]
        return matches[state] if state < len(matches) else None

    return complete


def _set_up_readline(commands: list[str], options: ConsoleOptions) -> Callable[[], None]:
    """Enable history and completion when readline exists; returns what saves the history."""
    try:
        import readline
    except ImportError:
        return lambda: None
    history = HISTORY.expanduser()
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(1000)
    readline.set_completer(_completer(commands, lambda: _site_names(options)))
    readline.set_completer_delims(" \t")
    readline.parse_and_bind("tab: complete")

    def save() -> None:
        with contextlib.suppress(OSError):
            readline.write_history_file(history)

    return save


@click.command("console")
@click.pass_context
def console(ctx: click.Context) -> None:
    """An interactive prompt: type commands as after `fedadmin`; exit, quit or Ctrl-D leaves."""
    options: ConsoleOptions = ctx.obj
    root = ctx.find_root()
    commands = [n for n in root.command.list_commands(root) if n != "console"]
    save = _set_up_readline(commands, options)
    click.echo("fedadmin console: type a command (e.g. status), `help`, or exit.", err=True)
    try:
        while True:
            try:
                line = input("fedadmin> ")
            except KeyboardInterrupt:
                click.echo(err=True)
                continue
            except EOFError:
                click.echo(err=True)
                break
            try:
                argv = shlex.split(line, comments=True)
            except ValueError as exc:
                click.echo(f"Error: {exc}", err=True)
                continue
            if not argv:
                continue
            if argv[0] in _LEAVE:
                break
            if argv[0] == "help":
                argv = [*argv[1:], "--help"]
            if argv[0] == "console":
                click.echo("Error: already in the console", err=True)
                continue
            run_line(options, argv)
    finally:
        save()

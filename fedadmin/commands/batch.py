"""`fedadmin batch FILE`: run one command per line, in-process, stopping at the first failure."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from fedadmin.commands import EXIT_FAILED, ConsoleOptions


def run_line(options: ConsoleOptions, argv: list[str]) -> int:
    """Run one command as typed after `fedadmin`, with the session's global options; returns its exit code."""
    from fedadmin.cli import main

    try:
        rv = main.main([*options.as_args(), *argv], prog_name="fedadmin", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return EXIT_FAILED
    return rv if isinstance(rv, int) else 0


def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv) for every command line; `#` starts a comment; blank lines are skipped."""
    commands = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            argv = shlex.split(line, comments=True)
        except ValueError as exc:
            raise click.UsageError(f"{path}:{number}: {exc}") from None
        if argv:
            commands.append((number, argv))
    return commands


@click.command("batch")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def batch(options: ConsoleOptions, file: Path) -> None:
    """Run the commands in FILE, one per line as typed after `fedadmin`; stop at the first that fails."""
    for number, argv in read_lines(file):
        if argv[0] in ("batch", "console"):
            raise click.UsageError(f"{file}:{number}: {argv[0]} cannot run inside a batch")
        code = run_line(options, argv)
        if code != 0:
            if not options.json:
                click.echo(f"batch: stopped at {file}:{number} ({shlex.join(argv)}), exit {code}", err=True)
            raise click.exceptions.Exit(code)

"""`fedadmin set-run N`: choose the run number that deploy, start and abort act on."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit_remote


@click.command("set-run")
@click.argument("run_number", metavar="N", type=click.IntRange(min=1))
@click.pass_obj
def set_run(options: ConsoleOptions, run_number: int) -> None:
    """Set the server's current run number (needed before deploy)."""
    emit_remote(options, "set-run", ["server"], {"run_number": run_number})

"""`fedadmin set-run N`: choose the run number that deploy, start and abort act on."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit_replies


@click.command("set-run")
@click.argument("run_number", metavar="N", type=click.IntRange(min=1))
@click.pass_obj
def set_run(options: ConsoleOptions, run_number: int) -> None:
    """Set the server's current run number (needed before deploy)."""
    emit_replies(options, lambda s: s.set_run(run_number))

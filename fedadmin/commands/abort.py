"""`fedadmin abort`: stop training at the targets (asks first)."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, confirm, emit_remote, targets_argument


@click.command("abort")
@targets_argument(required=True)
@click.pass_obj
def abort(options: ConsoleOptions, targets: tuple[str, ...]) -> None:
    """Abort the current run at the targets; `abort server` aborts the sites first."""
    confirm(options, f"Abort training at {', '.join(targets)}?")
    emit_remote(options, "abort", targets)

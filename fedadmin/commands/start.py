"""`fedadmin start`: start training the deployed run at the targets."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit_replies, run_option, targets_argument


@click.command("start")
@targets_argument(required=True)
@run_option("Start this run.")
@click.pass_obj
def start(options: ConsoleOptions, targets: tuple[str, ...], run_number: int | None) -> None:
    """Start the current run (or --run N) at the targets (server, client, all or site names)."""
    emit_replies(options, lambda s: s.start(targets, run_number))

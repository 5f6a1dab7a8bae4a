"""`fedadmin start`: start training the deployed run at the targets."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit_remote, targets_argument


@click.command("start")
@targets_argument(required=True)
@click.pass_obj
def start(options: ConsoleOptions, targets: tuple[str, ...]) -> None:
    """Start the current run at the targets (server, client, all or site names)."""
    emit_remote(options, "start", targets)

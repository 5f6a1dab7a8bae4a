"""`fedadmin restart`: restart the server or sites' processes (asks first)."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, confirm, emit_replies, targets_argument


@click.command("restart")
@targets_argument(required=True)
@click.pass_obj
def restart(options: ConsoleOptions, targets: tuple[str, ...]) -> None:
    """Restart the targets' processes (training in progress there stops)."""
    confirm(options, f"Restart {', '.join(targets)}? Training in progress there stops.")
    emit_replies(options, lambda s: s.restart(targets))

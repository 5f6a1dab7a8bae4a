"""`fedadmin shutdown`: stop the server or sites' processes (asks first)."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, confirm, emit_replies, targets_argument


@click.command("shutdown")
@targets_argument(required=True)
@click.pass_obj
def shutdown(options: ConsoleOptions, targets: tuple[str, ...]) -> None:
    """Shut the targets down; the server refuses while sites are registered."""
    confirm(options, f"Shut down {', '.join(targets)}? They must be started again by hand.")
    emit_replies(options, lambda s: s.shutdown(targets))

"""`fedadmin set-timeout S`: how long the server waits for the sites' replies."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit_replies


@click.command("set-timeout")
@click.argument("seconds", metavar="S", type=click.FloatRange(min=0, min_open=True))
@click.pass_obj
def set_timeout(options: ConsoleOptions, seconds: float) -> None:
    """Set the seconds the server waits for the sites' replies to a command."""
    emit_replies(options, lambda s: s.set_timeout(seconds))

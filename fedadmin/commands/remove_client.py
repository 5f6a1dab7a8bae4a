"""`fedadmin remove-client SITE`: drop a site from the server's registry (asks first)."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, confirm, emit_replies


@click.command("remove-client")
@click.argument("site")
@click.pass_obj
def remove_client(options: ConsoleOptions, site: str) -> None:
    """Remove SITE from the server's registered sites (it must register again to take part)."""
    confirm(options, f"Remove {site} from the federation?")
    emit_replies(options, lambda s: s.remove_client(site))

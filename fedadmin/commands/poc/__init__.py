"""`fedadmin poc`: a local proof-of-concept federation: prepare kits, start, stop, or do a whole run."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleGroup

# Each subcommand's module is imported only when it runs (or `poc --help` lists it): `fedadmin --help` pays for none.
_SUBCOMMANDS = {name: f"fedadmin.commands.poc.{name}:{name}" for name in ("prepare", "start", "stop", "run")}


@click.group("poc", cls=ConsoleGroup, lazy_commands=_SUBCOMMANDS)
def poc() -> None:
    """Set up a local federation to try things out (proof of concept)."""

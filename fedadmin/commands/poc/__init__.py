"""`fedadmin poc`: a local proof-of-concept federation: prepare kits, start, stop, or do a whole run."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleGroup
from fedadmin.commands.poc.prepare import prepare
from fedadmin.commands.poc.run import run
from fedadmin.commands.poc.start import start
from fedadmin.commands.poc.stop import stop


@click.group("poc", cls=ConsoleGroup)
def poc() -> None:
    """Set up a local federation to try things out (proof of concept)."""


for _command in (prepare, start, stop, run):
    poc.add_command(_command)

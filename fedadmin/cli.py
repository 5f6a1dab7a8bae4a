"""The `fedadmin` console: global options and the command groups (one module each in fedadmin.commands)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from fedadmin.commands import ConsoleGroup, ConsoleOptions
from fedadmin.commands.poc import poc


@click.group(cls=ConsoleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--kit",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="FEDADMIN_KIT",
    help="The admin's participant folder (holding startup/). [env: FEDADMIN_KIT]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before destructive commands.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the server and the sites.",
)
@click.option("--debug", is_flag=True, help="Log details and show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, kit: Path | None, as_json: bool, yes: bool, timeout: float, debug: bool) -> None:
    """Operate a federation: prepare kits, deploy, start and watch training across sites."""
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = ConsoleOptions(kit=kit, json=as_json, yes=yes, timeout=timeout, debug=debug)


main.add_command(poc)

if __name__ == "__main__":
    main(prog_name="fedadmin")

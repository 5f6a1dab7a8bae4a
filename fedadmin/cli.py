"""The `fedadmin` console: global options and the commands (one module each in fedadmin.commands)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from fedadmin.commands import ConsoleGroup, ConsoleOptions
from fedadmin.commands.abort import abort
from fedadmin.commands.batch import batch
from fedadmin.commands.console import console
from fedadmin.commands.delete_run import delete_run
from fedadmin.commands.deploy import deploy
from fedadmin.commands.poc import poc
from fedadmin.commands.provision import provision
from fedadmin.commands.remove_client import remove_client
from fedadmin.commands.restart import restart
from fedadmin.commands.set_run import set_run
from fedadmin.commands.set_timeout import set_timeout
from fedadmin.commands.shell import shell
from fedadmin.commands.shutdown import shutdown
from fedadmin.commands.start import start
from fedadmin.commands.start_mgpu import start_mgpu
from fedadmin.commands.status import status
from fedadmin.commands.sysinfo import sysinfo
from fedadmin.commands.validate import validate
from fedadmin.commands.wait import wait

COMMANDS = (
    status,
    set_run,
    deploy,
    start,
    start_mgpu,
    abort,
    sysinfo,
    validate,
    shell,
    delete_run,
    restart,
    shutdown,
    remove_client,
    set_timeout,
    wait,
    batch,
    console,
    poc,
    provision,
)


@click.group(cls=ConsoleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--kit",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="FEDADMIN_KIT",
    help="The admin's participant folder (holding startup/). [env: FEDADMIN_KIT]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per command instead of tables.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before destructive commands.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds the server waits for the sites' replies.  [default: the server's setting, see set-timeout]",
)
@click.option("--debug", is_flag=True, help="Log details and show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, kit: Path | None, as_json: bool, yes: bool, timeout: float | None, debug: bool) -> None:
    """Operate a federation: deploy, start and watch training across sites.

    TARGET is server, client (every connected site), all (the server and every site) or site names.
    Exit codes: 0 ok, 1 a target failed or did not reply, 2 usage, 3 cannot connect or authenticate.
    """
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = ConsoleOptions(kit=kit, json=as_json, yes=yes, timeout=timeout, debug=debug)


for _command in COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main(prog_name="fedadmin")

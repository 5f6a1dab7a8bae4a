"""The `fedadmin` console: global options and the commands (one module each in fedadmin.commands)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from fedadmin.commands import ConsoleGroup, ConsoleOptions
from fedcommon import __version__
from fedcommon.commands import COMMANDS as DECLARED
from fedcommon.logging_config import ENV_LEVEL, LoggingConfigError

# The console's own commands; every other one is declared in fedcommon.commands (those with console=True).
CONSOLE_ONLY = ("wait", "batch", "console", "poc", "provision", "job")


def _module_of(name: str) -> str:
    """Where a command lives by convention: fedadmin.commands.<name, - as _>:<the same>."""
    module = name.replace("-", "_")
    return f"fedadmin.commands.{module}:{module}"


# Each command's module is imported only when that command runs (see ConsoleGroup).
COMMANDS = {
    **{name: _module_of(name) for name, declaration in DECLARED.items() if declaration.console},
    **{name: _module_of(name) for name in CONSOLE_ONLY},
}


@click.group(cls=ConsoleGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--kit",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="FEDADMIN_KIT",
    help="The admin's participant folder (holding startup/). [env: FEDADMIN_KIT]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per command instead of tables.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before destructive commands.")
@click.option(
    "--reply-timeout",
    "timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds the server waits for the sites' replies to a command.  [default: the server's setting, see "
    "set-timeout] (`wait --timeout` is how long wait follows a run)",
)
@click.option("--debug", is_flag=True, help="Log details and show tracebacks on errors.")
@click.version_option(__version__, prog_name="fedadmin", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, kit: Path | None, as_json: bool, yes: bool, timeout: float | None, debug: bool) -> None:
    """Operate a federation: deploy, start and watch training across sites.

    TARGET is server, client (every connected site), all (the server and every site) or site names.
    Exit codes: 0 ok, 1 a target failed or did not reply, 2 usage, 3 cannot connect or authenticate.
    """
    if debug or os.environ.get(ENV_LEVEL, "").strip():
        # The console logs (to stderr) only when asked: --debug, or FEDLEARN_LOG_LEVEL (FEDLEARN_LOG_FORMAT=json).
        from fedcommon.logs import configure_logging

        try:
            configure_logging(None, debug, role="admin")
        except LoggingConfigError as e:
            raise click.UsageError(str(e)) from None
        if debug:  # not for FEDLEARN_LOG_LEVEL: `poc start` hands its environment to the participants
            os.environ.setdefault("GRPC_VERBOSITY", "INFO")
    ctx.obj = ConsoleOptions(kit=kit, json=as_json, yes=yes, timeout=timeout, debug=debug)


def run() -> None:
    """The `fedadmin` program: main, then exit without tearing the interpreter down.

    Tearing down grpc's, click's and protobuf's modules costs a one-shot call ~20 ms after its answer is printed;
    every command has closed its channels and files by then, so only the output needs flushing.
    """
    try:
        main(prog_name="fedadmin")
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc)
    if "logging" in sys.modules:  # --debug or FEDLEARN_LOG_LEVEL: flush what the handlers hold
        sys.modules["logging"].shutdown()
    try:
        sys.stdout.flush()
    except OSError:
        code = _FLUSH_FAILED
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


# Python's own exit status when it cannot flush stdout at exit (a closed pipe).
_FLUSH_FAILED = 120


def _exit_status(exc: SystemExit) -> int:
    """The status sys.exit would give: None is 0, an int itself, anything else is printed and gives 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    run()

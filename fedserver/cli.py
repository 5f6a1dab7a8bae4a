"""`fedserver`: start the federation server from a participant workspace."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from fedcommon.logs import configure_logging

log = logging.getLogger("fedserver")


@click.group()
def main() -> None:
    """The fedlearn federation server."""


@main.command()
@click.option("--workspace", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The server's participant folder (holds startup/).")
@click.option("--mmar", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start run 1 from this MMAR at once.")
@click.option("--run-number", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Override fl_port from the kit.")
@click.option("--debug", is_flag=True, help="Verbose logs.")
def start(workspace: Path, mmar: Path | None, run_number: int, port: int | None, debug: bool) -> None:
    """Serve the training plane until SIGINT or SIGTERM."""
    from fedcommon.kit import KitError, load_kit
    from fedcommon.mmar import MMARError
    from fedserver.server import FederationServer, ServerError

    configure_logging(workspace / "log.txt", debug)
    try:
        kit = load_kit(workspace)
        server = FederationServer(workspace, kit, fl_port=port)
        if mmar is not None:
            # The run exists before the port opens, so an early site never sees "no run yet".
            server.start_run(mmar, run_number)
        bound = server.start()
    except KitError as e:
        click.echo(f"fedserver: {e}", err=True)
        sys.exit(3)
    except (MMARError, ServerError) as e:
        log.error("%s", e)
        click.echo(f"fedserver: {e}", err=True)
        sys.exit(1)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"fedserver ready on {server.bind_host}:{bound}")
    sys.stdout.flush()
    stop.wait()
    log.info("shutting down")
    server.stop()


if __name__ == "__main__":
    main()

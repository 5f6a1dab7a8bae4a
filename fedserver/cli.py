"""`fedserver`: start the federation server from a participant workspace."""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import threading
from pathlib import Path

import click

from fedcommon import __version__
from fedcommon.logging_config import LoggingConfigError
from fedcommon.logs import configure_logging

log = logging.getLogger("fedserver")


@click.group()
@click.version_option(__version__, prog_name="fedserver", message="%(prog)s %(version)s")
def main() -> None:
    """The fedlearn federation server."""


def _raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: each connected site holds a socket (1024 is common)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("could not raise the open-file limit (%s): more than ~%d sites may be refused", e, soft // 2)


@main.command()
@click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The server's participant folder (holds startup/).",
)
@click.option(
    "--mmar",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Deploy and start this MMAR as run --run-number at once.",
)
@click.option("--run-number", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Override fl_port from the kit.")
@click.option("--admin-port", type=click.IntRange(0, 65535), default=None, help="Override admin_port from the kit.")
@click.option(
    "--bulk-port",
    type=click.IntRange(-1, 65535),
    default=None,
    help="The bulk channel's port for tensor bytes (0: a free one, -1: none).  [default: server.bulk_port in the "
    "kit's fed.json, else 0]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics over HTTP on this port (0: a free one; needs prometheus-client).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Where the metrics port listens; plain HTTP, so keep it local unless a proxy guards it.",
)
@click.option(
    "--max-jobs",
    "max_runs",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="How many runs (jobs, or runs started by hand with --run N) may train at once.  [default: max_jobs in "
    "the workspace's local/jobs.json, else 1]",
)
@click.option("--debug", is_flag=True, help="Verbose logs.")
def start(
    workspace: Path,
    mmar: Path | None,
    run_number: int,
    port: int | None,
    admin_port: int | None,
    bulk_port: int | None,
    metrics_port: int | None,
    metrics_host: str,
    max_runs: int | None,
    debug: bool,
) -> None:
    """Serve the training, agent and admin planes until SIGINT, SIGTERM or an operator's shutdown."""
    from fedserver.malloc_arenas import bound_malloc_arenas, restart_without_thread_caches

    restart_without_thread_caches()  # before any thread or import that the restart would repeat
    from fedcommon.kit import KitError, load_kit
    from fedserver.crypto_child import KitCheck

    try:
        # Its certificates are checked in a child (this process never loads cryptography: fedserver.crypto_child),
        # while this one imports the server.
        check = KitCheck(load_kit(workspace, check_certificates=False), "server", "fedserver start")
    except KitError as e:
        click.echo(f"fedserver: {e}", err=True)
        sys.exit(3)
    from fedcommon.mmar import MMARError
    from fedcommon.pid_file import remove_pid_file, write_pid_file
    from fedcommon.private import make_private
    from fedcommon.readiness import tell_ready
    from fedserver.disk_sum import finish_deletions
    from fedserver.errors import ServerError
    from fedserver.server import FederationServer
    from fedserver.telemetry import ExporterError

    try:
        kit = check.kit()
    except KitError as e:
        click.echo(f"fedserver: {e}", err=True)
        sys.exit(3)
    make_private(workspace)
    try:
        configure_logging(workspace / "log.txt", debug, role="server", name=kit.name, local=workspace / "local")
    except LoggingConfigError as e:
        click.echo(f"fedserver: {e}", err=True)
        sys.exit(3)
    _raise_open_file_limit()
    bound_malloc_arenas()
    try:
        server = FederationServer(
            workspace, kit, fl_port=port, admin_port=admin_port, max_runs=max_runs, bulk_port=bulk_port
        )
        if mmar is not None:
            # The run exists before the port opens, so an early site never sees "no run yet".
            server.start_run(mmar, run_number)
        metrics_bound = server.serve_metrics(metrics_host, metrics_port) if metrics_port is not None else None
        bound = server.start()
    except KitError as e:
        click.echo(f"fedserver: {e}", err=True)
        sys.exit(3)
    except (MMARError, ServerError, ExporterError) as e:
        log.error("%s", e)
        click.echo(f"fedserver: {e}", err=True)
        sys.exit(1)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    write_pid_file(workspace)  # `fedadmin poc stop` finds this server however it was started
    host = server.bind_host
    metrics = f" metrics http://{metrics_host}:{metrics_bound}/metrics" if metrics_bound is not None else ""
    click.echo(f"fedserver ready on {host}:{bound} admin {host}:{server.admin_port}{metrics}")
    sys.stdout.flush()
    tell_ready()  # `fedadmin poc start` waits for this, not for a poll to find the ports open
    while not stop.wait(0.2) and not server.exit_requested.is_set():
        pass
    restart = server.exit_requested.is_set() and server.restart_requested
    log.info("restarting" if restart else "shutting down")
    server.stop()
    finish_deletions()  # the closed rounds' sum files: os.execv would not wait for them
    remove_pid_file(workspace)
    if restart:
        # The same ports, without --mmar: the new process picks up the run state from the workspace.
        argv = [
            sys.executable,
            "-m",
            "fedserver.cli",
            "start",
            "--workspace",
            str(workspace),
            "--port",
            str(bound),
            "--admin-port",
            str(server.admin_port),
            *(["--max-jobs", str(max_runs)] if max_runs is not None else []),
            *(["--bulk-port", str(bulk_port)] if bulk_port is not None else []),
            *(["--debug"] if debug else []),
            *(["--metrics-port", str(metrics_bound), "--metrics-host", metrics_host] if metrics_bound else []),
        ]
        log.info("stopped; starting again")
        logging.shutdown()
        sys.stdout.flush()
        os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()

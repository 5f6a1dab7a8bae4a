"""`fedclient`: a site's command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from fedcommon import __version__

log = logging.getLogger("fedclient")


@click.group()
@click.version_option(__version__, prog_name="fedclient", message="%(prog)s %(version)s")
def main() -> None:
    """The fedlearn site client."""


@main.command()
@click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The site's participant folder (holds startup/).",
)
@click.option("--mmar", type=click.Path(exists=True, path_type=Path), required=True, help="The MMAR to train (folder).")
@click.option("--debug", is_flag=True)
def train(workspace: Path, mmar: Path, debug: bool) -> None:
    """Train this site in the foreground; exit 0 when the server ends the run."""
    from fedclient.worker import run_worker

    sys.exit(run_worker(workspace, mmar, debug))


@main.command()
@click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The site's participant folder (holds startup/).",
)
@click.option("--debug", is_flag=True, help="Verbose logs.")
def start(workspace: Path, debug: bool) -> None:
    """Run this site's admin agent until SIGTERM, SIGINT or an operator's shutdown or restart."""
    from fedclient.admin import FedAdminAgent
    from fedclient.admin_commands import site_processors
    from fedclient.admin_interface import ClientAdminInterface
    from fedclient.local_policy import LocalPolicy
    from fedcommon.kit import KitError, load_participant_kit
    from fedcommon.logging_config import LoggingConfigError
    from fedcommon.logs import configure_logging
    from fedcommon.pid_file import remove_pid_file, write_pid_file
    from fedcommon.private import make_private
    from fedcommon.readiness import tell_ready

    try:
        kit = load_participant_kit(workspace, "client", "fedclient start")
    except KitError as e:
        click.echo(f"fedclient: {e}", err=True)
        sys.exit(3)
    workspace = kit.folder
    make_private(workspace)
    try:
        configure_logging(workspace / "log.txt", debug, role="site", name=kit.name, local=workspace / "local")
    except LoggingConfigError as e:
        click.echo(f"fedclient: {e}", err=True)
        sys.exit(3)
    from fedclient.admin import AdminMessageSender

    startup = workspace / "startup"
    sender = AdminMessageSender(
        kit.name,
        root_cert=str(startup / "rootCA.pem"),
        ssl_cert=str(startup / "cert.pem"),
        private_key=str(startup / "key.pem"),
        server_args={"target": kit.fl_target},
        secure=True,
    )
    policy = LocalPolicy(workspace)
    interface = ClientAdminInterface(
        kit, kit.name, sender, argparse.Namespace(workspace=workspace, debug=debug), rank=0, policy=policy
    )
    if policy.error:
        click.echo(f"fedclient: {policy.error}; every command will be refused until it is fixed", err=True)
    agent = FedAdminAgent(
        kit.name, sender, interface, workers=interface.workers, audit_log=workspace / "audit.log", policy=policy
    )
    interface.set_agent(agent)
    for processor in site_processors():
        agent.register_processor(processor)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    write_pid_file(workspace)  # `fedadmin poc stop` finds this agent however it was started
    log.info("%s: connecting to the server at %s", kit.name, kit.fl_target)
    announced = False
    while not stop.is_set() and not interface.exit_requested.is_set():
        if not announced and sender.wait_connected(0.2):
            log.info("%s: connected to the server at %s", kit.name, kit.fl_target)
            click.echo(f"fedclient agent {kit.name} started")
            sys.stdout.flush()
            tell_ready()  # `fedadmin poc start` waits for this
            announced = True
        elif announced:
            stop.wait(0.2)
    restart = not stop.is_set() and interface.restart_requested
    log.info("%s", "restarting" if restart else "shutting down")
    interface.close()
    agent.shutdown()
    remove_pid_file(workspace)
    if restart:
        argv = [
            sys.executable,
            "-m",
            "fedclient.cli",
            "start",
            "--workspace",
            str(workspace),
            *(["--debug"] if debug else []),
        ]
        logging.shutdown()
        sys.stdout.flush()
        os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()

"""`fedclient`: a site's command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def main() -> None:
    """The fedlearn site client."""


@main.command()
@click.option("--workspace", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The site's participant folder (holds startup/).")
@click.option("--mmar", type=click.Path(exists=True, path_type=Path), required=True,
              help="The MMAR to train (folder).")
@click.option("--debug", is_flag=True)
def train(workspace: Path, mmar: Path, debug: bool) -> None:
    """Train this site in the foreground; exit 0 when the server ends the run."""
    from fedclient.worker import run_worker

    sys.exit(run_worker(workspace, mmar, debug))


if __name__ == "__main__":
    main()

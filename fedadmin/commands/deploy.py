"""`fedadmin deploy MMAR TARGET...`: upload an MMAR (a folder is zipped) and deploy it as the current run."""

from __future__ import annotations

from pathlib import Path

import click

from fedadmin.commands import ConsoleOptions, emit, outcome_of, run_option, targets_argument
from fedadmin.replies import RepliesResult


@click.command("deploy")
@click.argument("mmar", type=click.Path(exists=True, path_type=Path))
@targets_argument(required=True)
@run_option("Deploy as this run.")
@click.pass_obj
def deploy(options: ConsoleOptions, mmar: Path, targets: tuple[str, ...], run_number: int | None) -> None:
    """Upload MMAR (a folder or a .zip) and deploy it to the targets as the current run (see set-run) or --run N."""
    from fedadmin.upload import check_mmar

    check_mmar(mmar)  # the console's own usage error, naming the MMAR argument
    deployed = outcome_of(options, lambda s: s.deploy(mmar, targets, run_number, show_progress=not options.json))
    extra = {"mmar": str(mmar), "blob_id": deployed.blob_id, "size": deployed.size}
    emit(options, RepliesResult(deployed.outcome, extra))

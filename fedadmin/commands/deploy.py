"""`fedadmin deploy MMAR TARGET...`: upload an MMAR (a folder is zipped) and deploy it as the current run."""

from __future__ import annotations

from pathlib import Path

import click

from fedadmin.commands import ConsoleOptions, connect, emit, run_option, targets_argument, with_run
from fedadmin.replies import RepliesResult


@click.command("deploy")
@click.argument("mmar", type=click.Path(exists=True, path_type=Path))
@targets_argument(required=True)
@run_option("Deploy as this run.")
@click.pass_obj
def deploy(options: ConsoleOptions, mmar: Path, targets: tuple[str, ...], run_number: int | None) -> None:
    """Upload MMAR (a folder or a .zip) and deploy it to the targets as the current run (see set-run) or --run N."""
    from fedadmin.upload import check_mmar, upload_mmar

    check_mmar(mmar)
    with connect(options) as conn:
        uploaded = upload_mmar(conn, mmar, show_progress=not options.json)
        outcome = conn.execute("deploy", list(targets), with_run({"blob_id": uploaded.blob_id}, run_number))
    extra = {"mmar": str(mmar), "blob_id": uploaded.blob_id, "size": uploaded.size}
    emit(options, RepliesResult(outcome, extra))

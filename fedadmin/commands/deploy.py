"""`fedadmin deploy MMAR TARGET...`: upload an MMAR (a folder is zipped) and deploy it as the current run."""

from __future__ import annotations

from pathlib import Path

import click

from fedadmin.commands import ConsoleOptions, connect, emit, targets_argument
from fedadmin.replies import RepliesResult


@click.command("deploy")
@click.argument("mmar", type=click.Path(exists=True, path_type=Path))
@targets_argument(required=True)
@click.pass_obj
def deploy(options: ConsoleOptions, mmar: Path, targets: tuple[str, ...]) -> None:
    """Upload MMAR (a folder or a .zip) and deploy it to the targets as the current run (see set-run)."""
    from fedadmin.upload import check_mmar, upload_mmar

    check_mmar(mmar)
    with connect(options) as conn:
        uploaded = upload_mmar(conn, mmar, show_progress=not options.json)
        outcome = conn.execute("deploy", list(targets), {"blob_id": uploaded.blob_id})
    extra = {"mmar": str(mmar), "blob_id": uploaded.blob_id, "size": uploaded.size}
    emit(options, RepliesResult(outcome, extra))

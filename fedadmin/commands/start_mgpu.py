"""`fedadmin start-mgpu`: start the deployed run at sites with one training rank per GPU."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit_remote, targets_argument
from fedcommon.commands import MAX_GPUS


@click.command("start-mgpu")
@click.argument("gpus", type=click.IntRange(min=1, max=MAX_GPUS), metavar="GPUS")
@targets_argument(required=False)
@click.pass_obj
def start_mgpu(options: ConsoleOptions, gpus: int, targets: tuple[str, ...]) -> None:
    """Start the current run with GPUS ranks (torchrun, DDP) at each site TARGET (default: all).

    `server` among the targets starts the server's side of the run, as `start` does. A site refuses
    when it has fewer GPUs than asked; a site without GPUs runs GPUS CPU ranks (gloo).
    """
    emit_remote(options, "start-mgpu", targets or ("all",), {"gpu_number": gpus})

"""`fedadmin start-mgpu`: start the deployed run at sites with one training rank per GPU."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit_replies, run_option, targets_argument
from fedcommon.commands import MAX_GPUS


@click.command("start-mgpu")
@click.argument("gpus", type=click.IntRange(min=1, max=MAX_GPUS), metavar="GPUS")
@targets_argument(required=False)
@run_option("Start this run.")
@click.pass_obj
def start_mgpu(options: ConsoleOptions, gpus: int, targets: tuple[str, ...], run_number: int | None) -> None:
    """Start the current run (or --run N) with GPUS ranks (torchrun, DDP) at each site TARGET (default: all).

    `server` among the targets starts the server's side of the run, as `start` does. A site refuses
    when it has fewer GPUs than asked; a site without GPUs runs GPUS CPU ranks (gloo).
    """
    emit_replies(options, lambda s: s.start_mgpu(gpus, targets or ("all",), run_number))

"""`fedadmin abort`: stop training at the targets (asks first)."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, confirm, emit_replies, run_option, targets_argument


@click.command("abort")
@targets_argument(required=True)
@run_option("Abort this run.", "the current run if it trains, else the only training run")
@click.pass_obj
def abort(options: ConsoleOptions, targets: tuple[str, ...], run_number: int | None) -> None:
    """Abort the current run (or --run N) at the targets; `abort server` aborts the sites first."""
    what = f"run {run_number}" if run_number is not None else "training"
    confirm(options, f"Abort {what} at {', '.join(targets)}?")
    emit_replies(options, lambda s: s.abort(targets, run_number))

"""`fedadmin delete-run N`: delete a run's folder at the targets (asks first)."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, confirm, emit_replies, targets_argument


@click.command("delete-run")
@click.argument("run_number", metavar="N", type=click.IntRange(min=1))
@targets_argument(required=False)
@click.pass_obj
def delete_run(options: ConsoleOptions, run_number: int, targets: tuple[str, ...]) -> None:
    """Delete run N (its models, logs and results) at the targets (default: all); not the active run."""
    targets = targets or ("all",)
    confirm(options, f"Delete run {run_number} at {', '.join(targets)}? Its models and logs are lost.")
    emit_replies(options, lambda s: s.delete_run(run_number, targets))

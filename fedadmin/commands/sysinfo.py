"""`fedadmin sysinfo`: CPU, memory, disk and GPUs of the server and the sites."""

from __future__ import annotations

from typing import Any

import click

from fedadmin.commands import ConsoleOptions, emit, outcome_of, targets_argument
from fedadmin.replies import RepliesResult


class SysinfoResult(RepliesResult):
    """Sysinfo replies: one column per target."""

    def __rich__(self) -> Any:
        from fedadmin import render

        return render.sysinfo_view(self.outcome)


@click.command("sysinfo")
@targets_argument(required=False)
@click.pass_obj
def sysinfo(options: ConsoleOptions, targets: tuple[str, ...]) -> None:
    """Show the resources of each target (default: all)."""
    emit(options, SysinfoResult(outcome_of(options, lambda s: s.sysinfo(targets or ("all",)))))

"""`fedadmin poc stop`: stop every process of a POC workspace (recorded by `poc start` or by itself), check none is
left."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from fedadmin.commands import ConsoleOptions, emit

if TYPE_CHECKING:
    from fedadmin.local_federation import Stopped


@dataclass(frozen=True)
class PocStopped:
    """How each recorded process was stopped."""

    workspace: Path
    processes: list[Stopped]
    command: ClassVar[str] = "poc stop"

    def to_json(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace),
            "processes": [{"name": p.name, "pid": p.pid, "outcome": p.outcome} for p in self.processes],
        }

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table()
        for name in ("participant", "pid", "outcome"):
            table.add_column(name)
        for p in self.processes:
            table.add_row(p.name, str(p.pid), p.outcome)
        return Group(f"POC federation in {self.workspace}: stopped, none left running", table)


@click.command("stop")
@click.option(
    "--workspace",
    "-w",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The workspace `poc start` ran from.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=15.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL.",
)
@click.pass_obj
def stop(options: ConsoleOptions, workspace: Path, grace: float) -> None:
    """SIGTERM the recorded process groups and every participant process that recorded itself (one restarted by
    hand included), SIGKILL what is left after a grace period, verify none is left."""
    from fedadmin.session import poc_stop

    emit(options, PocStopped(workspace.resolve(), poc_stop(workspace, grace)))

"""`fedadmin poc start`: start the server and every site of a POC workspace in the background."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from fedadmin.commands import ConsoleOptions, emit

if TYPE_CHECKING:
    from fedadmin.local_federation import ProcessRecord

READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class PocStarted:
    """The processes `poc start` left running."""

    workspace: Path
    admin_kit: Path
    processes: list[ProcessRecord]
    command: ClassVar[str] = "poc start"

    def to_json(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace),
            "admin_kit": str(self.admin_kit),
            "processes": [{"name": p.name, "pid": p.pid, "log": p.log, "console": p.console} for p in self.processes],
        }

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table()
        for name in ("participant", "pid", "log"):
            table.add_column(name)
        for p in self.processes:
            table.add_row(p.name, str(p.pid), p.log)
        return Group(
            f"POC federation running from {self.workspace}:",
            table,
            f"Every site is connected. Operate it with: export FEDADMIN_KIT={self.admin_kit}",
            f"Stop it with: fedadmin poc stop --workspace {self.workspace}",
        )


@click.command("start")
@click.option(
    "--workspace",
    "-w",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The workspace `poc prepare` made.",
)
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=READY_TIMEOUT,
    show_default=True,
    help="Seconds to wait until every site is connected.",
)
@click.pass_obj
def start(options: ConsoleOptions, workspace: Path, ready_timeout: float) -> None:
    """Start the server and every site in the background; return once all sites are connected."""
    from fedadmin.session import poc_start

    running = poc_start(workspace, ready_timeout)
    emit(options, PocStarted(running.workspace, running.admin_kit, list(running.processes)))

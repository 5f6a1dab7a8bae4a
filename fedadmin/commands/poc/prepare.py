"""`fedadmin poc prepare`: a CA and startup kits for a local proof-of-concept federation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click

from fedadmin.commands import ConsoleOptions, emit

_PORT = click.IntRange(1, 65535)


@dataclass(frozen=True)
class PocPrepared:
    """The kits `poc prepare` wrote."""

    workspace: Path
    project: str
    host: str
    fl_port: int
    admin_port: int
    participants: list[str]
    command: ClassVar[str] = "poc prepare"

    def to_json(self) -> dict[str, Any]:
        """The JSON fields besides command and ok."""
        return {
            "workspace": str(self.workspace),
            "project": self.project,
            "server": {"host": self.host, "fl_port": self.fl_port, "admin_port": self.admin_port},
            "participants": self.participants,
        }

    def __rich__(self) -> Any:
        """A table of the kits and a note on the CA."""
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"Startup kits for project {self.project!r}", title_justify="left")
        table.add_column("participant")
        table.add_column("role")
        table.add_column("kit")
        for name in self.participants:
            role = "server" if name == "server" else "admin" if name == "admin" else "client"
            table.add_row(name, role, str(self.workspace / name / "startup"))
        return Group(
            table,
            f"Server at {self.host}, FL port {self.fl_port}, admin port {self.admin_port}.",
            f"The CA key is in {self.workspace / 'ca'}: keep it private; it is in no kit.",
        )


@click.command("prepare")
@click.option(
    "--workspace",
    "-w",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to create the CA and one startup kit per participant in.",
)
@click.option("--clients", "-n", required=True, type=click.IntRange(min=1), help="Number of sites (site-1..site-N).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the sites use to reach the server.")
@click.option(
    "--fl-port",
    default=None,
    type=_PORT,
    help="Server port for sites.  [default: a port free now, shown in the output]",
)
@click.option(
    "--admin-port",
    default=None,
    type=_PORT,
    help="Server port for operators.  [default: a port free now, shown in the output]",
)
@click.option("--project", default="poc", show_default=True, help="Project name, written into every certificate.")
@click.option("--force", is_flag=True, help="Replace the CA and startup kits already in the workspace.")
@click.pass_obj
def prepare(
    options: ConsoleOptions,
    workspace: Path,
    clients: int,
    host: str,
    fl_port: int | None,
    admin_port: int | None,
    project: str,
    force: bool,
) -> None:
    """Issue a CA and startup kits for server, site-1..site-N and admin.

    Without --fl-port and --admin-port, two ports free on this machine now are chosen (a second POC beside a
    running one gets ports of its own; the server refuses a port in use).
    """
    from fedadmin.errors import UsageError
    from fedadmin.session import poc_prepare

    try:
        kits = poc_prepare(
            workspace, clients, host=host, fl_port=fl_port, admin_port=admin_port, project=project, force=force
        )
    except UsageError as e:
        raise (click.BadParameter(str(e), param_hint=f"'{e.param}'") if e.param else click.UsageError(str(e))) from None
    emit(
        options,
        PocPrepared(kits.workspace, kits.project, kits.host, kits.fl_port, kits.admin_port, list(kits.participants)),
    )

"""`fedadmin provision`: a CA and one startup kit per participant named in a project file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from fedadmin.commands import ConsoleOptions, emit

if TYPE_CHECKING:
    from fedcommon.provision import Provisioned


@dataclass(frozen=True)
class ProjectProvisioned:
    """What a provision run left on disk, participant by participant."""

    result: Provisioned
    command: ClassVar[str] = "provision"

    def to_json(self) -> dict[str, Any]:
        """The JSON fields besides command and ok."""
        r = self.result
        return {
            "out": str(r.out),
            "project": r.project,
            "server": {"name": r.server_name, "host": r.host, "fl_port": r.fl_port, "admin_port": r.admin_port},
            "ca": {"folder": str(r.ca_dir), "state": str(r.state_file)},
            "crl": [str(path) for path in r.crl_files],
            "revoked_serials": [f"{serial:x}" for serial in r.revoked_serials],
            "participants": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "org": p.org,
                    "role": p.role,
                    "status": p.status,
                    "serial": f"{p.serial:x}",
                    "expires": p.not_after.isoformat(),
                    "kit": str(p.kit),
                    "listed": p.listed,
                }
                for p in r.participants
            ],
        }

    def __rich__(self) -> Any:
        """A table of the participants, then where the CA key and the CRL are."""
        from rich.console import Group
        from rich.table import Table

        r = self.result
        table = Table(title=f"Startup kits for project {r.project!r} in {r.out}", title_justify="left")
        for column in ("participant", "kind", "org", "role", "status", "expires", "kit"):
            table.add_column(column, overflow="fold")
        for p in r.participants:
            status = p.status if p.listed else f"{p.status} (not in project file)"
            kit = p.kit.relative_to(r.out)
            table.add_row(p.name, p.kind, p.org, p.role, status, f"{p.not_after:%Y-%m-%d}", str(kit))
        server_crl, ca_crl = r.crl_files
        lines: list[Any] = [
            table,
            f"Server at {r.host}, FL port {r.fl_port}, admin port {r.admin_port}. "
            "Give each participant only its own kit folder.",
            f"The CA key is in {r.ca_dir}: keep it private; it is in no kit.",
            f"CRL ({len(r.revoked_serials)} revoked): {server_crl} (copy in {ca_crl}). The running server "
            "re-reads it, no restart needed; if the server runs from a copy of its kit, copy crl.pem there.",
        ]
        unlisted = [p.name for p in r.participants if not p.listed and p.status != "revoked"]
        if unlisted:
            lines.append(
                f"Not in the project file but still valid: {', '.join(unlisted)}; --revoke them to shut them out."
            )
        return Group(*lines)


@click.command("provision")
@click.argument("project_file", metavar="PROJECT.yml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the CA and the kits.  [default: workspace/<project>]",
)
@click.option("--revoke", multiple=True, metavar="NAME", help="Revoke NAME's certificate (repeatable).")
@click.option(
    "--reissue", multiple=True, metavar="NAME", help="New key and certificate for NAME, revoking the old (repeatable)."
)
@click.pass_obj
def provision(
    options: ConsoleOptions, project_file: Path, out: Path | None, revoke: tuple[str, ...], reissue: tuple[str, ...]
) -> None:
    """Issue a CA and a startup kit per participant of PROJECT.yml; on re-runs add the new ones.

    Kits already issued are kept as they are; --reissue and --revoke change the named ones only.
    """
    from fedcommon import provision as provisioning  # cryptography and YAML load only for this command

    project = provisioning.load_project(project_file)
    out = out if out is not None else Path("workspace") / project.name
    emit(options, ProjectProvisioned(provisioning.provision(project, out.resolve(), revoke, reissue)))

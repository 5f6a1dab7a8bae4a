"""`fedadmin validate`: the cross-site validation matrix, one site's row or one cell; `--run` starts validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import click

from fedadmin.commands import ConsoleOptions, check_targets, emit, run_remote
from fedadmin.replies import RepliesResult, ServerAnswer
from fedcommon.commands import TARGET_RE
from fedcommon.outcome import CommandOutcome


def primary_metric(results: dict[str, dict[str, dict[str, Any]]]) -> str | None:
    """The metric the matrix shows: the one that ranks models (fedcommon.metrics) among all cells' metrics."""
    from fedcommon.metrics import primary_metric as ranking_metric

    keys: dict[str, None] = {}
    for row in results.values():
        for metrics in row.values():
            keys.update(dict.fromkeys(metrics))
    return ranking_metric(keys) if keys else None


@dataclass(frozen=True)
class ValidationResult(ServerAnswer):
    """The server's answer to `validate`: its matrix (rows limited to site when given) or why it has none."""

    outcome: CommandOutcome
    site: str | None = None
    command: ClassVar[str] = "validate"

    @property
    def data(self) -> dict[str, Any]:
        """The server's data, with only the asked site's row when a site was named."""
        data = self.server_data
        if self.site is not None:
            data["validating_sites"] = [s for s in data.get("validating_sites") or [] if s == self.site]
            data["results"] = {s: row for s, row in (data.get("results") or {}).items() if s == self.site}
        return data

    def to_json(self) -> dict[str, Any]:
        """The server's data at top level; on failure the error and the replies, like the other commands."""
        if not self.ok:
            return self.failure_json()
        return self.data

    def __rich__(self) -> Any:
        from fedadmin import render

        if not self.ok:
            return render.failure_line(self.command, self.error)
        data = self.data
        if data.get("cell"):
            return render.validation_cell_view(data.get("run_number"), data["cell"])
        return render.validation_view(data, primary_metric(data.get("results") or {}))


@click.command("validate")
@click.argument("names", nargs=-1, metavar="[SITE [OWNER] | TARGET...]")
@click.option(
    "--run",
    "-r",
    "run_number",
    type=click.IntRange(min=1),
    default=None,
    help="The run to show or validate (as in logs and metrics).  [default: the server's current run]",
)
@click.option(
    "--start",
    "start",
    is_flag=True,
    help="Start cross-site validation at the TARGETs (client or site names; default: client).",
)
@click.pass_context
def validate(ctx: click.Context, names: tuple[str, ...], run_number: int | None, start: bool) -> None:
    """Show the cross-site validation matrix: each site's metrics on each model (default: current run).

    Rows are the validating sites, columns the models' owners (the sites that shared theirs, then
    server). A cell shows accuracy if measured, else a loss, else the first metric; — means not
    validated yet. SITE shows that site's row; SITE OWNER one cell with all its metrics.

    With --start, start validation of a run already trained at the TARGETs (default: client) instead.

    After `--start`, follow with `fedadmin validate` to see the matrix fill.
    """
    options: ConsoleOptions = ctx.obj
    param = next(p for p in ctx.command.params if p.name == "names")
    args: dict[str, Any] = {} if run_number is None else {"run_number": run_number}
    if start:
        targets = check_targets(ctx, param, names) or ("client",)
        emit(options, RepliesResult(run_remote(options, "run-validation", targets, args)))
        return
    if len(names) > 2:
        raise click.UsageError(
            f"validate takes at most SITE and OWNER, got {len(names)} names; to start validation at sites use --start",
            ctx=ctx,
        )
    for name in names:
        if not TARGET_RE.fullmatch(name):
            raise click.BadParameter(f"{name!r} is not a site name", ctx=ctx, param=param)
    site = names[0] if names else None
    if site is not None:
        args["site"] = site
    if len(names) == 2:
        args["owner"] = names[1]
    emit(options, ValidationResult(run_remote(options, "validate", ["server"], args), site))

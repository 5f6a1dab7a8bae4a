"""`fedadmin status`: the run, its rounds and every site's state; `--watch` follows training live."""

from __future__ import annotations

from typing import Any

import click

from fedadmin.commands import ConsoleOptions, emit, open_session, run_remote, targets_argument
from fedadmin.completion import remember_sites
from fedadmin.replies import RepliesResult


class StatusResult(RepliesResult):
    """Status replies: the server's run and rounds, then one row per site."""

    def __rich__(self) -> Any:
        from fedadmin import render

        return render.status_view(self.outcome)


@click.command("status")
@targets_argument(required=False)
@click.option("--watch", "-w", is_flag=True, help="Refresh about once a second until Ctrl-C.")
@click.pass_obj
def status(options: ConsoleOptions, targets: tuple[str, ...], watch: bool) -> None:
    """Show the server's run and each site's status and training progress (default target: all)."""
    targets = targets or ("all",)
    if not watch:
        outcome = run_remote(options, "status", targets)
        server = outcome.reply("server")
        if server is not None and server.ok:  # the server's reply names every connected site: the whole federation
            connected = server.data.get("connected_sites")
            sites = [*(connected if isinstance(connected, list) else []), *(r.target for r in outcome.replies)]
            remember_sites(options.kit, [s for s in sites if isinstance(s, str) and s != "server"])
        emit(options, StatusResult(outcome))
        return
    if options.json:
        raise click.UsageError("--watch draws a live view; under --json run `status` repeatedly, or `wait`")
    from fedadmin.watch import display_mode, follow

    with open_session(options) as session:
        try:
            follow(lambda: session.execute("status", targets), lambda _: False, mode=display_mode(False))
        except KeyboardInterrupt:
            pass

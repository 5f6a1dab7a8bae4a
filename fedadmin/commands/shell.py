"""`fedadmin shell TARGET CMD [ARGS...]`: a read-only command (ls, cat, head, tail, grep, pwd) at one participant."""

from __future__ import annotations

from typing import Any

import click

from fedadmin.commands import ConsoleOptions, complete_targets, emit, outcome_of
from fedadmin.replies import RepliesResult
from fedadmin.session import SHELL_COMMANDS as ALLOWED
from fedcommon.commands import GROUP_TARGETS


class ShellResult(RepliesResult):
    """The command's output at the target, with its exit code."""

    def __rich__(self) -> Any:
        from fedadmin import render

        return render.shell_view(self.outcome)


@click.command("shell", context_settings={"ignore_unknown_options": True})
@click.argument("target", shell_complete=complete_targets)
@click.argument("argv", metavar="CMD [ARGS]...", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def shell(options: ConsoleOptions, target: str, argv: tuple[str, ...]) -> None:
    """Run CMD (ls, cat, head, tail, grep or pwd) in TARGET's workspace and show its output."""
    if argv[0] not in ALLOWED:
        raise click.UsageError(f"{argv[0]!r} is not allowed; shell runs only {', '.join(ALLOWED)}")
    if target in GROUP_TARGETS and target != "server":
        raise click.UsageError(f"shell runs at one participant: name a site or server, not {target!r}")
    emit(options, ShellResult(outcome_of(options, lambda s: s.shell(target, list(argv))).outcome))

"""What every fedadmin command shares: the global options, failures as exit codes, and rendering.

A command computes a result object with a `command` name, `to_json()` and Rich's `__rich__()`, and
hands it to `emit`; groups use `ConsoleGroup` so any exception leaves as a one-line error (exit 1),
with the traceback only under --debug.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import click

_PATH_KEY = "fedadmin.command_path"


@dataclass(frozen=True)
class ConsoleOptions:
    """The global options, stored on click's ctx.obj for every command."""

    kit: Path | None = None
    json: bool = False
    yes: bool = False
    timeout: float = 30.0
    debug: bool = False


class Result(Protocol):
    """What a command computes: rendered as one JSON object or by Rich, never printed by the command."""

    command: str

    def to_json(self) -> dict[str, Any]: ...

    def __rich__(self) -> Any: ...


def emit(options: ConsoleOptions, result: Result) -> None:
    """Print result as one JSON object (with command and ok=true) under --json, else through Rich."""
    if options.json:
        click.echo(json.dumps({"command": result.command, "ok": True, **result.to_json()}))
        return
    from rich.console import Console  # only the human output pays for importing Rich

    Console().print(result)


class CommandFailed(click.ClickException):
    """A command failed (exit 1); shown as "Error: ..." on stderr, or as a JSON object under --json."""

    exit_code = 1

    def __init__(self, command: str, message: str, as_json: bool) -> None:
        super().__init__(message)
        self.command = command
        self.as_json = as_json

    def show(self, file: Any = None) -> None:
        """Print the failure for the operator."""
        if self.as_json:
            click.echo(json.dumps({"command": self.command, "ok": False, "error": self.message}), file=file)
        else:
            click.echo(f"Error: {self.message}", err=file is None, file=file)


class ConsoleGroup(click.Group):
    """A command group that records which command runs and, at the root, maps exceptions to exit 1."""

    group_class = type

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            ctx.meta.setdefault(_PATH_KEY, []).append(command.name)
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is not None:
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            options = ctx.find_object(ConsoleOptions) or ConsoleOptions()
            if options.debug:
                raise
            command = " ".join(ctx.meta.get(_PATH_KEY, []))
            raise CommandFailed(command, str(exc) or type(exc).__name__, options.json) from exc

"""`fedadmin logs TARGET`: a participant's log (the agent's or server's, or a run's worker log at a site)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from fedadmin.commands import ConsoleOptions, complete_targets, emit, open_session
from fedcommon.commands import GROUP_TARGETS, TARGET_RE
from fedcommon.logs import LEVELS, MAX_LINES
from fedcommon.outcome import CommandOutcome, TargetReply

if TYPE_CHECKING:
    from fedadmin.session import Session

FOLLOW_INTERVAL_S = 1.0
_LEVEL_STYLES = {" CRITICAL ": "bold red", " ERROR ": "red", " WARNING ": "yellow", " DEBUG ": "dim"}


def _level_style(line: str) -> str:
    head = line[:40]
    return next((style for key, style in _LEVEL_STYLES.items() if key in head), "")


def _log_lines(lines: list[str]) -> Any:
    """The lines, each styled by its level; they come escaped (fedadmin.render.shown) from the result."""
    from rich.console import Group
    from rich.text import Text

    return Group(*(Text(line, style=_level_style(line)) for line in lines))


@dataclass(frozen=True)
class LogsResult:
    """One participant's log lines, or why they could not be read."""

    outcome: CommandOutcome
    target: str
    level: str | None

    command = "logs"

    @property
    def reply(self) -> TargetReply:
        return self.outcome.reply(self.target) or TargetReply(self.target, False, error="no reply for this target")

    @property
    def ok(self) -> bool:
        return not self.outcome.error and self.reply.ok and not self.reply.data.get("missing")

    def to_json(self) -> dict[str, Any]:
        r = self.reply
        if self.outcome.error or not r.ok:
            return {"target": self.target, "error": self.outcome.error or r.error or "failed"}
        return {
            "target": self.target,
            "file": r.data.get("file"),
            "lines": r.data.get("lines") or [],
            "truncated": bool(r.data.get("truncated")),
            "missing": bool(r.data.get("missing")),
            "cursor": r.data.get("cursor"),
        }

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        r = self.reply
        if self.outcome.error or not r.ok:
            return Text(f"logs {self.target}: {self.outcome.error or r.error or 'failed'}", style="bold red")
        name = r.data.get("file")
        if r.data.get("missing"):
            return Text(f"{self.target} has no {name} (yet)", style="bold red")
        lines = r.data.get("lines") or []
        what = f"last {len(lines)} line{'s' if len(lines) != 1 else ''}" if lines else "no lines"
        what += f" at {self.level} or above" if self.level else ""
        header = Text(
            f"{self.target}: {name}, {what}" + (" (older lines left out)" if r.data.get("truncated") else ""),
            style="dim",
        )
        return Group(header, _log_lines(lines))


def _check_target(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in GROUP_TARGETS and value != "server":
        raise click.BadParameter(f"logs reads one participant's log: name a site or server, not {value!r}")
    if not TARGET_RE.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a participant's name (logs takes no paths)")
    return value


@click.command("logs")
@click.argument("target", callback=_check_target, shell_complete=complete_targets)
@click.option(
    "--run",
    "run_number",
    type=click.IntRange(min=1),
    help="A site's worker log of run N (default: the site agent's or server's own log).",
)
@click.option(
    "--lines",
    "-n",
    type=click.IntRange(1, MAX_LINES),
    default=50,
    show_default=True,
    help="How many of the last lines to show.",
)
@click.option("--follow", "-f", is_flag=True, help="Keep showing new lines until Ctrl-C.")
@click.option(
    "--level",
    type=click.Choice(LEVELS, case_sensitive=False),
    help="Only records at this level or above (a traceback goes with its record).",
)
@click.pass_obj
def logs(
    options: ConsoleOptions, target: str, run_number: int | None, lines: int, follow: bool, level: str | None
) -> None:
    """Show the last lines of TARGET's log (server or a site); --follow streams new lines until Ctrl-C."""
    with open_session(options) as session:
        read = partial(_read, session, target, run_number, lines, level)
        result = read()
        if not follow or not result.ok and not result.reply.data.get("missing"):
            emit(options, result, whole_lines=True)
            return
        _follow(options, read, result)


def _read(
    session: Session, target: str, run_number: int | None, lines: int, level: str | None, cursor: Any = None
) -> LogsResult:
    """Session.logs as the console shows it, a target's failure included."""
    from fedadmin.errors import CommandFailed

    try:
        got = session.logs(target, run_number, lines, level, cursor)
    except CommandFailed as failed:
        got = failed.result
    return LogsResult(got.outcome, target, level)


def _follow(options: ConsoleOptions, read: Callable[..., LogsResult], first: LogsResult) -> None:
    """Print the first lines, then what each poll brings, about once a second, until Ctrl-C."""
    from fedadmin.errors import NotConnected, RemoteError

    printer = _JsonLines(first.target) if options.json else _RichLines(first.target)
    printer.show(first)
    cursor = first.reply.data.get("cursor")
    trouble = ""
    try:
        while True:
            time.sleep(FOLLOW_INTERVAL_S)
            try:
                result = read(cursor=cursor)
            except (NotConnected, RemoteError) as e:  # the server went away: keep trying, say so once
                result, problem = None, str(e)
            else:
                problem = "" if result.ok or result.reply.data.get("missing") else result.to_json()["error"]
            if problem:
                if problem != trouble:
                    printer.note(f"{first.target}: {problem} (still following; Ctrl-C stops)")
                trouble = problem
                continue
            if trouble:
                printer.note(f"{first.target}: back")
                trouble = ""
            assert result is not None
            cursor = result.reply.data.get("cursor") or cursor
            if result.reply.data.get("lines"):
                printer.show(result)
    except KeyboardInterrupt:
        pass


class _RichLines:
    def __init__(self, target: str):
        from fedadmin import render

        self.out = render.terminal(soft_wrap=True, highlight=False)
        self.err = render.terminal(stderr=True, highlight=False)
        self.shown = render.shown
        self.target = target

    def show(self, result: LogsResult) -> None:
        result = self.shown(result)
        if result.reply.data.get("missing"):
            self.note(f"{self.target} has no {result.reply.data.get('file')} yet; waiting for it")
            return
        self.out.print(_log_lines(result.reply.data.get("lines") or []))

    def note(self, text: str) -> None:
        self.err.print(self.shown(text), style="yellow")


class _JsonLines:
    """Under --json, one object per poll that brought lines (JSON Lines)."""

    def __init__(self, target: str):
        self.target = target

    def show(self, result: LogsResult) -> None:
        print(json.dumps({"command": "logs", "ok": True, **result.to_json()}), flush=True)

    def note(self, text: str) -> None:
        print(json.dumps({"command": "logs", "ok": False, "target": self.target, "error": text}), flush=True)
        sys.stdout.flush()

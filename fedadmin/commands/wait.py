"""`fedadmin wait`: follow the current run until it completes (exit 0), fails or times out (exit 1)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import click

from fedadmin.commands import ConsoleOptions, connect, emit
from fedcommon.outcome import CommandOutcome


@dataclass(frozen=True)
class WaitResult:
    """How the wait ended, with the last status replies."""

    outcome: CommandOutcome
    ok: bool
    message: str
    command: str = "wait"

    def to_json(self) -> dict[str, Any]:
        from fedadmin.run_state import awaited, run_number, run_status

        return {
            "result": self.message,
            "run_number": run_number(self.outcome),
            "run_status": run_status(self.outcome),
            "awaiting": awaited(self.outcome),
            "replies": [r.to_json() for r in self.outcome.replies],
        }

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(self.message, style="bold green" if self.ok else "bold red")


@click.command("wait")
@click.option(
    "--timeout",
    "limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Give up after S seconds (exit 1).  [default: no limit]",
)
@click.pass_obj
def wait(options: ConsoleOptions, limit: float | None) -> None:
    """Show live progress until the server's run completes and its sites are done (exit 0), is aborted or a site
    fails (exit 1); the view says what the run waits for (a server that has not started it, too few sites)."""
    from fedadmin.run_state import awaited, run_status
    from fedadmin.watch import display_mode, follow, run_end

    deadline = None if limit is None else time.monotonic() + limit
    with connect(options) as conn:
        outcome, ended = follow(
            lambda: conn.execute("status", ["all"]),
            lambda o: run_end(o) is not None,
            mode=display_mode(options.json),
            deadline=deadline,
            hint="Ctrl-C stops waiting; the run goes on",
        )
    end = run_end(outcome)
    if ended and end is not None:
        emit(options, WaitResult(outcome, end.ok, end.message))
    else:
        message = f"gave up after {limit:g}s: the run is {run_status(outcome) or 'unknown'}"
        waiting = awaited(outcome)
        emit(options, WaitResult(outcome, False, f"{message}; {waiting}" if waiting else message))

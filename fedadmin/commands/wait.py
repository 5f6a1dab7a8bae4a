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
@click.option(
    "--job", "job_id", type=click.IntRange(min=1), default=None, help="Follow job ID instead of the current run."
)
@click.pass_obj
def wait(options: ConsoleOptions, limit: float | None, job_id: int | None) -> None:
    """Show live progress until the server's run completes and its sites are done (exit 0), is aborted or a site
    fails (exit 1); the view says what the run waits for (a server that has not started it, too few sites).
    With --job, wait until that job ends: exit 0 when it completed, 1 when it failed or was aborted."""
    if job_id is not None:
        return _wait_job(options, job_id, limit)
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


def _wait_job(options: ConsoleOptions, job_id: int, limit: float | None) -> None:
    from fedadmin.job_results import JobAnswer, state_text

    deadline = None if limit is None else time.monotonic() + limit
    shown = ""
    with connect(options) as conn:
        while True:
            answer = JobAnswer(conn.execute("job-show", ["server"], {"job_id": job_id}), "wait")
            if not answer.ok:
                emit(options, answer)
            data = answer.server_data
            line = f"job {job_id}: {state_text(data)}"
            if line != shown and not options.json:
                click.echo(line, err=True)
                shown = line
            if data.get("state") in ("COMPLETED", "FAILED", "ABORTED"):
                break
            if deadline is not None and time.monotonic() >= deadline:
                emit(options, _JobWait(False, f"gave up after {limit:g}s: {line}", data))
            time.sleep(POLL_S)
    emit(options, _JobWait(data.get("state") == "COMPLETED", line, data))


POLL_S = 1.0


@dataclass(frozen=True)
class _JobWait:
    ok: bool
    message: str
    job: dict[str, Any]
    command: str = "wait"

    def to_json(self) -> dict[str, Any]:
        return {"result": self.message, "job": self.job}

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(self.message, style="bold green" if self.ok else "bold red")

"""`fedadmin wait`: follow the current run until it completes (exit 0), fails or times out (exit 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from fedadmin.commands import ConsoleOptions, emit, open_session
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
    from fedadmin.errors import CommandTimeout
    from fedadmin.results import Status
    from fedadmin.watch import display_mode, follow

    mode = display_mode(options.json)

    def shown(poll, stop, deadline):  # the live view on a terminal, changed lines otherwise, nothing under --json
        return follow(poll, stop, mode=mode, deadline=deadline, hint="Ctrl-C stops waiting; the run goes on")

    with open_session(options) as session:
        try:
            end = session.wait(limit, follow=shown)
        except CommandTimeout as gave_up:
            if not isinstance(gave_up.last, Status):
                raise
            emit(options, WaitResult(gave_up.last.outcome, False, str(gave_up)))
            return
    emit(options, WaitResult(end.status.outcome, end.ok, end.message))


def _wait_job(options: ConsoleOptions, job_id: int, limit: float | None) -> None:
    from fedadmin.errors import CommandFailed, CommandTimeout
    from fedadmin.job_results import JobAnswer, state_text
    from fedadmin.results import Job

    def show(job: Job) -> None:
        if not options.json:
            from fedcommon.escape import for_terminal  # the reason may quote a site's or a worker's own words

            click.echo(for_terminal(f"job {job_id}: {state_text(job.data)}"), err=True)

    with open_session(options) as session:
        try:
            job = session.wait_job(job_id, limit, interval=POLL_S, on_change=show)
        except CommandFailed as failed:
            emit(options, JobAnswer(failed.outcome, "wait"))
            return
        except CommandTimeout as gave_up:
            if not isinstance(gave_up.last, Job):
                raise
            emit(options, _JobWait(False, str(gave_up), gave_up.last.data))
            return
    emit(options, _JobWait(job.completed, f"job {job_id}: {state_text(job.data)}", job.data))


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

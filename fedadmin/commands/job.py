"""`fedadmin job show|abort|clone|delete|download ID`: act on one job (Session.job_show, job_abort, ...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fedadmin.commands import ConsoleGroup, ConsoleOptions, confirm, emit, open_session, outcome_of

if TYPE_CHECKING:
    from fedadmin.session import Session


@click.group("job", cls=ConsoleGroup)
def job() -> None:
    """Act on one job: show, abort, clone, delete, download (see `jobs` for the ids)."""


def _emit(options: ConsoleOptions, command: str, call: Callable[[Session], Any]) -> None:
    from fedadmin.job_results import JobAnswer
    from fedcommon.outcome import CommandOutcome

    result = outcome_of(options, call)
    emit(options, JobAnswer(result if isinstance(result, CommandOutcome) else result.outcome, f"job {command}"))


@job.command("show")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def show(options: ConsoleOptions, job_id: int) -> None:
    """A job in detail: its state, each site's part, errors, notes and a metrics summary."""
    _emit(options, "show", lambda s: s.job_show(job_id))


@job.command("abort")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def abort(options: ConsoleOptions, job_id: int) -> None:
    """Abort a queued or running job (its sites stop training)."""
    confirm(options, f"Abort job {job_id}?")
    _emit(options, "abort", lambda s: s.job_abort(job_id))


@job.command("clone")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def clone(options: ConsoleOptions, job_id: int) -> None:
    """Submit a job's archive again as a new job, on the same sites and GPUs."""
    _emit(options, "clone", lambda s: s.job_clone(job_id))


@job.command("delete")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def delete(options: ConsoleOptions, job_id: int) -> None:
    """Delete an ended (or queued) job, and its run at the server and its sites."""
    confirm(options, f"Delete job {job_id} and its run everywhere?")
    _emit(options, "delete", lambda s: s.job_delete(job_id))


@job.command("download")
@click.argument("job_id", type=click.IntRange(min=1))
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The folder to write the job's results into (job-ID/ inside it).",
)
@click.pass_obj
def download(options: ConsoleOptions, job_id: int, out: Path) -> None:
    """Fetch a job's final and best global models, summary, cross-site results and each site's worker log tail."""
    from fedadmin.errors import CommandFailed
    from fedadmin.job_results import JobAnswer

    with open_session(options) as session:
        try:
            got = session.job_download(job_id, out)
        except CommandFailed as failed:
            emit(options, JobAnswer(failed.outcome, "job download"))
            return
    emit(options, JobAnswer(got.outcome, "job download", {"download": str(got.folder)}))

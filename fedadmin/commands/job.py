"""`fedadmin job show|abort|clone|delete|download ID`: act on one job (the server's job-* commands)."""

from __future__ import annotations

from pathlib import Path

import click

from fedadmin.commands import ConsoleGroup, ConsoleOptions, confirm, connect, emit, run_remote


@click.group("job", cls=ConsoleGroup)
def job() -> None:
    """Act on one job: show, abort, clone, delete, download (see `jobs` for the ids)."""


def _emit(options: ConsoleOptions, command: str, job_id: int) -> None:
    from fedadmin.job_results import JobAnswer

    emit(options, JobAnswer(run_remote(options, f"job-{command}", ["server"], {"job_id": job_id}), f"job {command}"))


@job.command("show")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def show(options: ConsoleOptions, job_id: int) -> None:
    """A job in detail: its state, each site's part, errors, notes and a metrics summary."""
    _emit(options, "show", job_id)


@job.command("abort")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def abort(options: ConsoleOptions, job_id: int) -> None:
    """Abort a queued or running job (its sites stop training)."""
    confirm(options, f"Abort job {job_id}?")
    _emit(options, "abort", job_id)


@job.command("clone")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def clone(options: ConsoleOptions, job_id: int) -> None:
    """Submit a job's archive again as a new job, on the same sites and GPUs."""
    _emit(options, "clone", job_id)


@job.command("delete")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def delete(options: ConsoleOptions, job_id: int) -> None:
    """Delete an ended (or queued) job, and its run at the server and its sites."""
    confirm(options, f"Delete job {job_id} and its run everywhere?")
    _emit(options, "delete", job_id)


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
    from fedadmin.job_results import JobAnswer

    with connect(options) as conn:
        outcome = conn.execute("job-download", ["server"], {"job_id": job_id})
        answer = JobAnswer(outcome, "job download")
        if not answer.ok:
            emit(options, answer)
        data = answer.server_data
        folder = out / f"job-{job_id}"
        conn.download(str(data["download_id"]), folder)
    emit(options, JobAnswer(outcome, "job download", {"download": str(folder)}))

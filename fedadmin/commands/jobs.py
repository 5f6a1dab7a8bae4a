"""`fedadmin jobs`: every job, its state (and why it waits), sites and times."""

from __future__ import annotations

import click

from fedadmin.commands import ConsoleOptions, emit, outcome_of


@click.command("jobs")
@click.pass_obj
def jobs(options: ConsoleOptions) -> None:
    """List the jobs: id, name, submitter, state (WAITING says why), sites, submit/start/end times."""
    from fedadmin.job_results import JobAnswer

    emit(options, JobAnswer(outcome_of(options, lambda s: s.jobs()).outcome, "jobs"))

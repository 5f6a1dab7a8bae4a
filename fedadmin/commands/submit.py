"""`fedadmin submit MMAR`: check an MMAR, upload it once, and queue it as a job; prints the job id."""

from __future__ import annotations

from pathlib import Path

import click

from fedadmin.commands import ConsoleOptions, check_targets, emit, outcome_of


@click.command("submit")
@click.argument("mmar", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--sites",
    "-s",
    multiple=True,
    callback=check_targets,
    help="A site the job runs on (repeat). [default: every site connected now]",
)
@click.option(
    "--gpus", type=click.IntRange(0, 64), default=0, show_default=True, help="GPUs the job asks of each site."
)
@click.option("--name", help="A name for the job.  [default: the MMAR's name]")
@click.pass_obj
def submit(options: ConsoleOptions, mmar: Path, sites: tuple[str, ...], gpus: int, name: str | None) -> None:
    """Queue MMAR (a folder or a .zip) as a job: it starts when its sites are connected and free (see `jobs`)."""
    from fedadmin.job_results import JobAnswer
    from fedadmin.upload import check_mmar
    from fedcommon.commands import command as declared

    args = {"gpus": gpus, "name": name or mmar.resolve().name}
    if sites:
        args["sites"] = list(sites)
    declared("submit").check_args({**args, "blob_id": "0" * 64})  # a usage error before anything is uploaded
    check_mmar(mmar)  # the console's own usage error, naming the MMAR argument
    job = outcome_of(options, lambda s: s.submit(mmar, sites, gpus, args["name"], show_progress=not options.json))
    emit(options, JobAnswer(job.outcome, "submit", {"mmar": str(mmar)}))

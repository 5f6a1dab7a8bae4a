"""The server's side of the job commands: submit, jobs, job show|abort|clone|delete|download.

Whoever may view sees every job; acting on a job (abort, clone, delete, download its artefacts) needs to be its
submitter or to hold the operate right everywhere (project_admin by default).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from fedcommon.admin_defs import AdminIdentity
from fedcommon.archive_signature import SignatureError
from fedcommon.commands import Right
from fedcommon.run_folder import RunFolder
from fedserver.authorization import archive_needs
from fedserver.downloads import DownloadError
from fedserver.errors import AdminError
from fedserver.jobs import Job, JobError, JobState

Args = dict[str, Any]
LOG_TAIL_LINES = 200


def _scheduler(fed: Any):
    return fed.jobs


def job_view(job: Job, fed: Any) -> dict[str, Any]:
    """What `jobs` shows of one job."""
    return {
        "job_id": job.job_id,
        "name": job.name,
        "submitter": job.submitter,
        "state": job.state,
        "reason": job.reason,
        "sites": list(job.sites),
        "gpus": job.gpus,
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
    }


def may_act(fed: Any, caller: AdminIdentity, job: Job, act: str) -> None:
    """Refuse (AdminError, naming the rule) unless `caller` submitted `job` or may operate everywhere."""
    if caller.name == job.submitter or fed.hub.policy.scope(caller.role, Right.OPERATE) == "any":
        return
    raise AdminError(
        f"job {job.job_id} was submitted by {job.submitter!r}: {caller.role} {caller.name!r} may {act} only "
        f"their own jobs (rule {caller.role}.operate = {fed.hub.policy.scope(caller.role, Right.OPERATE)})"
    )


def _get(fed: Any, args: Args) -> Job:
    try:
        return _scheduler(fed).store.get(args["job_id"])
    except JobError as e:
        raise AdminError(str(e)) from None


# ---- acts ---------------------------------------------------------------------------------------------


def _valid_mmar(archive: Path) -> None:
    """Refuse (AdminError, every problem named) an archive that is not a safe zip of a valid MMAR: nothing of it is
    queued, and no site is ever sent it."""
    import tempfile

    from fedcommon.mmar import MMARError, load_mmar
    from fedcommon.safe_zip import UnsafeArchiveError, extract_zip_safely

    with tempfile.TemporaryDirectory(prefix=".submit-", dir=archive.parent) as tmp:
        try:
            extract_zip_safely(archive, Path(tmp) / "mmar", check=load_mmar)
        except (UnsafeArchiveError, MMARError, zipfile.BadZipFile) as e:
            raise AdminError(f"submit refused: not a valid MMAR:\n{e}") from None


def submit(fed: Any, args: Args, gathered: Any, caller: AdminIdentity) -> dict[str, Any]:
    blob = fed.blobs.get(args["blob_id"])
    _valid_mmar(blob.path)
    sites = args.get("sites") or fed.mailbox.connected_sites()
    if not sites:
        raise AdminError("no site is connected: name the job's sites with --sites, or connect them first")
    name = args.get("name") or blob.path.stem[:100]
    try:
        fed.blobs.verify(blob.blob_id)  # its signer is still trusted, and it is the archive the signature is of
        job = _scheduler(fed).submit(caller, blob.path, blob.blob_id, name, sites, args.get("gpus", 0), blob.signature)
    except SignatureError as e:
        raise AdminError(f"submit refused: {e}") from None
    except JobError as e:
        raise AdminError(str(e)) from None
    finally:
        fed.blobs.used(blob.blob_id)
    return {**job_view(job, fed), "job_id": job.job_id}


def submit_touches(fed: Any, args: Args) -> list[str]:
    """What a submit needs the caller's rights on: the server and the job's sites."""
    return ["server", *(args.get("sites") or fed.mailbox.connected_sites())]


def jobs(fed: Any, args: Args, gathered: Any) -> dict[str, Any]:
    scheduler = _scheduler(fed)
    return {"jobs": [job_view(j, fed) for j in scheduler.store.all()], "max_jobs": scheduler.max_jobs}


def show(fed: Any, args: Args, gathered: Any) -> dict[str, Any]:
    job = _get(fed, args)
    data = {**job_view(job, fed), **{k: job.to_json()[k] for k in ("digest", "size", "clone_of", "notes", "errors")}}
    data["run_status"] = fed.run_status(job.job_id)
    data["site_states"] = _site_states(fed, job)
    try:
        data["metrics"] = _metrics_summary(fed.run_metrics(job.job_id))
    except Exception:  # not started yet, or no record: no metrics to show
        data["metrics"] = None
    return data


def _site_states(fed: Any, job: Job) -> dict[str, str]:
    """Each site's part in the job, as the server knows it without asking the sites."""
    results = fed.mailbox.site_results()
    registered = fed.run_sites(job.job_id) if job.state == JobState.RUNNING else set()
    connected = set(fed.mailbox.connected_sites())
    states = {}
    for site in job.sites:
        ended = results["training_ended"].get(site)
        if ended and ended.get("run_number") == job.job_id:
            states[site] = str(ended.get("status"))
        elif site in registered:
            states[site] = "training"
        elif site in connected:
            states[site] = "connected"
        else:
            states[site] = "not connected"
    return states


def _metrics_summary(answer: dict[str, Any]) -> dict[str, Any]:
    rounds = answer.get("rounds") or []
    last = rounds[-1] if rounds else {}
    return {
        "rounds": len(rounds),
        "last_round": last.get("round"),
        "mean": last.get("mean"),
        "final": answer.get("final"),
    }


def abort(fed: Any, args: Args, gathered: Any, caller: AdminIdentity) -> dict[str, Any]:
    job = _get(fed, args)
    may_act(fed, caller, job, "abort")
    try:
        job = _scheduler(fed).abort(job.job_id, caller)
    except JobError as e:
        raise AdminError(str(e)) from None
    return job_view(job, fed)


def clone(fed: Any, args: Args, gathered: Any, caller: AdminIdentity) -> dict[str, Any]:
    job = _get(fed, args)
    may_act(fed, caller, job, "clone")
    scheduler = _scheduler(fed)
    signature = scheduler.store.signature(job.job_id)
    try:
        # The clone runs the original's archive under its original signature: whoever clones it vouches only for
        # running it again, never for its content.
        fed.blobs.verifier.verify_file(scheduler.store.archive(job.job_id), signature)
        new = scheduler.submit(
            caller, scheduler.store.archive(job.job_id), job.digest, job.name, list(job.sites), job.gpus, signature
        )
        new = scheduler.store.update(new.job_id, clone_of=job.job_id)
    except SignatureError as e:
        raise AdminError(f"clone refused: {e}") from None
    except JobError as e:
        raise AdminError(str(e)) from None
    return {**job_view(new, fed), "clone_of": job.job_id}


def clone_needs(fed: Any, args: Args) -> list:
    """A clone brings the same code as the original: the code right, as its submit needed."""
    try:
        job = _scheduler(fed).store.get(args["job_id"])
    except JobError:
        return []
    return archive_needs(_scheduler(fed).store.archive(job.job_id))


def delete(fed: Any, args: Args, gathered: Any, caller: AdminIdentity) -> dict[str, Any]:
    job = _get(fed, args)
    may_act(fed, caller, job, "delete")
    if job.state not in JobState.ENDED and job.state not in JobState.QUEUED:
        raise AdminError(f"job {job.job_id} is {job.state}; abort it first (fedadmin job abort {job.job_id})")
    scheduler = _scheduler(fed)
    if job.state in JobState.QUEUED:
        scheduler.abort(job.job_id, caller)  # no scheduler pass may start it while it is being deleted
    sites = {}
    if fed.run_dir(job.job_id).exists():  # the server deploys a job first: its sites may hold the run only then
        outcome = fed.hub.execute(caller, "delete-run", list(job.sites), json.dumps({"run_number": job.job_id}), 0)
        sites = {r.target: "deleted" if r.ok else r.error for r in outcome.replies}
        fed.delete_run(job.job_id)
    scheduler.store.remove(job.job_id)
    return {"job_id": job.job_id, "deleted": True, "sites": sites}


def download(fed: Any, args: Args, gathered: Any, caller: AdminIdentity) -> dict[str, Any]:
    job = _get(fed, args)
    if caller.name != job.submitter and fed.hub.policy.scope(caller.role, Right.OPERATE) != "any":
        raise AdminError(
            f"job {job.job_id}'s artefacts belong to {job.submitter!r}: {caller.role} {caller.name!r} sees the job "
            "but not its artefacts (its submitter, or an admin with operate rights everywhere, may download them)"
        )
    if job.started_at is None:
        raise AdminError(f"job {job.job_id} has not run yet ({job.state}): it has nothing to download")
    logs = _site_log_tails(fed, caller, job)
    try:
        download = fed.downloads.create(caller, f"job-{job.job_id}.zip")
    except DownloadError as e:
        raise AdminError(str(e)) from None
    try:
        with zipfile.ZipFile(download.path, "w", zipfile.ZIP_DEFLATED) as z:
            folder = RunFolder.of(fed.workspace, job.job_id)
            names = []
            for path, arcname in _artefacts(folder):
                z.write(path, arcname)
                names.append(arcname)
            z.writestr("job.json", json.dumps(job.to_json(), indent=1))
            names.append("job.json")
            for site, text in logs.items():
                z.writestr(f"logs/{site}-worker.log", text)
                names.append(f"logs/{site}-worker.log")
        fed.downloads.ready(download)
    except BaseException:
        fed.downloads.discard(download)  # its place among the admin's waiting downloads is free again
        raise
    return {"job_id": job.job_id, "download_id": download.download_id, "size": download.size, "files": names}


def _artefacts(folder: RunFolder) -> list[tuple[Path, str]]:
    """The run's global models, summary and cross-site results, as (path, name in the archive)."""
    found = []
    if folder.models.is_dir():
        for path in sorted(folder.models.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                found.append((path, f"models/{path.name}"))
    if folder.summary.is_file():
        found.append((folder.summary, folder.summary.name))
    if folder.cross_site.is_dir():
        for path in sorted(folder.cross_site.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                found.append((path, f"cross_site/{path.name}"))
    return found


def _site_log_tails(fed: Any, caller: AdminIdentity, job: Job) -> dict[str, str]:
    """The last LOG_TAIL_LINES of each site's worker log for the job's run (a site that does not answer: why)."""
    tails = {}
    query = json.dumps({"run_number": job.job_id, "lines": LOG_TAIL_LINES})
    for site in job.sites:  # logs takes one target
        outcome = fed.hub.execute(caller, "logs", [site], query, 0)
        reply = outcome.replies[0] if outcome.replies else None
        if reply is not None and reply.ok and isinstance(reply.data, dict):
            tails[site] = "\n".join(str(line) for line in reply.data.get("lines", []))
        else:
            tails[site] = f"(no log: {reply.error if reply is not None else outcome.error})"
    return tails

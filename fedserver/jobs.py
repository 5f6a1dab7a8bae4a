"""Jobs: submitted MMARs waiting for, running as, or finished as a run; each persisted in <ws>/jobs/<id>/.

A job's id is the run number it runs as. Its record (job.json) is replaced atomically at every change of state, and
its archive (mmar.zip, with the signature it was submitted with) stays beside it, so a killed server finds every
queued job queued and every running one still its run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedcommon.admin_defs import AdminIdentity
from fedcommon.archive_signature import ArchiveSignature
from fedcommon.atomic import atomic_write_json
from fedcommon.run_folder import RUN_PREFIX

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
RECORD = "job.json"
ARCHIVE = "mmar.zip"
SIGNATURE = "signature.json"
# A queue longer than this is refused at submit: each queued job keeps its archive on the server's disk. One
# submitter may hold at most MAX_QUEUED_PER_SUBMITTER of those places and the queued archives MAX_QUEUED_BYTES.
MAX_QUEUED = 256
MAX_QUEUED_PER_SUBMITTER = 128
MAX_QUEUED_BYTES = 32 << 30
LAST_ID = "last_id"
MAX_NOTES = 50
MAX_RECORD_BYTES = 1 << 20


class JobState:
    """A job's states; WAITING carries its reason, FAILED and ABORTED theirs."""

    SUBMITTED = "SUBMITTED"
    WAITING = "WAITING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"
    QUEUED = (SUBMITTED, WAITING)
    LIVE = (STARTING, RUNNING)
    ENDED = (COMPLETED, FAILED, ABORTED)


class JobError(Exception):
    """A job request refused; the message names the job and why."""


@dataclass(frozen=True)
class Job:
    """One job's record, as job.json holds it."""

    job_id: int
    name: str
    submitter: str
    submitter_org: str
    submitter_role: str
    sites: tuple[str, ...]
    gpus: int
    digest: str  # sha256 of the archive
    size: int
    state: str = JobState.SUBMITTED
    reason: str = ""
    submitted_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    clone_of: int | None = None
    notes: tuple[str, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> AdminIdentity:
        """The submitter, as the commands the job sends to its sites carry it."""
        return AdminIdentity(self.submitter, self.submitter_role, self.submitter_org)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sites"] = list(self.sites)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["sites"] = tuple(values.get("sites", ()))
        values["notes"] = tuple(values.get("notes", ()))
        values["errors"] = dict(values.get("errors") or {})
        return cls(**values)


_JOB_DIR = re.compile(r"[1-9][0-9]{0,8}")  # up to fedcommon.commands.MAX_RUN_NUMBER


class JobStore:
    """The jobs of one server workspace, in memory and on disk; thread-safe."""

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.root = self.workspace / JOBS_DIR
        self._lock = threading.RLock()
        self._jobs: dict[int, Job] = {}
        self._load()

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.name.startswith(".deleting-"):  # a delete the server did not finish: finish it
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if not _JOB_DIR.fullmatch(folder.name):
                continue  # a file that is not a job's
            path = folder / RECORD
            try:
                if path.stat().st_size > MAX_RECORD_BYTES:
                    raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
                job = Job.from_json(json.loads(path.read_text()))
                if job.job_id != int(folder.name):
                    raise ValueError(f"it names job {job.job_id}")
            except FileNotFoundError:
                # Reserved by a submit that did not finish (the server stopped between the two writes): no job.
                shutil.rmtree(folder, ignore_errors=True)
                continue
            except (OSError, ValueError, TypeError) as e:
                log.error("job record %s is unreadable (%s); that job is left out", path, e)
                continue
            self._jobs[job.job_id] = job

    # ---- reading ----------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        """Job `job_id`; JobError when there is none."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobError(f"no job {job_id} (fedadmin jobs lists them)")
        return job

    def find(self, job_id: int) -> Job | None:
        """Job `job_id`, or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        """Every job, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: (j.submitted_at, j.job_id))

    def queued(self) -> list[Job]:
        """The jobs waiting to start, in the order they were submitted."""
        return [j for j in self.all() if j.state in JobState.QUEUED]

    def live(self) -> list[Job]:
        """The jobs starting or running."""
        return [j for j in self.all() if j.state in JobState.LIVE]

    def archive(self, job_id: int) -> Path:
        """Where job `job_id`'s archive is kept."""
        return self.root / str(job_id) / ARCHIVE

    def signature(self, job_id: int) -> ArchiveSignature | None:
        """The signature job `job_id` was submitted with (None when its record of it is missing or unreadable: the
        check before it is deployed then refuses it)."""
        try:
            data = json.loads((self.folder(job_id) / SIGNATURE).read_text()[:MAX_RECORD_BYTES])
            return ArchiveSignature.from_text(data.get("signature"), data.get("signer_certificate"))
        except (OSError, ValueError, AttributeError):
            return None

    def folder(self, job_id: int) -> Path:
        """Job `job_id`'s own folder (its record, its archive and the archive's signature)."""
        return self.root / str(job_id)

    # ---- changing ---------------------------------------------------------------------------------

    def add(self, job: Job, archive: Path, signature: ArchiveSignature) -> Job:
        """Reserve the next run number for `job` and store it with a copy of `archive` and the submitter's signature
        of it; its job_id is ignored. Refused when the queue is full. Nothing is left of a job that failed to store."""
        with self._lock:
            queued = self.queued()
            if len(queued) >= MAX_QUEUED:
                raise JobError(f"{MAX_QUEUED} jobs are queued, the most this server keeps; submit again later")
            mine = [j for j in queued if j.submitter == job.submitter]
            if len(mine) >= MAX_QUEUED_PER_SUBMITTER:
                raise JobError(
                    f"{job.submitter} has {len(mine)} jobs queued, the most one submitter may; submit again once "
                    "some have started"
                )
            size = archive.stat().st_size
            if sum(j.size for j in queued) + size > MAX_QUEUED_BYTES:
                raise JobError(
                    f"the queued jobs' archives and this one would take over {MAX_QUEUED_BYTES >> 30} GiB of the "
                    "server's disk; submit again once some have started"
                )
            self.root.mkdir(parents=True, exist_ok=True)
            number = self._next_number()
            # Written first: a number is never handed out twice, even once its job is deleted.
            atomic_write_json(self.root / LAST_ID, number)
            folder = self.root / str(number)
            folder.mkdir(mode=0o700)
            try:
                _copy(archive, folder / ARCHIVE)
                atomic_write_json(folder / SIGNATURE, signature.to_text())
                job = replace(job, job_id=number, submitted_at=time.time(), state=JobState.SUBMITTED)
                atomic_write_json(folder / RECORD, job.to_json())
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._jobs[number] = job
        log.info("job %d (%s) submitted by %s for %s", number, job.name, job.submitter, ", ".join(job.sites))
        return job

    def _next_number(self) -> int:
        """One past every run number used here: jobs' (deleted ones too) and the run folders' (hand-driven runs)."""
        used = set(self._jobs)
        try:
            last = json.loads((self.root / LAST_ID).read_text())
            used.add(last if isinstance(last, int) and not isinstance(last, bool) else 0)
        except (OSError, ValueError):
            pass
        for path in self.workspace.glob(f"{RUN_PREFIX}*"):
            suffix = path.name[len(RUN_PREFIX) :]
            if suffix.isdigit():
                used.add(int(suffix))
        for path in self.root.iterdir():
            if _JOB_DIR.fullmatch(path.name):
                used.add(int(path.name))
        return max(used, default=0) + 1

    def update(self, job_id: int, **changes: Any) -> Job:
        """Replace job `job_id`'s record with `changes` applied (persisted before it is returned)."""
        with self._lock:
            job = replace(self.get(job_id), **changes)
            if len(job.notes) > MAX_NOTES:
                job = replace(job, notes=job.notes[-MAX_NOTES:])
            atomic_write_json(self.folder(job_id) / RECORD, job.to_json())
            self._jobs[job_id] = job
            return job

    def update_if(self, job_id: int, states: tuple[str, ...], **changes: Any) -> Job | None:
        """Apply `changes` only while job `job_id` is in one of `states` (the scheduler's changes never overwrite an
        abort made meanwhile); the job as changed, or None when it is gone or in another state."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state not in states:
                return None
            return self.update(job_id, **changes)

    def note(self, job_id: int, text: str) -> Job:
        """Add a line to job `job_id`'s notes (what happened to it, in order)."""
        with self._lock:
            job = self.get(job_id)
            stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {text}"
            return self.update(job_id, notes=(*job.notes, stamped))

    def remove(self, job_id: int) -> None:
        """Forget job `job_id` and delete its folder."""
        with self._lock:
            self.get(job_id)
            folder = self.folder(job_id)
            trash = folder.with_name(f".deleting-{job_id}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(folder, trash)
            del self._jobs[job_id]
        shutil.rmtree(trash, ignore_errors=True)


def _copy(source: Path, target: Path) -> None:
    """Hard-link when on one file system (a job's archive is written once, never changed), else copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    os.chmod(target, 0o600)


JOBS_CONFIG = Path("local") / "jobs.json"
DEFAULT_MAX_JOBS = 1
MAX_MAX_JOBS = 64


def load_max_jobs(workspace: Path) -> int:
    """max_jobs from the server's local/jobs.json ({"max_jobs": N}); DEFAULT_MAX_JOBS without the file.

    ValueError names the file and what is wrong."""
    path = Path(workspace) / JOBS_CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        return DEFAULT_MAX_JOBS
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    try:
        data = json.loads(text) if len(text) <= 4096 else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or set(data) - {"max_jobs"}:
        raise ValueError(f'{path}: expected {{"max_jobs": N}} (N from 1 to {MAX_MAX_JOBS})')
    value = data.get("max_jobs", DEFAULT_MAX_JOBS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MAX_JOBS:
        raise ValueError(f"{path}: max_jobs must be a whole number from 1 to {MAX_MAX_JOBS}, got {value!r}")
    return value

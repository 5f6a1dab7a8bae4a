"""The job scheduler: starts queued jobs when their sites are connected and have what they ask, up to max_jobs.

Jobs are considered in the order they were submitted; one that cannot start says why (in `jobs`) and does not hold
back a later one that can. A job starts as an operator would start it by hand, as its submitter: the server deploys
its archive, its sites are sent deploy, the server opens the run, its sites are sent start (start-mgpu for --gpus
above 1), every command audited under the submitter's name. The scheduler then follows the run: its end ends the
job; a site that leaves it (silent for heart_beat_timeout, or its worker failed) fails the job unless the sites that
remain still reach min_num_clients, and the job's notes say which.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcommon.admin_defs import AdminIdentity, MsgHeader
from fedcommon.archive_signature import ArchiveSignature
from fedcommon.commands import Topic
from fedcommon.outcome import CommandOutcome
from fedcommon.site_resources import SiteResources
from fedserver.errors import AdminError
from fedserver.jobs import Job, JobError, JobState, JobStore

log = logging.getLogger(__name__)

TICK_S = 1.0
SYSINFO_WAIT_S = 10.0
# How long a job's start waits for its sites to answer deploy (they fetch the archive) and start.
DISPATCH_WAIT_S = 120.0
# A job's site whose worker has not joined the run this long after the job started counts as gone once
# heart_beat_timeout more has passed (a worker imports torch and its trainer before it registers).
STARTUP_GRACE_S = 60.0
# After its run completes, a job stays RUNNING until each of its sites that joined the run and is connected has
# reported its metrics of the final model (before any cross-site validation) or its worker's end; this long at most.
FINISH_GRACE_S = 120.0


@dataclass(frozen=True)
class Capacity:
    """What one site can give a job now: its declared resources and what its runs use."""

    resources: SiteResources

    def shortage(self, gpus: int) -> str | None:
        """Why a job asking `gpus` per site (0: no GPU asked) cannot start here now; None when it can."""
        res = self.resources
        if gpus > 0:
            free = res.free_gpus()
            if len(free) >= gpus:
                return None
            return f"{len(free)} of {len(res.gpu_ids)} GPUs free, the job asks {gpus}"
        if res.gpu_ids:
            return None if res.free_gpus() else f"all {len(res.gpu_ids)} GPUs in use"
        free = res.free_cpu_slots()
        return None if free >= 1 else f"all {res.cpu_slots} CPU slot{'s' if res.cpu_slots != 1 else ''} in use"

    def never(self, gpus: int) -> str | None:
        """Why a job asking `gpus` per site can never run here (the site has fewer); None when it can."""
        have = len(self.resources.gpu_ids)
        if gpus > have:
            return f"has {have} GPU{'s' if have != 1 else ''}, the job asks {gpus}"
        return None


def blocked(
    job: Job,
    connected: set[str],
    capacities: Mapping[str, Capacity],
    running: list[int],
    max_jobs: int,
) -> str | None:
    """Why `job` cannot start now (the first reason found), or None: pure, so the rules are tested alone."""
    if len(running) >= max_jobs:
        shown = ", ".join(map(str, sorted(running)))
        return f"{len(running)} job{'s are' if len(running) != 1 else ' is'} running ({shown}); max_jobs is {max_jobs}"
    missing = [s for s in job.sites if s not in connected]
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not connected"
    for site in job.sites:
        capacity = capacities.get(site)
        if capacity is None:
            return f"{site} has not reported its resources yet"
        short = capacity.shortage(job.gpus)
        if short is not None:
            return f"{site}: {short}"
    return None


class JobScheduler:
    """Owns the queue's progress: one thread that starts jobs and follows them (see the module's docstring)."""

    def __init__(self, server: Any, store: JobStore, max_jobs: int, tick_s: float = TICK_S):
        self._server = server
        self.store = store
        self.max_jobs = max_jobs
        self._tick_s = tick_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._gone: dict[int, set[str]] = {}  # of those, the ones whose leaving was handled
        self._leaving: dict[int, dict[str, float]] = {}  # sites out of a running job's run, and since when
        self._started: dict[int, float] = {}  # when the scheduler began following each running job
        # Sites of a job the server was starting when it stopped, not yet told (again) to start its run.
        self._restart_pending: dict[int, set[str]] = {}
        # Jobs whose run completed, and since when: they end once their sites have reported (_finish).
        self._finishing: dict[int, float] = {}
        self._capacity: dict[str, tuple[float, Capacity]] = {}
        server.on_run_end(self._run_ended)

    # ---- life ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Pick up what a stopped server left (starting jobs start again from scratch), then run the queue."""
        for job in self.store.live():
            if job.state == JobState.STARTING:
                self._recover_starting(job)
            else:
                self._settle(job)
        for run in self._server.training_runs():
            job = self.store.find(run.run_number)
            if job is not None and job.state in JobState.ENDED:
                # The server stopped between ending the job and stopping its run (which it resumed since).
                log.warning("job %d ended (%s) but its run trains: aborting the run", job.job_id, job.state)
                self._server.abort_training(run.run_number)
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """Look at the queue now (a job was submitted, a run ended, a site connected)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            try:
                self._follow_running()
                self._schedule()
            except Exception:
                log.exception("job scheduler: a pass failed; carrying on")

    # ---- submitting and the operator's commands -----------------------------------------------------

    def submit(
        self,
        caller: AdminIdentity,
        archive: Path,
        digest: str,
        name: str,
        sites: list[str],
        gpus: int,
        signature: ArchiveSignature,
    ) -> Job:
        """Queue a job (the archive is checked by the caller); refused when a site can never give what it asks."""
        for site in sites:
            capacity = self._site_capacity(site, caller, fresh=False)
            never = capacity.never(gpus) if capacity is not None else None
            if never is not None:
                raise JobError(f"submit refused: {site} {never}")
        job = Job(
            job_id=0,
            name=name,
            submitter=caller.name,
            submitter_org=caller.org,
            submitter_role=caller.role,
            sites=tuple(sites),
            gpus=gpus,
            digest=digest,
            size=archive.stat().st_size,
        )
        job = self.store.add(job, archive, signature)
        self.wake()
        return job

    def abort(self, job_id: int, caller: AdminIdentity) -> Job:
        """Abort a queued or running job; JobError for one that has ended."""
        with self._lock:
            job = self.store.get(job_id)
            if job.state in JobState.ENDED:
                raise JobError(f"job {job_id} has already ended ({job.state}); there is nothing to abort")
            reason = f"aborted by {caller.name}"
            was_live = job.state in JobState.LIVE
            job = self.store.update(job_id, state=JobState.ABORTED, reason=reason, ended_at=time.time())
        if was_live:
            self._stop_run(job, caller)
        self.store.note(job_id, reason)
        self._forget(job_id)
        self.wake()
        return self.store.get(job_id)

    def refuse_by_hand(self, run_number: int) -> None:
        """AdminError when run N is a job's and the call does not come from this scheduler's thread (which alone
        deploys and starts a job's run, as its submitter)."""
        job = self.store.find(run_number)
        if job is not None and threading.current_thread() is not self._thread:
            raise AdminError(
                f"run {run_number} is job {run_number} ({job.name!r}, submitted by {job.submitter}, {job.state}): "
                f"the scheduler deploys and starts it; see `fedadmin job show {run_number}`"
            )

    # ---- the queue ----------------------------------------------------------------------------------

    def _schedule(self) -> None:
        connected = set(self._server.mailbox.connected_sites())
        for queued in self.store.queued():
            if self._stop.is_set():
                return
            job = self.store.find(queued.job_id)  # as it is now: an abort may have come while this pass ran
            if job is None or job.state not in JobState.QUEUED:
                continue
            running = [j.job_id for j in self.store.live()] + self._hand_driven_runs()
            if len(running) >= self.max_jobs:  # no site need be asked what it has
                self._wait(job, blocked(job, connected, {}, running, self.max_jobs))
                continue
            capacities = {
                site: c
                for site in job.sites
                if site in connected and (c := self._site_capacity(site, job.identity, fresh=True)) is not None
            }
            never = next(
                (f"{s} {c.never(job.gpus)}" for s, c in capacities.items() if c.never(job.gpus) is not None), None
            )
            if never is not None:
                self._fail(job, f"cannot run: {never}")
                continue
            reason = blocked(job, connected, capacities, running, self.max_jobs)
            if reason is not None:
                self._wait(job, reason)
                continue
            self._start(job)
            for site in job.sites:  # what they have left is asked again before the next job is placed there
                self._capacity.pop(site, None)

    def _wait(self, job: Job, reason: str | None) -> None:
        if job.state != JobState.WAITING or job.reason != reason:
            self.store.update_if(job.job_id, JobState.QUEUED, state=JobState.WAITING, reason=reason or "")

    def _hand_driven_runs(self) -> list[int]:
        """Runs training that are no live job's (runs by hand, or an ended job's run not stopped yet): they take a
        place among max_jobs too."""
        live = {j.job_id for j in self.store.live()}
        return [r.run_number for r in self._server.training_runs() if r.run_number not in live]

    def _site_capacity(self, site: str, caller: AdminIdentity, fresh: bool) -> Capacity | None:
        """What `site` reports it has (its sysinfo, asked as `caller`); None when it does not answer or is not
        connected. `fresh`: ask again unless the last answer is under a second old."""
        cached = self._capacity.get(site)
        if cached is not None and (not fresh or time.monotonic() - cached[0] < 1.0):
            return cached[1]
        if site not in self._server.mailbox.connected_sites():
            return cached[1] if cached is not None else None
        reply = self._sysinfo(site, caller)
        if reply is None or not reply.ok:
            return None
        try:
            capacity = Capacity(SiteResources.from_sysinfo(reply.data))
        except ValueError as e:
            log.warning("%s: its sysinfo names no usable resources: %s", site, e)
            return None
        self._capacity[site] = (time.monotonic(), capacity)
        return capacity

    def _sysinfo(self, site: str, caller: AdminIdentity):
        """`site`'s sysinfo reply, asked as `caller` (a site's own policy sees who asks); None for no reply."""
        headers = {
            MsgHeader.ADMIN: caller.name,
            MsgHeader.ADMIN_ROLE: caller.role,
            MsgHeader.ADMIN_ORG: caller.org,
            MsgHeader.COMMAND: "sysinfo",
        }
        mailbox = self._server.mailbox
        waiters = mailbox.send([site], Topic.SYS_INFO, headers, "")
        return mailbox.gather(waiters, time.monotonic() + SYSINFO_WAIT_S, lambda: not self._stop.is_set())[site]

    # ---- starting a job -----------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        number = job.job_id
        started = self.store.update_if(number, JobState.QUEUED, state=JobState.STARTING, reason="deploying")
        if started is None:
            return  # aborted or deleted since this pass read it
        job = started
        log.info("job %d: starting on %s", number, ", ".join(job.sites))
        try:
            self._deploy(job)
            if self.store.update_if(number, (JobState.STARTING,), reason="starting") is None:
                raise _Ended()
            self._server.start_training(number)
            self._start_sites(job)
            running = self.store.update_if(
                number, (JobState.STARTING,), state=JobState.RUNNING, reason="", started_at=time.time()
            )
            if running is None:
                raise _Ended()
        except _Ended:
            # Aborted while it started (its abort could not stop what was not running yet): stop what runs now.
            self._stop_run(self.store.find(number) or job, job.identity)
            return
        except Exception as e:  # a site's refusal (JobStartError) or the server's (ServerError, MMARError, ...)
            if self._stop.is_set():
                return  # the server is stopping: it stays STARTING, and the next server carries it on
            self._fail(job, str(e) or type(e).__name__)
            return
        self.store.note(number, f"started on {', '.join(job.sites)}")
        self._gone[number] = set()

    def _deploy(self, job: Job) -> None:
        archive = self.store.archive(job.job_id)
        signature = self.store.signature(job.job_id)
        self._server.deploy_job_archive(archive, job.job_id, signature)
        blob = self._server.blobs.add(archive, job.digest, signature)
        self._dispatch(job, "deploy", {"blob_id": blob.blob_id, "run_number": job.job_id}, "deploy")

    def _start_sites(self, job: Job) -> None:
        if job.gpus > 1:
            self._dispatch(job, "start-mgpu", {"run_number": job.job_id, "gpu_number": job.gpus}, "start")
        else:
            self._dispatch(job, "start", {"run_number": job.job_id}, "start")

    def _dispatch(self, job: Job, command: str, args: dict[str, Any], what: str) -> CommandOutcome:
        """Run `command` on the job's sites as its submitter; JobStartError naming each site that refused."""
        outcome = self._server.hub.execute(
            job.identity, command, list(job.sites), json.dumps(args), DISPATCH_WAIT_S, lambda: not self._stop.is_set()
        )
        failed = {r.target: r.error or "failed" for r in outcome.replies if not r.ok}
        if outcome.error and not outcome.replies:
            failed = {"server": outcome.error}
        if failed:
            self.store.update(job.job_id, errors={**self.store.get(job.job_id).errors, **failed})
            shown = "; ".join(f"{site}: {error}" for site, error in failed.items())
            raise JobStartError(f"{what} refused: {shown}")
        return outcome

    def _fail(self, job: Job, reason: str) -> None:
        """Mark `job` FAILED with `reason`, stopping its run wherever it got to."""
        with self._lock:
            current = self.store.get(job.job_id)
            if current.state in JobState.ENDED:
                return
            was_live = current.state in JobState.LIVE
            job = self.store.update(job.job_id, state=JobState.FAILED, reason=reason, ended_at=time.time())
        log.warning("job %d failed: %s", job.job_id, reason)
        self.store.note(job.job_id, f"failed: {reason}")
        self._forget(job.job_id)
        if was_live:
            self._stop_run(job, job.identity)

    def _stop_run(self, job: Job, caller: AdminIdentity) -> None:
        """Abort the job's run at its sites (as `caller`) and at the server; what is not running is skipped."""
        number = job.job_id
        try:
            self._server.hub.execute(
                caller,
                "abort",
                list(job.sites),
                json.dumps({"run_number": number}),
                DISPATCH_WAIT_S,
                lambda: not self._stop.is_set(),
            )
        except Exception:
            log.exception("job %d: aborting it at its sites failed", number)
        try:
            if self._trains(number):
                self._server.abort_training(number)
        except Exception as e:
            log.warning("job %d: aborting its run at the server: %s", number, e)

    def _recover_starting(self, job: Job) -> None:
        """A job the server was starting when it stopped: if its run trains (it was resumed), it runs and its sites
        are told to start again (one already training says so, which is fine); otherwise it starts from scratch."""
        number = job.job_id
        if self._trains(number):
            # Its sites reconnect after this server started: each not yet in the run is sent start once it is back.
            self._restart_pending[number] = set(job.sites)
            self.store.update(number, state=JobState.RUNNING, reason="", started_at=time.time())
            self.store.note(number, "the server restarted while starting it; its run carried on")
            self._gone[number] = set()
        else:
            self.store.update(number, state=JobState.SUBMITTED, reason="the server restarted before it started")

    def _trains(self, number: int) -> bool:
        return any(r.run_number == number for r in self._server.training_runs())

    # ---- following running jobs ---------------------------------------------------------------------

    def _run_ended(self, number: int, phase: str, detail: str) -> None:
        """The server's run-end hook: a job's run that was aborted ends the job; one that completed ends it once its
        sites are done (_finish), so that what a job's end is waited for includes the final model's validation."""
        with self._lock:
            job = self.store.find(number)
            if job is None or job.state not in JobState.LIVE:
                return
            if phase == "completed":
                self._finishing[number] = time.monotonic()
                self.store.update(number, reason="run completed; waiting for its sites to finish")
            else:
                self.store.update(number, state=JobState.ABORTED, reason=detail, ended_at=time.time())
        self.store.note(number, f"run {phase}" + (f": {detail}" if detail else ""))
        if phase == "completed":
            self.notice_sites_finished()  # they may all have reported already
        else:
            self._forget(number)
        self.wake()

    def notice_sites_finished(self) -> None:
        """End each job whose run completed and whose sites are done (_finish); called when a site reports, from
        any thread, so that a job's end does not wait for this scheduler's thread, which may be starting a job."""
        now = time.monotonic()
        for number in list(self._finishing):
            job = self.store.find(number)
            if job is not None and job.state == JobState.RUNNING:
                self._finish(job, now)

    def _finish(self, job: Job, now: float) -> None:
        """End a job whose run completed once each of its sites that joined the run, has not left it and is
        connected has reported its final metrics or its worker's end, or once FINISH_GRACE_S has passed (the
        job's notes name the sites that did not report)."""
        number = job.job_id
        since = self._finishing.get(number)
        if since is None:
            return  # aborted meanwhile
        ended = self._server.mailbox.ended_in_run(number)
        finished = set(ended) | self._server.final_metrics_sites(number)
        connected = set(self._server.mailbox.connected_sites())
        joined = self._server.registry.ever_in_run(number)
        left = self._gone.get(number, set())  # sites whose leaving the notes already give
        waiting = [s for s in job.sites if s not in finished and s in connected and s in joined and s not in left]
        overdue = now - since >= FINISH_GRACE_S
        if waiting and not overdue:
            return
        with self._lock:
            done = self.store.update_if(
                number, (JobState.RUNNING,), state=JobState.COMPLETED, reason="", ended_at=time.time()
            )
        if done is None:
            return
        if waiting:
            whose = "its final metrics or its worker's end" if len(waiting) == 1 else "their final metrics or ends"
            self.store.note(number, f"{', '.join(waiting)} did not report {whose} within {FINISH_GRACE_S:g}s")
        for site in job.sites:
            end = ended.get(site)
            if site not in left and end is not None and end.get("exit_code") not in (0, None):
                self.store.note(number, f"after the run completed, {_leaving_words(site, end, 0)}")
        self._forget(number)
        self.wake()

    def _forget(self, number: int) -> None:
        """Drop what the scheduler kept to follow job `number`'s run (it has ended)."""
        for state in (self._gone, self._leaving, self._started, self._restart_pending, self._finishing):
            state.pop(number, None)

    def _settle(self, job: Job) -> None:
        """A RUNNING job at server start: its run was resumed, or has ended, or is gone."""
        status = self._server.run_status(job.job_id)
        if status == "training":
            self._gone[job.job_id] = set()
        elif status in ("completed", "aborted"):
            state = JobState.COMPLETED if status == "completed" else JobState.ABORTED
            cleared = {"reason": ""} if state == JobState.COMPLETED else {}  # not "waiting for its sites to finish"
            self.store.update(job.job_id, state=state, ended_at=time.time(), **cleared)
        else:
            self.store.update(
                job.job_id, state=JobState.FAILED, reason=f"its run is {status} after a restart", ended_at=time.time()
            )

    def _follow_running(self) -> None:
        now = time.monotonic()
        for job in self.store.live():
            if job.state != JobState.RUNNING:
                continue
            number = job.job_id
            if number in self._finishing:
                self._finish(job, now)
                continue
            run = self._server.runs.get(number)
            if run is None:
                continue
            self._start_again(job)
            ended = self._server.mailbox.ended_in_run(number)
            gone = self._gone.setdefault(number, set())
            absent = self._leaving.setdefault(number, {})
            present = self._server.run_sites(number) & set(job.sites)
            joined = self._server.registry.ever_in_run(number)
            started = self._started.setdefault(number, now)
            failed = {site for site in job.sites if (e := ended.get(site)) and e.get("exit_code") not in (0, None)}
            left = []
            for site in sorted(set(job.sites) - gone):
                if site in failed:
                    left.append(site)
                elif site in present:
                    absent.pop(site, None)
                else:
                    # Out of the run since when: a site that never joined gets time to start its worker first.
                    since = absent.setdefault(site, now if site in joined else started + STARTUP_GRACE_S)
                    if now - since >= run.config.heart_beat_timeout:
                        left.append(site)
            if not left:
                continue
            gone |= set(left)
            for site in left:
                absent.pop(site, None)
            self._site_left(job, left, present - failed, ended)

    def _start_again(self, job: Job) -> None:
        """Send start to the job's sites that are connected again after a server restart and not in its run yet;
        a site that already trains it says so, which counts as started."""
        pending = self._restart_pending.get(job.job_id)
        if not pending:
            return
        ready = sorted(pending & set(self._server.mailbox.connected_sites()) - self._server.run_sites(job.job_id))
        pending -= set(self._server.run_sites(job.job_id))
        if not ready:
            return
        pending -= set(ready)
        args = {"run_number": job.job_id, **({"gpu_number": job.gpus} if job.gpus > 1 else {})}
        outcome = self._server.hub.execute(
            job.identity, "start-mgpu" if job.gpus > 1 else "start", ready, json.dumps(args), DISPATCH_WAIT_S
        )
        for reply in outcome.replies:
            if not reply.ok and "already training" not in (reply.error or ""):
                self.store.note(job.job_id, f"{reply.target}: start after the server restarted: {reply.error}")

    def _site_left(self, job: Job, left: list[str], remaining: set[str], ended: Mapping[str, Any]) -> None:
        run = self._server.runs.get(job.job_id)
        if run is None or run.phase.value != "training":
            return  # its end is the run's end hook's to tell
        minimum = run.config.min_num_clients
        why = "; ".join(_leaving_words(site, ended.get(site), run.config.heart_beat_timeout) for site in left)
        where = f"at round {run.current_round}"
        count = f"{len(remaining)} site{'s' if len(remaining) != 1 else ''}"
        if len(remaining) >= minimum:
            self.store.note(job.job_id, f"{why}, {where}; continuing with {count} (min_num_clients {minimum})")
            return
        remain = "remains" if len(remaining) == 1 else "remain"
        self._fail(job, f"{why}, {where}; {count} {remain}, fewer than min_num_clients {minimum}")


def _leaving_words(site: str, ended: Mapping[str, Any] | None, heart_beat_timeout: float) -> str:
    """How a site left a job's run: its worker's own words when it reported its end, else what the server saw."""
    if ended is not None:
        error = ended.get("error") or ended.get("status") or "its worker ended"
        return f"{site} left: {error} (exit code {ended.get('exit_code')})"
    return f"{site} left: out of the run for heart_beat_timeout ({heart_beat_timeout:g}s), its end not reported"


class JobStartError(Exception):
    """A job's sites refused to deploy or start it; the message names each and why."""


class _Ended(Exception):
    """The job ended (aborted) while the scheduler was starting it."""

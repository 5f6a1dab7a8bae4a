"""The job queue's parts alone: its store on disk, the scheduler's rules, the job commands' arguments."""

from __future__ import annotations

import json
import threading

import pytest

from fedcommon.admin_defs import AdminIdentity
from fedcommon.archive_signature import ArchiveSignature
from fedcommon.commands import COMMANDS, ArgumentError
from fedcommon.site_resources import Gpu, SiteResources
from fedserver import jobs as jobs_module
from fedserver import scheduler as scheduler_module
from fedserver.jobs import Job, JobError, JobState, JobStore, load_max_jobs
from fedserver.scheduler import Capacity, JobScheduler, blocked

ALICE = AdminIdentity("alice@a.org", "lead", "a")
# What the store keeps beside an archive; whether it verifies is the server's check (test_archive_signature.py).
SIGNED = ArchiveSignature(b"sig", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def _job(**changes) -> Job:
    values = dict(
        job_id=0,
        name="digits",
        submitter="alice@a.org",
        submitter_org="a",
        submitter_role="lead",
        sites=("site-1", "site-2"),
        gpus=0,
        digest="0" * 64,
        size=3,
    )
    values.update(changes)
    return Job(**values)


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "mmar.zip"
    path.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    return path


def test_job_ids_follow_every_run_number_in_use(tmp_path, archive):
    ws = tmp_path / "ws"
    (ws / "run_7").mkdir(parents=True)
    store = JobStore(ws)
    first = store.add(_job(), archive, SIGNED)
    second = store.add(_job(), archive, SIGNED)
    assert (first.job_id, second.job_id) == (8, 9)
    assert store.archive(8).read_bytes() == archive.read_bytes()
    assert store.signature(8) == SIGNED


def test_a_killed_server_finds_every_job_in_the_state_it_left(tmp_path, archive):
    store = JobStore(tmp_path)
    queued = store.add(_job(), archive, SIGNED)
    running = store.add(_job(name="b"), archive, SIGNED)
    store.update(running.job_id, state=JobState.RUNNING, started_at=1.0)
    store.note(running.job_id, "started on site-1, site-2")
    reloaded = JobStore(tmp_path)
    assert reloaded.get(queued.job_id).state == JobState.SUBMITTED
    again = reloaded.get(running.job_id)
    assert again.state == JobState.RUNNING and again.notes[0].endswith("started on site-1, site-2")
    assert [j.job_id for j in reloaded.queued()] == [queued.job_id]


def test_a_submit_that_never_finished_leaves_no_job(tmp_path, archive):
    store = JobStore(tmp_path)
    job = store.add(_job(), archive, SIGNED)
    (tmp_path / "jobs" / "5").mkdir()  # reserved, record never written (the server died in between)
    reloaded = JobStore(tmp_path)
    assert [j.job_id for j in reloaded.all()] == [job.job_id]
    assert not (tmp_path / "jobs" / "5").exists()


def test_an_unreadable_record_leaves_that_job_out_and_the_others_in(tmp_path, archive, caplog):
    store = JobStore(tmp_path)
    good = store.add(_job(), archive, SIGNED)
    bad = store.add(_job(), archive, SIGNED)
    (tmp_path / "jobs" / str(bad.job_id) / "job.json").write_text("{not json")
    reloaded = JobStore(tmp_path)
    assert [j.job_id for j in reloaded.all()] == [good.job_id]
    assert "unreadable" in caplog.text


def test_a_full_queue_refuses_a_submit_and_keeps_nothing_of_it(tmp_path, archive, monkeypatch):
    monkeypatch.setattr(jobs_module, "MAX_QUEUED", 2)
    store = JobStore(tmp_path)
    store.add(_job(), archive, SIGNED)
    store.add(_job(), archive, SIGNED)
    with pytest.raises(JobError, match="2 jobs are queued"):
        store.add(_job(), archive, SIGNED)
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir() if p.is_dir()) == ["1", "2"]


def test_unknown_job_is_named(tmp_path):
    with pytest.raises(JobError, match="no job 42"):
        JobStore(tmp_path).get(42)


def test_removing_a_job_deletes_its_folder(tmp_path, archive):
    store = JobStore(tmp_path)
    job = store.add(_job(), archive, SIGNED)
    store.remove(job.job_id)
    assert store.find(job.job_id) is None and not store.folder(job.job_id).exists()


def _capacity(gpus=(), slots=1, gpus_used=(), slots_used=0) -> Capacity:
    held = tuple(Gpu(g, 81920, 9 if g in gpus_used else None) for g in gpus)
    return Capacity(SiteResources(held, slots, {9: slots_used} if slots_used else {}))


def test_a_job_waits_for_a_free_place_among_max_jobs():
    caps = {"site-1": _capacity(), "site-2": _capacity()}
    reason = blocked(_job(), {"site-1", "site-2"}, caps, running=[3, 4], max_jobs=2)
    assert reason == "2 jobs are running (3, 4); max_jobs is 2"


def test_a_job_waits_for_its_sites_and_names_the_missing_one():
    caps = {"site-1": _capacity()}
    assert blocked(_job(), {"site-1"}, caps, [], 2) == "site-2 is not connected"


def test_a_job_waits_for_a_free_cpu_slot_and_says_so():
    caps = {"site-1": _capacity(), "site-2": _capacity(slots=1, slots_used=1)}
    assert blocked(_job(), {"site-1", "site-2"}, caps, [], 2) == "site-2: all 1 CPU slot in use"


def test_a_job_asking_gpus_waits_until_enough_are_free():
    caps = {"site-1": _capacity(gpus=("0", "1")), "site-2": _capacity(gpus=("0", "1"), gpus_used=("1",))}
    reason = blocked(_job(gpus=2), {"site-1", "site-2"}, caps, [], 2)
    assert reason == "site-2: 1 of 2 GPUs free, the job asks 2"
    assert blocked(_job(gpus=1), {"site-1", "site-2"}, caps, [], 2) is None


def test_a_job_asking_more_gpus_than_a_site_has_can_never_run_there():
    assert _capacity(gpus=("0",)).never(2) == "has 1 GPU, the job asks 2"
    assert _capacity().never(0) is None


def test_max_jobs_comes_from_local_jobs_json(tmp_path):
    assert load_max_jobs(tmp_path) == 1
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "jobs.json").write_text(json.dumps({"max_jobs": 3}))
    assert load_max_jobs(tmp_path) == 3
    for bad in ({"max_jobs": 0}, {"max_jobs": "2"}, {"max_job": 2}, [2]):
        (tmp_path / "local" / "jobs.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="jobs.json"):
            load_max_jobs(tmp_path)


@pytest.mark.parametrize(
    "args, wrong",
    [
        ({"blob_id": "0" * 64, "gpus": -1}, "gpus"),
        ({"blob_id": "0" * 64, "gpus": 65}, "gpus"),
        ({"blob_id": "0" * 64, "sites": []}, "sites"),
        ({"blob_id": "0" * 64, "sites": ["all"]}, "sites"),
        ({"blob_id": "0" * 64, "sites": ["../x"]}, "sites"),
        ({"blob_id": "0" * 64, "name": "a\x1b[2Jb"}, "name"),
        ({"blob_id": "0" * 64, "name": "x" * 101}, "name"),
        ({"blob_id": "nope"}, "blob_id"),
    ],
)
def test_submit_refuses_bad_arguments_naming_them(args, wrong):
    with pytest.raises(ArgumentError, match=wrong):
        COMMANDS["submit"].check_args(args)


def test_job_commands_take_a_job_id():
    assert COMMANDS["job-show"].check_args({"job_id": 3}) == {"job_id": 3}
    with pytest.raises(ArgumentError, match="job_id"):
        COMMANDS["job-abort"].check_args({"job_id": 0})


class _Mailbox:
    def connected_sites(self):
        return []

    def site_results(self):
        return {"site_progress": {}, "training_ended": {}}


class _Server:
    """What the scheduler needs of a server with no site connected: it queues, and starts nothing."""

    def __init__(self):
        self.mailbox = _Mailbox()
        self.runs = {}
        self.ended = []

    def on_run_end(self, callback):
        self.ended.append(callback)

    def training_runs(self):
        return []


def test_two_hundred_jobs_submitted_at_once_by_one_admin_queue_up_to_their_share(tmp_path, archive):
    scheduler = JobScheduler(_Server(), JobStore(tmp_path), max_jobs=2)
    ids: list[int] = []
    refused: list[str] = []
    lock = threading.Lock()

    def submit():
        try:
            job = scheduler.submit(ALICE, archive, "0" * 64, "digits", ["site-1"], 0, SIGNED)
        except JobError as e:
            with lock:
                refused.append(str(e))
            return
        with lock:
            ids.append(job.job_id)

    threads = [threading.Thread(target=submit) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    share = jobs_module.MAX_QUEUED_PER_SUBMITTER
    assert sorted(ids) == list(range(1, share + 1))
    assert refused == [f"alice@a.org has {share} jobs queued, the most one submitter may; submit again once some "
                       "have started"] * (200 - share)  # fmt: skip
    assert len(JobStore(tmp_path).queued()) == share


def test_a_deleted_jobs_number_is_never_handed_out_again(tmp_path, archive):
    store = JobStore(tmp_path)
    first = store.add(_job(), archive, SIGNED)
    store.remove(first.job_id)
    assert JobStore(tmp_path).add(_job(), archive, SIGNED).job_id == first.job_id + 1


def test_a_change_for_a_job_in_another_state_is_not_made(tmp_path, archive):
    store = JobStore(tmp_path)
    job = store.add(_job(), archive, SIGNED)
    store.update(job.job_id, state=JobState.ABORTED)
    assert store.update_if(job.job_id, JobState.QUEUED, state=JobState.STARTING) is None
    assert JobStore(tmp_path).get(job.job_id).state == JobState.ABORTED


def test_aborting_a_queued_job_ends_it_and_a_second_abort_is_refused(tmp_path, archive):
    scheduler = JobScheduler(_Server(), JobStore(tmp_path), max_jobs=1)
    job = scheduler.submit(ALICE, archive, "0" * 64, "digits", ["site-1"], 0, SIGNED)
    aborted = scheduler.abort(job.job_id, ALICE)
    assert aborted.state == JobState.ABORTED and aborted.reason == "aborted by alice@a.org"
    with pytest.raises(JobError, match="already ended \\(ABORTED\\)"):
        scheduler.abort(job.job_id, ALICE)


class _FinishingMailbox:
    """The sites a server hears from: connected ones, and the workers' end reports of each run."""

    def __init__(self, connected):
        self.connected = set(connected)
        self.ended: dict[int, dict[str, dict]] = {}

    def connected_sites(self):
        return sorted(self.connected)

    def ended_in_run(self, number):
        return dict(self.ended.get(number, {}))


class _Registry:
    def __init__(self, joined):
        self.joined = set(joined)

    def ever_in_run(self, number):
        return set(self.joined)


class _FinishingServer(_Server):
    def __init__(self, connected):
        super().__init__()
        self.mailbox = _FinishingMailbox(connected)
        self.registry = _Registry(("site-1", "site-2"))
        self.final_metrics: dict[int, set[str]] = {}

    def final_metrics_sites(self, number):
        return set(self.final_metrics.get(number, set()))


def _running_job(tmp_path, archive, connected=("site-1", "site-2")):
    server = _FinishingServer(connected)
    scheduler = JobScheduler(server, JobStore(tmp_path), max_jobs=2)
    job = scheduler.store.add(_job(), archive, SIGNED)
    scheduler.store.update(job.job_id, state=JobState.RUNNING)
    return server, scheduler, job.job_id


def test_a_completed_runs_job_ends_once_its_sites_report_their_workers_end(tmp_path, archive):
    server, scheduler, number = _running_job(tmp_path, archive)
    scheduler._run_ended(number, "completed", "completed after round 2")
    scheduler._follow_running()
    job = scheduler.store.get(number)
    # The sites' workers still validate the final model: the job goes on, and says why.
    assert job.state == JobState.RUNNING and job.reason == "run completed; waiting for its sites to finish"
    server.mailbox.ended[number] = {"site-1": {"exit_code": 0, "status": "training stopped"}}
    scheduler._follow_running()
    assert scheduler.store.get(number).state == JobState.RUNNING
    server.mailbox.ended[number]["site-2"] = {"exit_code": 3, "error": "validation crashed"}
    scheduler._follow_running()
    job = scheduler.store.get(number)
    assert job.state == JobState.COMPLETED and job.reason == "" and job.ended_at
    assert job.notes[-1].endswith("after the run completed, site-2 left: validation crashed (exit code 3)")


def test_a_completed_runs_job_does_not_wait_for_a_site_that_is_not_connected(tmp_path, archive):
    server, scheduler, number = _running_job(tmp_path, archive, connected=("site-1",))
    scheduler._run_ended(number, "completed", "completed after round 2")
    server.mailbox.ended[number] = {"site-1": {"exit_code": 0}}
    scheduler._follow_running()
    assert scheduler.store.get(number).state == JobState.COMPLETED


def test_a_completed_runs_job_ends_after_the_grace_when_a_site_never_reports(tmp_path, archive, monkeypatch):
    server, scheduler, number = _running_job(tmp_path, archive)
    scheduler._run_ended(number, "completed", "completed after round 2")
    server.mailbox.ended[number] = {"site-2": {"exit_code": 0}}
    scheduler._follow_running()
    assert scheduler.store.get(number).state == JobState.RUNNING
    later = scheduler_module.time.monotonic() + scheduler_module.FINISH_GRACE_S
    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: later)
    scheduler._follow_running()
    job = scheduler.store.get(number)
    assert job.state == JobState.COMPLETED
    grace = scheduler_module.FINISH_GRACE_S
    assert job.notes[-1].endswith(f"site-1 did not report its final metrics or its worker's end within {grace:g}s")


def test_a_completed_runs_job_ends_once_its_sites_report_their_final_metrics_from_the_reporting_thread(
    tmp_path, archive
):
    # With cross-site validation a worker goes on after reporting its final metrics: those are what a job waits for,
    # and the report ends the job at once, from the thread that took it, not at the scheduler's next pass.
    server, scheduler, number = _running_job(tmp_path, archive)
    scheduler._run_ended(number, "completed", "completed after round 2")
    server.final_metrics[number] = {"site-1"}
    scheduler.notice_sites_finished()
    assert scheduler.store.get(number).state == JobState.RUNNING
    server.final_metrics[number].add("site-2")
    reporter = threading.Thread(target=scheduler.notice_sites_finished)
    reporter.start()
    reporter.join()
    assert scheduler.store.get(number).state == JobState.COMPLETED


def test_a_completed_runs_job_does_not_wait_for_a_site_that_left_or_never_joined_the_run(tmp_path, archive):
    server, scheduler, number = _running_job(tmp_path, archive)
    server.registry.joined = {"site-1"}  # site-2 never joined the run
    scheduler._run_ended(number, "completed", "completed after round 2")
    scheduler._follow_running()
    assert scheduler.store.get(number).state == JobState.RUNNING  # site-1 still validates the final model
    server.final_metrics[number] = {"site-1"}
    scheduler._follow_running()
    assert scheduler.store.get(number).state == JobState.COMPLETED

    server, scheduler, number = _running_job(tmp_path / "second", archive)
    scheduler._gone[number] = {"site-2"}  # left during the run; the notes already say so
    scheduler._run_ended(number, "completed", "completed after round 2")
    server.mailbox.ended[number] = {"site-1": {"exit_code": 0}}
    scheduler._follow_running()
    assert scheduler.store.get(number).state == JobState.COMPLETED


def test_an_aborted_run_ends_its_job_at_once_and_an_abort_while_finishing_wins(tmp_path, archive):
    _server, scheduler, number = _running_job(tmp_path, archive)
    scheduler._run_ended(number, "aborted", "aborted in round 1")
    job = scheduler.store.get(number)
    assert job.state == JobState.ABORTED and job.reason == "aborted in round 1"

    _server, scheduler, number = _running_job(tmp_path / "second", archive)
    scheduler._run_ended(number, "completed", "completed after round 2")
    assert scheduler.abort(number, ALICE).state == JobState.ABORTED
    scheduler._follow_running()
    assert scheduler.store.get(number).state == JobState.ABORTED

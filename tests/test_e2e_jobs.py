"""Jobs end to end: a real server and two real site agents (mutual TLS on 127.0.0.1) driven by `fedadmin` subprocesses;
jobs submitted, queued, run concurrently, surviving a server killed with -9, downloaded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copy_mmar, prepare_workspace, run_fedadmin

pytestmark = pytest.mark.e2e

FAST = {"num_rounds": 2}
TRAIN = {"epochs_per_round": 1}


def fedadmin(ws: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_fedadmin(*args, kit=ws / "admin", timeout=timeout)


def ok_json(ws: Path, *args: str, timeout: float = 300) -> dict:
    result = fedadmin(ws, "--json", *args, timeout=timeout)
    assert result.returncode == 0, f"fedadmin {' '.join(args)}: {result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def submit(ws: Path, mmar: Path, *extra: str) -> int:
    return int(ok_json(ws, "submit", str(mmar), *extra)["job_id"])


def wait_jobs(ws: Path, ids: list[int], timeout: float = 400) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["job_id"]: j for j in ok_json(ws, "jobs")["jobs"]}
        if all(jobs[i]["state"] in ("COMPLETED", "FAILED", "ABORTED") for i in ids):
            return jobs
        assert time.monotonic() < deadline, f"jobs never ended: {[jobs[i] for i in ids]}"
        time.sleep(1)


def final_accuracy(ws: Path, number: int) -> float:
    summary = json.loads((ws / "server" / f"run_{number}" / "summary.json").read_text())
    values = [m["accuracy"] for m in summary["final_metrics"].values()]
    assert len(values) == 2, summary["final_metrics"]
    return min(values)


def starts_audited(ws: Path, participant: str, number: int) -> int:
    """How many times a participant's audit log records a start of run `number`: the server's intents, a site's
    starts that succeeded."""
    count = 0
    for line in (ws / participant / "audit.log").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("command") not in ("start", "start-mgpu"):
            continue
        if participant == "server":
            count += entry.get("phase") == "intent" and (entry.get("args") or {}).get("run_number") == number
        else:
            count += entry.get("ok") is True and str(entry.get("run_number")) == str(number)
    return count


@contextlib.contextmanager
def federation(tmp_path: Path, max_jobs: int, slots: int) -> Iterator[Path]:
    """A POC federation of 2 sites whose server runs `max_jobs` jobs at once and whose sites have `slots` CPU slots;
    stopped afterwards, whatever happened."""
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    (ws / "server" / "local").mkdir(exist_ok=True)
    (ws / "server" / "local" / "jobs.json").write_text(json.dumps({"max_jobs": max_jobs}))
    for site in ("site-1", "site-2"):
        (ws / site / "local").mkdir(exist_ok=True)
        (ws / site / "local" / "resources.json").write_text(json.dumps({"cpu_slots": slots}))
    try:
        started = fedadmin(ws, "poc", "start", "--workspace", str(ws), timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield ws
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), timeout=120)


@pytest.fixture
def concurrent(tmp_path):
    with federation(tmp_path, max_jobs=2, slots=2) as ws:
        yield ws


@pytest.fixture
def one_at_a_time(tmp_path):
    with federation(tmp_path, max_jobs=1, slots=1) as ws:
        yield ws


def test_jobs_run_two_at_a_time_on_the_same_sites_and_a_queue_of_five_drains(concurrent, tmp_path):
    ws = concurrent
    mmar = copy_mmar(tmp_path / "mmar", server=FAST, train_args=TRAIN)
    alone = submit(ws, mmar, "--name", "alone")
    assert wait_jobs(ws, [alone])[alone]["state"] == "COMPLETED"
    baseline = final_accuracy(ws, alone)

    queue = [submit(ws, mmar, "--name", f"variant-{i}") for i in range(5)]
    listed = ok_json(ws, "jobs")["jobs"]
    assert {j["job_id"] for j in listed} >= set(queue)
    jobs = wait_jobs(ws, queue)
    assert [jobs[i]["state"] for i in queue] == ["COMPLETED"] * 5, [jobs[i] for i in queue]
    # Two ran at the same time on the same two sites: some pair's running intervals overlap.
    spans = sorted((jobs[i]["started_at"], jobs[i]["ended_at"]) for i in queue)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    for number in queue:
        assert final_accuracy(ws, number) >= baseline - 0.05
        # Each started exactly once, at the server and at each site.
        assert [starts_audited(ws, p, number) for p in ("site-1", "site-2")] == [1, 1]

    shown = ok_json(ws, "job", "show", str(queue[0]))
    assert shown["state"] == "COMPLETED" and shown["metrics"]["rounds"] >= 1
    out = tmp_path / "results"
    downloaded = ok_json(ws, "job", "download", str(queue[0]), "--out", str(out))
    folder = Path(downloaded["download"])
    assert (folder / "summary.json").is_file()
    assert any(p.name.endswith(".fl") for p in (folder / "models").iterdir())
    assert {p.name for p in (folder / "logs").iterdir()} == {"site-1-worker.log", "site-2-worker.log"}


def test_a_server_killed_with_one_job_running_and_three_queued_loses_none_and_runs_none_twice(one_at_a_time, tmp_path):
    from fedadmin.local_federation import launch, participant_argv, participants
    from fedcommon.pid_file import read_pid_file

    ws = one_at_a_time
    mmar = copy_mmar(tmp_path / "mmar", server={"num_rounds": 4}, train_args=TRAIN)
    ids = [submit(ws, mmar, "--name", f"j{i}") for i in range(4)]
    deadline = time.monotonic() + 120
    while ok_json(ws, "job", "show", str(ids[0]))["state"] != "RUNNING":
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.5)
    states = {j["job_id"]: j["state"] for j in ok_json(ws, "jobs")["jobs"]}
    assert [states[i] for i in ids[1:]] == ["WAITING"] * 3

    os.kill(read_pid_file(ws / "server").pid, signal.SIGKILL)
    server = next(p for p in participants(ws) if p.role == "server")
    launch(ws, "server", participant_argv(server))
    deadline = time.monotonic() + 60
    while fedadmin(ws, "--json", "jobs").returncode != 0:  # the new server takes a moment to listen
        assert time.monotonic() < deadline, "the restarted server never answered"
        time.sleep(0.5)

    jobs = wait_jobs(ws, ids, timeout=600)
    assert [jobs[i]["state"] for i in ids] == ["COMPLETED"] * 4, [jobs[i] for i in ids]
    for number in ids:
        assert starts_audited(ws, "server", number) <= 1
        assert [starts_audited(ws, p, number) for p in ("site-1", "site-2")] == [1, 1]


def test_bad_job_requests_are_refused_naming_what_is_wrong(one_at_a_time, tmp_path):
    ws = one_at_a_time
    unknown = fedadmin(ws, "--json", "job", "show", "999")
    assert unknown.returncode == 1 and "no job 999" in unknown.stdout

    mmar = copy_mmar(tmp_path / "mmar", server=FAST, train_args=TRAIN)
    greedy = fedadmin(ws, "--json", "submit", str(mmar), "--gpus", "2")
    assert greedy.returncode == 1
    assert "site-1 has 0 GPUs, the job asks 2" in greedy.stdout or "site-2 has 0 GPUs" in greedy.stdout
    assert ok_json(ws, "jobs")["jobs"] == []

    done = submit(ws, mmar)
    ended = wait_jobs(ws, [done])[done]
    assert ended["state"] == "COMPLETED", ended["reason"]
    again = fedadmin(ws, "--json", "--yes", "job", "abort", str(done))
    assert again.returncode == 1 and "already ended (COMPLETED)" in again.stdout


def test_a_site_that_leaves_a_job_fails_it_when_too_few_remain(one_at_a_time, tmp_path):
    from fedcommon.pid_file import read_pid_file

    ws = one_at_a_time
    mmar = copy_mmar(
        tmp_path / "mmar", server={"num_rounds": 50, "heart_beat_timeout": 5, "min_num_clients": 2}, train_args=TRAIN
    )
    job = submit(ws, mmar)
    deadline = time.monotonic() + 120
    while ok_json(ws, "job", "show", str(job))["state"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(3)  # its workers have registered
    agent = read_pid_file(ws / "site-2").pid
    os.killpg(os.getpgid(agent), signal.SIGKILL) if os.getpgid(agent) != os.getpgid(0) else os.kill(agent, 9)
    shown = wait_jobs(ws, [job], timeout=120)[job]
    assert shown["state"] == "FAILED"
    assert shown["reason"].startswith("site-2 left: out of the run for heart_beat_timeout (5s)")
    assert shown["reason"].endswith("1 site remains, fewer than min_num_clients 2")


def test_a_job_waits_for_a_free_cpu_slot_and_says_which_site_is_short(tmp_path):
    with federation(tmp_path, max_jobs=2, slots=1) as ws:
        mmar = copy_mmar(tmp_path / "mmar", server={"num_rounds": 3}, train_args=TRAIN)
        first, second = submit(ws, mmar), submit(ws, mmar)
        deadline = time.monotonic() + 120
        while True:
            jobs = {j["job_id"]: j for j in ok_json(ws, "jobs")["jobs"]}
            if jobs[first]["state"] == "RUNNING" and jobs[second]["state"] == "WAITING":
                break
            assert jobs[second]["state"] in ("SUBMITTED", "WAITING"), jobs[second]
            assert time.monotonic() < deadline, jobs
            time.sleep(0.3)
        assert jobs[second]["reason"] in ("site-1: all 1 CPU slot in use", "site-2: all 1 CPU slot in use")
        ended = wait_jobs(ws, [first, second])
        assert [ended[i]["state"] for i in (first, second)] == ["COMPLETED", "COMPLETED"]
        assert ended[second]["started_at"] >= ended[first]["ended_at"] - 1.0

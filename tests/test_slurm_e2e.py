"""End to end on a real single-node Slurm: site-1 trains as Slurm jobs (local/launcher.json), site-2 as processes.

One federation for the module (real server and agents, mutual TLS on 127.0.0.1); each test trains a run of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, copy_mmar, prepare_workspace, python_env, run_fedadmin, stop_process
from test_e2e_admin import fedadmin, ok_json, replies, workers_of

from fedcommon.pid_file import live_process, read_pid_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PENDING_LIMIT_S = 12
FAILING_TRAINER = '''
from trainer import DigitsTrainer


class FailingTrainer(DigitsTrainer):
    """Fails in its first local phase, as a site whose data volume went away."""

    def train(self, progress=None):
        raise RuntimeError("the data volume /data/digits is not mounted on this node")
'''


@pytest.fixture(scope="module")
def federation(slurm_cluster, tmp_path_factory):
    """A POC federation whose site-1 runs its training on the test Slurm; yields its workspace."""
    tmp = tmp_path_factory.mktemp("slurm-federation")
    ws = prepare_workspace(tmp / "ws", clients=2)
    launcher = {
        "launcher": "slurm",
        "slurm": {
            "slurm_conf": str(slurm_cluster.conf),
            "partition": "debug",
            "time_limit": "00:30:00",
            "poll_s": 0.5,
            "pending_limit_s": PENDING_LIMIT_S,
        },
    }
    (ws / "site-1" / "local").mkdir(exist_ok=True)
    (ws / "site-1" / "local" / "launcher.json").write_text(json.dumps(launcher))
    started = fedadmin(ws, "poc", "start", "--workspace", str(ws), timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield ws
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), timeout=120)
        for job in slurm_cluster.jobs():
            slurm_cluster.run("scancel", job)


def _status(ws: Path, site: str = "site-1") -> dict:
    return replies(ok_json(ws, "status", site))[site]


def _wait_status(ws: Path, check, timeout: float, site: str = "site-1") -> dict:
    deadline = time.monotonic() + timeout
    while not check(status := _status(ws, site)):
        assert time.monotonic() < deadline, f"{site} never got there: {status}"
        time.sleep(0.5)
    return status


def _deploy(ws: Path, number: int, mmar: Path) -> None:
    ok_json(ws, "set-run", str(number))
    ok_json(ws, "deploy", str(mmar), "all")


def _start_endless_run(ws: Path, number: int, tmp_path: Path) -> str:
    """Run `number` at the server and site-1 with a local phase that never ends; returns the Slurm job id."""
    slow = copy_mmar(
        tmp_path / "slow", server={"num_rounds": 50, "min_num_clients": 1}, train_args={"epochs_per_round": 100000}
    )
    _deploy(ws, number, slow)
    return str(replies(ok_json(ws, "start", "site-1", "server"))["site-1"]["pid"])


def _no_training_left(ws: Path, cluster) -> None:
    cluster.wait_no_jobs(30)
    deadline = time.monotonic() + 15
    while workers_of(ws) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers_of(ws) == [], [p.cmdline() for p in workers_of(ws)]


def test_a_run_with_one_site_on_slurm_and_one_on_process_completes(federation, slurm_cluster, tmp_path):
    ws = federation
    _deploy(ws, 1, copy_mmar(tmp_path / "mmar", server={"num_rounds": 2}, train_args={"epochs_per_round": 1}))
    started = replies(ok_json(ws, "start", "all"))
    job = str(started["site-1"]["pid"])
    assert slurm_cluster.job_field(job, "JobName") == "fedlearn-site-1-run1"
    ok_json(ws, "wait", "--timeout", "240", timeout=300)
    summary = json.loads((ws / "server" / "run_1" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["contributors"] for r in summary["rounds"]] == [["site-1", "site-2"]] * 2
    status = _wait_status(ws, lambda s: s["status"] == "training stopped", 30)
    assert status["slurm_job"] == job and status["slurm_state"] == "COMPLETED", status
    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED"
    assert _status(ws, "site-2")["status"] == "training stopped" and "slurm_job" not in _status(ws, "site-2")
    # The job's output, copied into the run's worker.log: `fedadmin logs` reads it as for a process.
    worker_log = ok_json(ws, "logs", "site-1", "--run", "1", "--lines", "2000")
    assert any("run 1 finished" in line for line in worker_log["lines"]), worker_log["lines"][-5:]
    info = replies(ok_json(ws, "sysinfo", "site-1"))["site-1"]
    assert info["cluster"]["launcher"] == "slurm" and info["cluster"]["partition"] == "debug"
    assert info["cluster"]["nodes"] == 1 and info["cluster"]["free_nodes"] == 1
    assert info["cluster"]["cpus"] == slurm_cluster.cpus and info["cluster"]["gpus"] == 0
    _no_training_left(ws, slurm_cluster)


def test_start_mgpu_2_runs_two_gloo_ranks_under_srun(federation, slurm_cluster, tmp_path):
    ws = federation
    mmar = copy_mmar(
        tmp_path / "mmar", server={"num_rounds": 1, "min_num_clients": 1}, train_args={"epochs_per_round": 1}
    )
    _deploy(ws, 2, mmar)
    started = replies(ok_json(ws, "start-mgpu", "2", "site-1", "server"))["site-1"]
    assert started["gpus"] == 2 and started["backend"] == "gloo"
    job = str(started["pid"])
    assert slurm_cluster.job_field(job, "NumCPUs") == "2"
    ok_json(ws, "wait", "--timeout", "240", timeout=300)
    status = _wait_status(ws, lambda s: s["status"] == "training stopped", 30)
    assert status["ranks"] == 2 and status["slurm_state"] == "COMPLETED", status
    log = (ws / "site-1" / "run_2" / "logs" / "worker.log").read_text()
    assert "rank 0 of 2 joined the site's process group (gloo)" in log
    assert "rank 1 of 2 joined the site's process group (gloo)" in log
    assert "run 2 finished" in log
    _no_training_left(ws, slurm_cluster)


def test_a_job_queued_behind_a_full_node_shows_slurms_reason_then_is_cancelled_past_the_limit(
    federation, slurm_cluster, tmp_path
):
    ws = federation
    _deploy(ws, 3, copy_mmar(tmp_path / "mmar", server={"min_num_clients": 1}))
    blocker = slurm_cluster.run(
        "sbatch", "--parsable", f"--cpus-per-task={slurm_cluster.cpus}", "--output=/dev/null", "--wrap", "sleep 300"
    )
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = blocker.stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while slurm_cluster.job_field(blocker_id, "JobState") != "RUNNING":
            assert time.monotonic() < deadline, "the job filling the node never ran"
            time.sleep(0.3)
        ok_json(ws, "start", "site-1")
        status = _wait_status(ws, lambda s: "Resources" in s.get("detail", ""), 20)
        assert status["status"] == "training starting" and status["detail"] == "queued in Slurm: Resources"
        shown = run_fedadmin("status", "site-1", kit=ws / "admin", env={"COLUMNS": "200"})
        assert "queued in Slurm: Resources" in shown.stdout, shown.stdout
        status = _wait_status(ws, lambda s: s["status"] == "training exception", PENDING_LIMIT_S + 30)
        assert f"waited in the queue for more than {PENDING_LIMIT_S}s (Resources)" in status["error"], status
        assert "cancelled" in status["error"]
        assert slurm_cluster.job_field(status["slurm_job"], "JobState") == "CANCELLED"
        assert slurm_cluster.jobs() == [blocker_id]
    finally:
        slurm_cluster.run("scancel", blocker_id)
    _no_training_left(ws, slurm_cluster)


def test_abort_leaves_no_slurm_job_and_no_process(federation, slurm_cluster, tmp_path):
    ws = federation
    job = _start_endless_run(ws, 4, tmp_path)
    _wait_status(ws, lambda s: s["status"] == "training started" and s.get("progress"), 90)
    assert workers_of(ws), "the worker runs under slurmstepd on this node"
    assert slurm_cluster.jobs() == [job]
    ok_json(ws, "--yes", "abort", "server")
    assert slurm_cluster.jobs() == [], "abort returns once Slurm says the job ended"
    assert slurm_cluster.job_field(job, "JobState") == "CANCELLED"
    status = _status(ws)
    assert status["status"] == "training stopped" and status["slurm_state"] == "CANCELLED", status
    _no_training_left(ws, slurm_cluster)


def test_a_failing_worker_shows_failed_with_its_error(federation, slurm_cluster, tmp_path):
    ws = federation
    failing = copy_mmar(tmp_path / "failing", server={"min_num_clients": 1})
    (failing / "custom" / "failing.py").write_text(FAILING_TRAINER)
    train_cfg = failing / "config" / "config_train.json"
    train_cfg.write_text(train_cfg.read_text().replace('"trainer.DigitsTrainer"', '"failing.FailingTrainer"'))
    _deploy(ws, 5, failing)
    job = str(replies(ok_json(ws, "start", "site-1", "server"))["site-1"]["pid"])
    status = _wait_status(ws, lambda s: s["status"] == "training exception", 120)
    assert status["slurm_state"] == "FAILED" and slurm_cluster.job_field(job, "JobState") == "FAILED"
    error = status["error"]
    assert error.startswith("training failed: the data volume /data/digits is not mounted on this node"), error
    assert f"Slurm job {job} FAILED (NonZeroExitCode), exit code 1" in error, error
    errors = ok_json(ws, "logs", "site-1", "--run", "5", "--level", "error", "--lines", "400")
    assert any("RuntimeError: the data volume" in line for line in errors["lines"]), errors["lines"]
    ok_json(ws, "--yes", "abort", "server")
    _no_training_left(ws, slurm_cluster)


def test_an_agent_killed_or_restarted_while_its_job_runs_takes_the_job_up_again(federation, slurm_cluster, tmp_path):
    ws = federation
    job = _start_endless_run(ws, 6, tmp_path)
    _wait_status(ws, lambda s: s["status"] == "training started", 90)
    site = ws / "site-1"
    record = read_pid_file(site)
    agent = live_process(record) if record is not None else None
    assert agent is not None, "site-1's agent wrote no pid file"
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(10)
    time.sleep(2)
    assert slurm_cluster.job_field(job, "JobState") == "RUNNING", "the job outlives its agent"
    restarted = subprocess.Popen(
        [sys.executable, "-m", "fedclient.cli", "start", "--workspace", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=python_env(),
        cwd=ROOT,
    )
    try:
        status = _wait_status(ws, lambda s: s["status"] == "training started" and s.get("slurm_job") == job, 60)
        assert status["run_number"] == 6, status
        taken_up = f"following Slurm job {job}, submitted before this agent started"
        assert (site / "log.txt").read_text().count(taken_up) == 1
        # An operator's restart leaves the job running too, and the agent, started again, takes it up again.
        ok_json(ws, "--yes", "restart", "site-1")
        deadline = time.monotonic() + 60
        while (site / "log.txt").read_text().count(taken_up) < 2:
            assert time.monotonic() < deadline, "the agent did not take its job up after `restart`"
            time.sleep(0.3)
        assert slurm_cluster.job_field(job, "JobState") == "RUNNING"
        _wait_status(ws, lambda s: s["status"] == "training started" and s.get("slurm_job") == job, 60)
        ok_json(ws, "--yes", "abort", "server")
        assert slurm_cluster.job_field(job, "JobState") == "CANCELLED"
        assert _status(ws)["status"] == "training stopped"
        _no_training_left(ws, slurm_cluster)
    finally:
        stop_process(restarted)

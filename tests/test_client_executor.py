"""ProcessExecutor with real processes: progress over the authenticated socket, abort and crash leave nothing."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import copy_mmar, prepare_workspace

from fedclient import client_executor
from fedclient.admin_interface import ClientAdminInterface, RequestRefused
from fedclient.client_executor import ProcessExecutor, ThreadExecutor, TrainArgs, TrainingError
from fedclient.client_status import ClientStatus
from fedclient.executor_channel import KEY_SOURCE_ENV
from fedclient.process_group import group_members

# A stand-in for fedclient.worker: same arguments, same parent protocol; <mmar>/mode picks its behaviour.
CHILD = '''
"""Test-only training worker."""
import argparse, json, os, signal, subprocess, sys, threading, time
from pathlib import Path

from fedclient.executor_channel import KEY_SOURCE_ENV, connect_parent, send_event, start_command_listener


class Client:
    def __init__(self):
        self.stop = threading.Event()

    def abort(self):
        self.stop.set()


parser = argparse.ArgumentParser()
for flag in ("--workspace", "--mmar", "--parent"):
    parser.add_argument(flag)
parser.add_argument("--run-number", type=int)
parser.add_argument("--debug", action="store_true")
args = parser.parse_args()
mode = Path(args.mmar, "mode").read_text().strip()
run_dir = Path(args.workspace) / f"run_{args.run_number}"
info = {"pid": os.getpid(), "pgid": os.getpgrp(), "argv": sys.argv, "cwd": os.getcwd(),
        "key_source": os.environ.get(KEY_SOURCE_ENV, ""), "pythonpath": os.environ.get("PYTHONPATH", ""),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
conn = connect_parent(args.parent)
info["key_left_in_env"] = KEY_SOURCE_ENV in os.environ
client = Client()
if mode in ("hang", "crash"):
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    info["grandchild"] = subprocess.Popen([sys.executable, "-c", ignore_term]).pid
if mode == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    start_command_listener(Client(), conn, os.getppid(), grace=0.2)  # its abort does nothing
name = f"child{os.environ.get('LOCAL_RANK', '')}.json"  # a torchrun rank's: child0.json, child1.json
tmp = run_dir / f"{name}.tmp"
tmp.write_text(json.dumps(info))
tmp.rename(run_dir / name)
send_event(conn, "status", status=2)
print("child started", flush=True)
if mode == "train":
    for epoch in range(1, 6):
        send_event(conn, "epoch", round=0, epoch=epoch, loss=1.0 / epoch)
        time.sleep(0.02)
    send_event(conn, "end", round=0, metrics={"accuracy": 0.9})
    sys.exit(0)
if mode == "crash":
    send_event(conn, "status", status=4, error="boom: the trainer exploded")
    sys.exit(3)
if mode == "obedient":
    start_command_listener(client, conn, os.getppid())
    client.stop.wait(60)
    sys.exit(0)
while True:
    time.sleep(1)
'''

PARENT = """
import sys, time
from pathlib import Path
from fedclient.client_executor import ProcessExecutor, TrainArgs

executor = ProcessExecutor(worker_module="child_worker")
print(executor.start_train(None, TrainArgs(Path(sys.argv[1]), 1), Path(sys.argv[2])), flush=True)
time.sleep(600)
"""


@pytest.fixture
def child(tmp_path, monkeypatch):
    """(workspace, make_mmar(mode)): the test worker on PYTHONPATH, a site workspace for it."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "child_worker.py").write_text(textwrap.dedent(CHILD))
    monkeypatch.setenv("PYTHONPATH", str(code) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workspace = tmp_path / "site-1"
    workspace.mkdir()

    def make_mmar(mode: str) -> Path:
        mmar = workspace / "run_1" / "mmar"
        (mmar / "custom").mkdir(parents=True, exist_ok=True)
        (mmar / "mode").write_text(mode)
        return mmar

    return workspace, make_mmar


@pytest.fixture
def executors():
    """Executors a test made; each is closed at teardown so no child outlives a failing test."""
    made: list[ProcessExecutor] = []
    yield made
    for executor in made:
        executor.close()


def _executor(executors, events=None, grace: float = 3.0) -> ProcessExecutor:
    executor = ProcessExecutor(
        on_event=None if events is None else events.append, grace=grace, worker_module="child_worker"
    )
    executors.append(executor)
    return executor


def _child_info(workspace: Path, timeout: float = 30, name: str = "child.json", run: int = 1) -> dict:
    path = workspace / f"run_{run}" / name
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    return json.loads(path.read_text())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if not _gone(p)]}"
        time.sleep(0.05)


def test_progress_messages_arrive_and_a_clean_exit_is_training_stopped(child, executors):
    workspace, make_mmar = child
    events: list[dict] = []
    executor = _executor(executors, events)
    executor.start_train(None, TrainArgs(workspace, 1), make_mmar("train"))
    assert executor.check_status(None) in ("training starting", "training started")
    assert executor.wait_process_complete(None, timeout=30) == ClientStatus.TRAINING_STOPPED
    kinds = [e["kind"] for e in events]
    assert kinds.count("epoch") == 5 and "end" in kinds and kinds[-1] == "exit"
    assert all(e["run_number"] == 1 for e in events)
    assert executor.progress == {"round": 0, "epoch": 5, "loss": 0.2, "metrics": {"accuracy": 0.9}}
    assert events[-1] == {
        "kind": "exit",
        "run_number": 1,
        "status": ClientStatus.TRAINING_STOPPED,
        "exit_code": 0,
        "error": "",
    }
    info = _child_info(workspace)
    assert info["pythonpath"].split(os.pathsep)[0] == str((workspace / "run_1" / "mmar" / "custom").resolve())
    assert info["cwd"] == str((workspace / "run_1").resolve())
    assert "child started" in (workspace / "run_1" / "logs" / "worker.log").read_text()


def _environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def _key_nowhere(key: bytes, pids: list[int]) -> None:
    """Neither the key nor its hex is in these processes' environments (as /proc shows them) or command lines."""
    for pid in pids:
        seen = _environ(pid) + b"\0".join(a.encode() for a in psutil.Process(pid).cmdline())
        assert key.hex().encode() not in seen and key not in seen, f"the key is readable in /proc/{pid}"


def test_the_authkey_is_in_no_environment_nor_command_line_of_the_worker_or_its_children(child, executors):
    """Hardening issue 18 (degraded): the worker's auth key was popped from os.environ but stayed readable in
    /proc/PID/environ; it reaches the worker on an inherited pipe now."""
    workspace, make_mmar = child
    executor = _executor(executors, grace=0.5)
    pid = executor.start_train(None, TrainArgs(workspace, 1), make_mmar("hang"))
    info = _child_info(workspace)
    key = executor._launch.authkey
    assert len(key) == 32
    _key_nowhere(key, [pid, info["grandchild"]])
    assert info["key_source"].startswith("fd:") and not info["key_left_in_env"]
    fd = int(info["key_source"][3:])
    assert not os.path.exists(f"/proc/{pid}/fd/{fd}"), "the worker closed the pipe once it read the key"
    executor.abort_train(None)


def test_the_key_file_for_ranks_is_private_and_gone_once_closed(monkeypatch):
    """Hardening issue 18 (degraded): the file torchrun's ranks read the key from is 0600 in a 0700 folder."""
    from fedclient.executor_channel import KeyHandoff, read_parent_key

    key = os.urandom(32)
    handoff = KeyHandoff(key, by_file=True)
    path = Path(handoff.env[KEY_SOURCE_ENV])
    assert handoff.pass_fds == () and path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv(KEY_SOURCE_ENV, str(path))
    assert read_parent_key() == key and KEY_SOURCE_ENV not in os.environ
    handoff.close()
    assert not path.parent.exists()
    with pytest.raises(ValueError, match=KEY_SOURCE_ENV):
        read_parent_key()


@pytest.mark.e2e
def test_torchrun_ranks_read_the_key_from_a_private_file_that_is_gone_once_they_connected(child, executors):
    """Hardening issue 18 (degraded), for torchrun launches: its ranks inherit no pipe (torchrun starts them with
    close_fds), so they read the key from a 0600 file in a private folder, deleted once every rank connected."""
    workspace, make_mmar = child
    executor = _executor(executors, grace=0.5)
    pid = executor.start_mgpu_train(None, TrainArgs(workspace, 1), make_mmar("hang"), 2)
    ranks = [_child_info(workspace, 90, f"child{rank}.json") for rank in (0, 1)]
    deadline = time.monotonic() + 30
    while len(executor._launch.conns) < 2 or os.path.exists(ranks[0]["key_source"]):
        assert time.monotonic() < deadline, "the ranks never connected, or the key file stayed"
        time.sleep(0.05)
    source = Path(ranks[0]["key_source"])
    assert all(r["key_source"] == str(source) for r in ranks) and not source.parent.exists()
    assert not str(source).startswith(str(workspace)), "never in the workspace, where `shell cat` reads"
    launch = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    assert {r["pid"] for r in ranks} <= set(launch)
    _key_nowhere(executor._launch.authkey, launch)
    executor.abort_train(None)
    assert executor.status == ClientStatus.TRAINING_STOPPED


def test_abort_kills_whole_process_group_including_a_grandchild(child, executors):
    workspace, make_mmar = child
    executor = _executor(executors)
    pid = executor.start_train(None, TrainArgs(workspace, 1), make_mmar("hang"))
    info = _child_info(workspace)
    assert info["pgid"] == pid, "the worker leads its own process group"
    assert psutil.Process(info["grandchild"]).is_running()
    started = time.monotonic()
    executor.abort_train(None)  # the child and grandchild ignore the message and SIGTERM: only SIGKILL works
    assert time.monotonic() - started < 8
    assert _gone(pid) and _gone(info["grandchild"])
    assert group_members(pid) == []
    assert executor.status == ClientStatus.TRAINING_STOPPED


def test_the_abort_message_stops_an_obedient_worker_without_signals(child, executors, monkeypatch):
    # Time enough for a loaded machine to deliver the message before SIGTERM; exit code 0 shows no signal ended it.
    monkeypatch.setattr(client_executor, "ABORT_MESSAGE_WAIT_S", 30.0)
    workspace, make_mmar = child
    executor = _executor(executors)
    executor.start_train(None, TrainArgs(workspace, 1), make_mmar("obedient"))
    _child_info(workspace)
    executor.abort_train(None)
    assert executor.exit_code == 0
    assert executor.status == ClientStatus.TRAINING_STOPPED


def test_a_crash_is_a_training_exception_with_the_workers_error_and_leaves_no_process(child, executors):
    workspace, make_mmar = child
    events: list[dict] = []
    executor = _executor(executors, events)
    pid = executor.start_train(None, TrainArgs(workspace, 1), make_mmar("crash"))
    assert executor.wait_process_complete(None, timeout=30) == ClientStatus.TRAINING_EXCEPTION
    info = _child_info(workspace)
    _wait_gone([info["grandchild"]], 5)
    assert group_members(pid) == []
    assert executor.error == "boom: the trainer exploded"
    assert events[-1]["exit_code"] == 3 and events[-1]["error"] == "boom: the trainer exploded"


def test_a_worker_that_dies_before_connecting_is_reported(child, executors):
    workspace, make_mmar = child
    executor = ProcessExecutor(worker_module="no_such_worker_module")
    executors.append(executor)
    executor.start_train(None, TrainArgs(workspace, 1), make_mmar("train"))
    assert executor.wait_process_complete(None, timeout=30) == ClientStatus.TRAINING_EXCEPTION
    assert "exited with code 1" in executor.error
    assert "No module named no_such_worker_module" in (workspace / "run_1" / "logs" / "worker.log").read_text()


def test_start_is_refused_while_training(child, executors):
    workspace, make_mmar = child
    executor = _executor(executors, grace=0.5)
    executor.start_train(None, TrainArgs(workspace, 1), make_mmar("hang"))
    with pytest.raises(TrainingError, match="run 1 is already training"):
        executor.start_train(None, TrainArgs(workspace, 1), make_mmar("hang"))
    executor.abort_train(None)
    executor.start_train(None, TrainArgs(workspace, 1), make_mmar("obedient"))
    executor.abort_train(None)


def test_the_worker_and_its_children_exit_when_the_parent_dies(child, tmp_path):
    workspace, make_mmar = child
    mmar = make_mmar("hang")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(workspace), str(mmar)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    worker_pid = None
    try:
        worker_pid = int(parent.stdout.readline())
        info = _child_info(workspace)
        assert info["pid"] == worker_pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        _wait_gone([worker_pid, info["grandchild"]], 10)
        assert group_members(worker_pid) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if worker_pid is not None and group_members(worker_pid):
            os.killpg(worker_pid, signal.SIGKILL)  # only on failure: the group this test started


# ---- the real worker against a real in-process server ------------------------------------------------------


@pytest.fixture
def federation(tmp_path):
    """A running in-process server with run 1 of the digits example (one site needed, one round)."""
    from fedcommon.kit import load_kit
    from fedserver.server import FederationServer

    ws = prepare_workspace(tmp_path / "ws", clients=1)
    mmar = copy_mmar(
        tmp_path / "mmar",
        server={"min_num_clients": 1, "num_rounds": 1, "wait_after_min_clients": 0},
        train_args={"num_sites": 1, "epochs_per_round": 2},
    )
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, admin_port=0)
    server.start_run(mmar)
    server.start()
    site = ws / "site-1"
    _point_kit_at(site, server.fl_port)
    deployed = copy_mmar(site / "run_1" / "mmar", src=mmar)
    yield server, site, deployed
    server.stop(0)


def _point_kit_at(site: Path, fl_port: int) -> None:
    config_path = site / "startup" / "fed.json"
    config = json.loads(config_path.read_text())
    config["server"]["fl_port"] = fl_port
    config_path.write_text(json.dumps(config))


@pytest.mark.e2e
def test_the_real_worker_trains_the_run_and_reports_progress(federation, executors):
    server, site, mmar = federation
    events: list[dict] = []
    executor = ProcessExecutor(on_event=events.append)
    executors.append(executor)
    executor.start_train(None, TrainArgs(site, 1), mmar)
    assert executor.wait_process_complete(None, timeout=180) == ClientStatus.TRAINING_STOPPED, (
        site / "run_1" / "logs" / "worker.log"
    ).read_text()
    kinds = [e["kind"] for e in events]
    assert {"status", "round", "epoch", "end"} <= set(kinds) and kinds[-1] == "exit"
    assert executor.progress["epoch"] == 2 and "accuracy" in executor.progress["metrics"]
    log_text = (site / "run_1" / "logs" / "worker.log").read_text()
    assert "site-1: run 1 finished" in log_text
    assert not (site / "log.txt").exists(), "under an agent the worker logs to run_N/logs/worker.log only"


@pytest.mark.e2e
def test_abort_of_the_real_worker_leaves_no_process(federation, executors):
    """Also hardening issue 18 (degraded): the real worker's /proc/PID/environ does not hold its key."""
    server, site, mmar = federation
    config = mmar / "config" / "config_train.json"
    train = json.loads(config.read_text())
    train["trainer"]["args"]["epochs_per_round"] = 100000
    config.write_text(json.dumps(train))
    executor = ProcessExecutor()
    executors.append(executor)
    pid = executor.start_train(None, TrainArgs(site, 1), mmar)
    deadline = time.monotonic() + 120
    while "epoch" not in executor.progress:
        worker_log = site / "run_1" / "logs" / "worker.log"
        assert time.monotonic() < deadline and executor.is_training(), worker_log.read_text()
        time.sleep(0.1)
    _key_nowhere(executor._launch.authkey, [pid])
    started = time.monotonic()
    executor.abort_train(None)
    assert time.monotonic() - started < 10
    assert _gone(pid) and group_members(pid) == []
    assert executor.status == ClientStatus.TRAINING_STOPPED


@pytest.mark.e2e
def test_the_thread_executor_trains_the_run_in_this_process(federation):
    server, site, mmar = federation
    done = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        executor = ThreadExecutor(None, pool, on_event=lambda e: e["kind"] == "exit" and done.set())
        assert executor.start_train(None, TrainArgs(site, 1), mmar) == os.getpid()
        assert executor.wait_training_process_finish(None, timeout=180)
    assert done.is_set()
    assert executor.status == ClientStatus.TRAINING_STOPPED, executor.error
    assert executor.progress["epoch"] == 2 and "accuracy" in executor.progress["metrics"]


@pytest.mark.e2e
def test_the_thread_executor_trains_the_federated_client_it_was_given(federation):
    from fedclient.fed_client import FederatedClient
    from fedclient.worker import kit_ssl_args
    from fedcommon.kit import load_kit

    server, site, mmar = federation
    kit = load_kit(site)
    own_events: list[dict] = []
    client = FederatedClient(
        kit.name,
        kit_ssl_args(kit),
        True,
        server_args=[{"name": "digits", "target": kit.fl_target}],
        on_progress=own_events.append,
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        executor = ThreadExecutor(client, pool)
        assert executor.start_train(None, TrainArgs(site, 1), mmar) == os.getpid()
        assert executor.check_status(client) in ("training starting", "training started")
        assert executor.wait_training_process_finish(None, timeout=180)
    assert executor.check_status(client) == "training stopped", executor.error
    assert client.status == ClientStatus.TRAINING_STOPPED and client.final_metrics
    assert [e["kind"] for e in own_events].count("end") == 1 and executor.progress["epoch"] == 2


def test_check_status_is_the_status_message_the_seed_documents():
    executor = ProcessExecutor()
    assert executor.check_status(None) == "training not started"
    executor.status = ClientStatus.TRAINING_EXCEPTION
    assert executor.check_status(None) == "training exception"


def test_the_thread_executor_starts_one_gpu_as_start_train_and_refuses_more_saying_why(tmp_path):
    with ThreadPoolExecutor(max_workers=1) as pool:
        executor = ThreadExecutor(None, pool)
        with pytest.raises(
            TrainingError,
            match="ThreadExecutor trains in this process, on one GPU; 2 GPUs need one "
            "process per rank: use the ProcessExecutor",
        ):
            executor.start_mgpu_train(None, TrainArgs(tmp_path, 1), tmp_path, 2)
        with pytest.raises(TrainingError, match="must be a whole number >= 1, got 0"):
            executor.start_mgpu_train(None, TrainArgs(tmp_path, 1), tmp_path, 0)
        # One GPU goes the way of start_train: here it stops at the workspace, which holds no startup kit.
        with pytest.raises(TrainingError) as err:
            executor.start_mgpu_train(None, TrainArgs(tmp_path, 1), tmp_path, 1)
        assert "GPU" not in str(err.value) and executor.status == ClientStatus.TRAINING_EXCEPTION


# ---- several runs at once on one site (issue 22) ----------------------------------------------------------


class _Results:
    """A sender of results that keeps them (the interface forwards progress and training_ended)."""

    def __init__(self):
        self.sent: list = []

    def send_result(self, message) -> None:
        self.sent.append(message)


def _site_with_runs(workspace: Path, runs: tuple[int, ...], resources: dict) -> ClientAdminInterface:
    """An interface for the site in `workspace` with `resources` declared and the test worker deployed as `runs`."""
    (workspace / "local").mkdir(exist_ok=True)
    (workspace / "local" / "resources.json").write_text(json.dumps(resources))
    for run in runs:
        mmar = workspace / f"run_{run}" / "mmar"
        for folder in ("config", "custom"):
            (mmar / folder).mkdir(parents=True, exist_ok=True)
        (mmar / "mode").write_text("obedient")
    return ClientAdminInterface(
        None,
        "site-1",
        _Results(),
        argparse.Namespace(workspace=workspace),
        0,
        executor_factory=lambda on_event: ProcessExecutor(on_event=on_event, grace=0.5, worker_module="child_worker"),
    )


def _by_run(status: dict) -> dict[int, dict]:
    return {entry["run_number"]: entry for entry in status["runs"]}


@pytest.mark.parametrize(
    ("resources", "given"),
    [
        ({"cpu_slots": 2}, {1: "", 2: "", 3: ""}),
        (
            {"gpus": [{"id": "7", "memory_mib": 1024}, {"id": "GPU-5e1f", "memory_mib": 2048}]},
            {1: "7", 2: "GPU-5e1f", 3: "7"},
        ),
    ],
    ids=["cpu-slots", "gpus"],
)
def test_two_runs_train_at_once_each_with_its_own_gpus_and_aborting_one_leaves_the_other(
    child, monkeypatch, resources, given
):
    workspace, _ = child
    # The host shows no GPU: only what the site declares counts. A worker on CPU slots inherits this "".
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    interface = _site_with_runs(workspace, (1, 2, 3), resources)
    pids: dict[int, int] = {}
    try:
        for run in (1, 2):
            pids[run] = interface.start_client(run)["pid"]
        info = {run: _child_info(workspace, run=run) for run in (1, 2)}
        assert {run: i["cuda_visible_devices"] for run, i in info.items()} == {1: given[1], 2: given[2]}
        assert group_members(pids[1]) == [pids[1]] and group_members(pids[2]) == [pids[2]]
        held = {
            run: entry.get("gpus", entry.get("cpu_slots")) for run, entry in _by_run(interface.client_status()).items()
        }
        assert held == ({1: [given[1]], 2: [given[2]]} if given[1] else {1: 1, 2: 1})

        with pytest.raises(RequestRefused) as refused:
            interface.start_client(3)
        if given[1]:
            assert str(refused.value) == (
                "site-1: 2 GPUs (7, GPU-5e1f), in use by run 1 (7), run 2 (GPU-5e1f); "
                "run 3 needs 1 (local/resources.json gpus)"
            )
        else:
            assert str(refused.value) == (
                "site-1: 2 CPU slots, in use by run 1, run 2; run 3 needs 1 (local/resources.json cpu_slots)"
            )

        assert interface.abort_run(1) == {"run_number": 1, "status": "training stopped"}
        assert group_members(pids[1]) == []
        runs = _by_run(interface.client_status())
        assert runs[1]["status_code"] == ClientStatus.TRAINING_STOPPED and "gpus" not in runs[1]
        deadline = time.monotonic() + 30  # run 2's worker says it started once it is up (slow on a loaded host)
        while runs[2]["status_code"] == ClientStatus.TRAINING_STARTING and time.monotonic() < deadline:
            time.sleep(0.1)
            runs = _by_run(interface.client_status())
        assert runs[2]["status_code"] == ClientStatus.TRAINING_STARTED
        assert group_members(pids[2]) == [pids[2]], "aborting run 1 leaves run 2 running"

        pids[3] = interface.start_client(3)["pid"]  # on what run 1 gave back
        assert _child_info(workspace, run=3)["cuda_visible_devices"] == given[3]
        report = interface.resources_report()
        if given[1]:
            assert [(g["id"], g["in_use_by"]) for g in report["gpus"]] == [("7", 3), ("GPU-5e1f", 2)]
        else:
            assert report["cpu_slots_in_use"] == {"2": 1, "3": 1}
    finally:
        interface.close()
    assert all(group_members(pid) == [] for pid in pids.values()), "close() leaves no process of any run"
    assert interface.client_status()["runs"] and all(
        entry["status_code"] == ClientStatus.TRAINING_STOPPED for entry in interface.client_status()["runs"]
    )

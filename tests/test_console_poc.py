"""`fedadmin poc start|stop|run` without a real federation: process groups, poc.json, workspace refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import psutil
import pytest
from conftest import ROOT, copy_mmar, prepare_workspace, python_env, run_fedadmin

from fedadmin import local_federation
from fedadmin.commands.poc.run import MARKER, fresh_workspace
from fedadmin.local_federation import FederationError, Participant

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def teller(after: float = 0.0, then: str = "time.sleep(600)") -> list[str]:
    """A participant that says on its ready pipe, after `after` seconds, that it is ready, as fedserver and fedclient
    do, then runs `then`."""
    code = (
        f"import os, sys, time\ntime.sleep({after})\nfd = int(os.environ['FEDLEARN_READY_FD'])\n"
        f"os.write(fd, b'ready\\n')\nos.close(fd)\n{then}"
    )
    return [sys.executable, "-c", code]


# Ignores SIGTERM and starts a child in a session of its own (as an agent starts a training worker),
# which ignores SIGTERM too: only SIGKILL, to the parent and to the child found through it, ends both.
STUBBORN = [
    sys.executable,
    "-c",
    textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(600)
        """
    ),
]


def fedadmin(*args: str) -> subprocess.CompletedProcess[str]:
    return run_fedadmin(*args)


def launch_detached(ws: Path, argv_by_name: dict[str, list[str]]) -> None:
    """Launch from a short-lived process, as `poc start` does, so the processes outlive their launcher."""
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom fedadmin.local_federation import launch\n"
        "for name, argv in json.loads(sys.argv[2]).items():\n    launch(Path(sys.argv[1]), name, argv)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(ws), json.dumps(argv_by_name)],
        cwd=ROOT,
        env=python_env(),
        check=True,
        timeout=60,
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_line(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return text.strip()
        time.sleep(0.05)
    raise AssertionError(f"nothing in {path}")


@pytest.fixture
def ws(tmp_path) -> Path:
    return prepare_workspace(tmp_path / "ws", clients=2)


def test_poc_stop_kills_every_recorded_group_and_a_worker_in_its_own_group(ws):
    launch_detached(ws, {"server": SLEEPER, "site-1": STUBBORN, "site-2": SLEEPER})
    records = {r.name: r for r in local_federation.read_records(ws)}
    assert list(records) == ["server", "site-1", "site-2"]
    worker = int(wait_for_line(ws / "site-1" / "console.txt"))
    assert all(alive(r.pid) for r in records.values()) and alive(worker)

    result = fedadmin("--json", "poc", "stop", "--workspace", str(ws), "--grace", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    outcomes = {p["name"]: p["outcome"] for p in report["processes"]}
    assert outcomes == {"server": "stopped", "site-1": "killed", "site-2": "stopped"}
    assert not any(alive(r.pid) for r in records.values())
    assert not alive(worker)
    assert not (ws / "poc.json").exists()


def test_poc_stop_without_a_record_says_so(ws):
    result = fedadmin("poc", "stop", "--workspace", str(ws))
    assert result.returncode == 1
    assert "poc.json is missing" in result.stderr


def test_start_returns_once_ready_and_refuses_to_start_twice(ws):
    calls = []

    def ready(sites: list[str]) -> str | None:
        calls.append(sites)
        return None if len(calls) >= 3 else "site-2 not connected"

    records = local_federation.start(ws, ready, timeout=30, argv_for=lambda p: teller())
    try:
        assert [r.name for r in records] == ["server", "site-1", "site-2"]
        assert calls[-1] == ["site-1", "site-2"]
        for r in records:
            assert os.getpgid(r.pid) == r.pid  # its own process group
            assert Path(r.console).parent == ws / r.name
        with pytest.raises(FederationError, match="already running"):
            local_federation.start(ws, ready, timeout=30, argv_for=lambda p: SLEEPER)
    finally:
        stopped = local_federation.stop(ws, grace=5)
    assert {s.outcome for s in stopped} == {"stopped"}
    assert not any(alive(r.pid) for r in records)


def test_start_stops_everything_when_a_participant_exits_during_start_up(ws):
    def argv_for(p: Participant) -> list[str]:
        return [sys.executable, "-c", "import sys; print('bad kit'); sys.exit(3)"] if p.name == "site-2" else SLEEPER

    with pytest.raises(FederationError, match=r"site-2 exited during start-up; see .*site-2/console.txt") as info:
        local_federation.start(ws, lambda sites: "not yet", timeout=30, argv_for=argv_for)
    assert "log.txt" in str(info.value)
    assert "bad kit" in (ws / "site-2" / "console.txt").read_text()
    assert not (ws / "poc.json").exists()


def test_start_returns_only_once_every_participant_has_said_it_is_ready(ws):
    asked: list[float] = []

    def ready(sites: list[str]) -> str | None:
        asked.append(time.monotonic())
        return None

    started = time.monotonic()
    argv = {"server": teller(), "site-1": teller(), "site-2": teller(after=1.5)}
    records = local_federation.start(ws, ready, timeout=30, argv_for=lambda p: argv[p.name])
    try:
        # The server is not asked before the slowest participant said it is ready, then at once.
        assert asked and min(asked) - started >= 1.5
        assert time.monotonic() - started < 1.5 + 2.0
        assert all(alive(r.pid) for r in records)
    finally:
        local_federation.stop(ws, grace=5)


def test_start_fails_with_the_participants_own_error_when_it_does_not_start(ws):
    fine = teller()
    argv = {
        "server": fine,
        "site-1": [
            sys.executable,
            "-c",
            "import sys; print('starting'); print('fedclient: no such kit', file=sys.stderr); sys.exit(3)",
        ],
        "site-2": fine,
    }
    started = time.monotonic()
    with pytest.raises(FederationError) as info:
        local_federation.start(ws, lambda sites: None, timeout=30, argv_for=lambda p: argv[p.name])
    message = str(info.value)
    assert message.startswith("site-1 exited during start-up; see ")
    assert message.endswith("it said: fedclient: no such kit")
    assert time.monotonic() - started < 10  # its end was seen, not waited out
    assert not (ws / "poc.json").exists()


def test_start_times_out_with_the_reason_and_the_log_paths(ws):
    with pytest.raises(FederationError, match=r"not ready within 1s: site-2 not connected; logs: .*server/log.txt"):
        local_federation.start(ws, lambda sites: "site-2 not connected", timeout=1, argv_for=lambda p: SLEEPER)
    assert not (ws / "poc.json").exists()


def test_poc_run_refuses_a_non_empty_workspace_it_did_not_make(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = fedadmin("poc", "run", str(ROOT / "examples" / "digits"), "--workspace", str(foreign))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not made by `fedadmin poc run`" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_poc_run_refuses_a_folder_that_is_no_mmar(tmp_path):
    result = fedadmin("poc", "run", str(tmp_path), "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2
    assert not (tmp_path / "ws").exists()


def test_fresh_workspace_replaces_one_an_earlier_poc_run_made(tmp_path):
    ws = tmp_path / "ws"
    fresh_workspace(ws)
    (ws / "server").mkdir()
    fresh_workspace(ws)
    assert sorted(p.name for p in ws.iterdir()) == [MARKER]
    (ws / "poc.json").write_text("not json")
    with pytest.raises(FederationError):
        fresh_workspace(ws)
    (ws / MARKER).unlink()
    with pytest.raises(click.UsageError):
        fresh_workspace(ws)


@pytest.mark.e2e
def test_poc_run_trains_an_mmar_reports_every_round_and_leaves_no_process(tmp_path):
    mmar = copy_mmar(tmp_path / "mmar", server={"num_rounds": 2})
    ws = tmp_path / "ws"
    result = fedadmin("--json", "poc", "run", str(mmar), "--clients", "2", "--workspace", str(ws))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["command"], report["ok"], report["status"]) == ("poc run", True, "completed")
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert all(r["contributors"] == ["site-1", "site-2"] for r in report["rounds"])
    assert sorted(report["final_metrics"]) == ["site-1", "site-2"]
    assert {p["name"] for p in report["processes"]} == {"server", "site-1", "site-2"}
    assert not (ws / "poc.json").exists()
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(ws) in " ".join(p.info["cmdline"] or [])]
    assert [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE] == []

    # Afterwards, as the run's closing lines suggest: the same federation again, and what happened, from the console.
    assert fedadmin("poc", "start", "--workspace", str(ws)).returncode == 0
    try:
        kit = ["--json", "--kit", str(ws / "admin")]
        per_round = json.loads(fedadmin(*kit, "metrics").stdout)
        assert per_round["ok"] and [r["round"] for r in per_round["records"]] == [0, 1, "final"]
        assert all(set(r["sites"]) == {"site-1", "site-2"} for r in per_round["records"])
        worker = json.loads(fedadmin(*kit, "logs", "site-1", "--run", "1").stdout)
        assert worker["ok"] and any("site-1: run 1 finished" in line for line in worker["lines"])
    finally:
        assert fedadmin("poc", "stop", "--workspace", str(ws)).returncode == 0


@pytest.mark.e2e
def test_poc_start_returns_with_every_site_connected_or_fails_with_the_sites_own_error(ws):
    started = fedadmin("--json", "poc", "start", "--workspace", str(ws))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        status = json.loads(fedadmin("--json", "--kit", str(ws / "admin"), "status", "server").stdout)
        (server,) = status["replies"]
        assert sorted(server["connected_sites"]) == ["site-1", "site-2"]  # no wait between start and use
    finally:
        assert fedadmin("poc", "stop", "--workspace", str(ws)).returncode == 0

    (ws / "site-2" / "startup" / "cert.pem").unlink()
    failed = fedadmin("poc", "start", "--workspace", str(ws))
    assert failed.returncode != 0
    said = " ".join(failed.stderr.split())
    assert "site-2 exited during start-up" in said and "it said: fedclient: " in said and "cert.pem" in said, said
    assert not (ws / "poc.json").exists()


class _MetricsServer:
    """A connection whose server answers `metrics` with the rounds closed so far (none: the run has not started)."""

    def __init__(self) -> None:
        self.rounds: list[dict] | None = None
        self.asked: list[tuple] = []

    def execute(self, command, targets, args=None):
        from fedcommon.outcome import CommandOutcome, TargetReply

        self.asked.append((command, targets, args))
        if self.rounds is None:
            return CommandOutcome(command, True, [TargetReply("server", False, error="run 1 has no metrics")])
        data = {"run_number": 1, "run_status": "training", "rounds": self.rounds, "final": None}
        return CommandOutcome(command, True, [TargetReply("server", True, data)])


def test_poc_run_prints_each_round_once_as_the_servers_metrics_show_it_closed():
    from fedadmin.commands.poc.run import _Rounds

    server, lines, rounds = _MetricsServer(), [], _Rounds()
    rounds.show_new(server, lines.append)
    assert lines == [] and rounds.record == {}
    server.rounds = [
        {
            "round": 0,
            "contributors": ["site-1", "site-2"],
            "duration_s": 2.0,
            "sites": {"site-1": {"accuracy": 0.5}, "site-2": {"accuracy": 0.75}},
            "rejected": [{"site": "site-3", "reason": "stale"}],
        }
    ]
    rounds.show_new(server, lines.append)
    rounds.show_new(server, lines.append)
    assert lines == [
        "round 0: contributors site-1, site-2 (2.0s); global model as each site measured it:",
        "    site-1: accuracy=0.5000",
        "    site-2: accuracy=0.7500",
        "    refused site-3: stale",
    ]
    assert server.asked[-1] == ("metrics", ["server"], {"run_number": 1})
    server.rounds = [*server.rounds, {"round": 1, "contributors": ["site-1"], "duration_s": 1.0, "sites": {}}]
    rounds.show_new(server, lines.append)
    assert lines[4:] == ["round 1: contributors site-1 (1.0s); global model as each site measured it:"]


@pytest.mark.e2e
def test_poc_stop_stops_a_server_restarted_by_hand_after_a_crash(tmp_path):
    """Issue 19 item 6: the server crashes (SIGKILL) and is restarted by hand with `fedserver start`; `poc stop`
    stops that server too, by the pid file it wrote itself, and the site `poc start` launched."""
    from conftest import server_process

    from fedcommon.pid_file import read_pid_file

    ws = prepare_workspace(tmp_path / "ws", clients=1)
    started = fedadmin("poc", "start", "--workspace", str(ws))
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        recorded = {r.name: r for r in local_federation.read_records(ws)}
        for name in ("server", "site-1"):  # each participant records itself
            assert read_pid_file(ws / name).pid == recorded[name].pid
        crashed = psutil.Process(recorded["server"].pid)
        crashed.kill()  # ours: poc start launched it for this test
        deadline = time.monotonic() + 30
        while alive(crashed.pid):
            assert time.monotonic() < deadline, "the killed server is still there"
            time.sleep(0.1)
        with server_process(ws / "server") as by_hand:
            assert read_pid_file(ws / "server").pid == by_hand.pid
            result = fedadmin("--json", "poc", "stop", "--workspace", str(ws), "--grace", "20")
            assert result.returncode == 0, result.stdout + result.stderr
            assert by_hand.wait(30) == 0  # SIGTERM: a clean exit
        outcomes = {(p["name"], p["pid"]): p["outcome"] for p in json.loads(result.stdout)["processes"]}
        assert outcomes == {
            ("server", crashed.pid): "not running",
            ("site-1", recorded["site-1"].pid): "stopped",
            ("server", by_hand.pid): "stopped",
        }
        assert not alive(recorded["site-1"].pid)
        assert not (ws / "server" / "pid.json").exists() and not (ws / "site-1" / "pid.json").exists()
    finally:
        if (ws / "poc.json").exists():
            local_federation.stop(ws, grace=5)


def test_poc_stop_never_signals_a_process_that_a_stale_pid_file_names(ws):
    """Issue 19 item 6: a participant's pid file left behind names a pid now used by another program (another start
    time), or a live process with another command line: `poc stop` leaves that process alone and clears the stale
    files."""
    stranger = subprocess.Popen(SLEEPER)
    try:
        proc = psutil.Process(stranger.pid)
        reused = {"pid": stranger.pid, "create_time": proc.create_time() - 100, "cmdline": proc.cmdline()}
        (ws / "server" / "pid.json").write_text(json.dumps(reused))
        other = [sys.executable, "-m", "fedclient.cli", "start", "--workspace", str(ws / "site-1")]
        (ws / "site-1" / "pid.json").write_text(
            json.dumps({**reused, "create_time": proc.create_time(), "cmdline": other})
        )
        nothing = fedadmin("poc", "stop", "--workspace", str(ws))
        assert nothing.returncode == 1 and "poc.json is missing" in nothing.stderr
        launch_detached(ws, {"site-2": SLEEPER})
        result = fedadmin("--json", "poc", "stop", "--workspace", str(ws), "--grace", "5")
        assert result.returncode == 0, result.stdout + result.stderr
        assert [p["name"] for p in json.loads(result.stdout)["processes"]] == ["site-2"]
        assert alive(stranger.pid)
        assert not (ws / "server" / "pid.json").exists() and not (ws / "site-1" / "pid.json").exists()
    finally:
        stranger.kill()
        stranger.wait(10)

"""End to end through the console: a real server and two real site agents driven by `fedadmin` subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, copy_mmar, prepare_workspace, python_env, run_fedadmin

from fedcommon.safe_zip import zip_folder

pytestmark = pytest.mark.e2e


def fedadmin(ws: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_fedadmin(*args, kit=ws / "admin", timeout=timeout)


def ok_json(ws: Path, *args: str, timeout: float = 300) -> dict:
    result = fedadmin(ws, "--json", *args, timeout=timeout)
    assert result.returncode == 0, f"fedadmin {' '.join(args)}: {result.stdout}{result.stderr}"
    out = json.loads(result.stdout)
    assert out["ok"] is True
    return out


def replies(out: dict) -> dict[str, dict]:
    return {r["target"]: r for r in out["replies"]}


def workers_of(ws: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "fedclient.worker" in cmd and str(ws) in cmd:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
    return found


def _wait_status(ws: Path, site: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (now := replies(ok_json(ws, "status", site))[site])["status"] != status:
        assert time.monotonic() < deadline, f"{site} never reached {status!r}: {now}"
        time.sleep(0.3)


@pytest.fixture
def federation(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    started = fedadmin(ws, "poc", "start", "--workspace", str(ws), timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield ws
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), timeout=120)


def test_operator_session_deploys_trains_inspects_aborts_and_shuts_down(federation, tmp_path):
    ws = federation
    status = replies(ok_json(ws, "status"))
    assert set(status) == {"server", "site-1", "site-2"}
    assert status["site-1"]["status"] == "training not started"

    refused = fedadmin(ws, "--json", "deploy", str(ROOT / "examples" / "digits"), "all")
    assert refused.returncode == 1
    assert "set-run" in refused.stdout

    mmar = copy_mmar(tmp_path / "mmar", server={"num_rounds": 2})
    archive = zip_folder(mmar, tmp_path / "digits.zip")
    ok_json(ws, "set-run", "1")
    deployed = replies(ok_json(ws, "deploy", str(archive), "all"))
    assert deployed["site-2"]["run_number"] == 1
    ok_json(ws, "start", "all")
    twice = fedadmin(ws, "--json", "start", "site-1")
    assert twice.returncode == 1 and "already" in twice.stdout
    ok_json(ws, "wait", "--timeout", "240", timeout=300)
    status = replies(ok_json(ws, "status"))
    assert status["server"]["run_status"] == "completed"
    assert status["site-1"]["run_number"] == 1
    # Issue 19 item 3: wait returned once the run was finished everywhere, not only at the server.
    assert {status[s]["status"] for s in ("site-1", "site-2")} == {"training stopped"}, status
    summary = json.loads((ws / "server" / "run_1" / "summary.json").read_text())
    assert [r["contributors"] for r in summary["rounds"]] == [["site-1", "site-2"]] * 2

    info = replies(ok_json(ws, "sysinfo"))
    assert info["site-1"]["cpu_count"] >= 1 and "memory_total" in info["server"]
    listing = replies(ok_json(ws, "shell", "site-1", "ls", "run_1"))["site-1"]
    assert "mmar" in listing["stdout"]
    key = fedadmin(ws, "--json", "shell", "site-1", "cat", "startup/key.pem")
    assert key.returncode == 1 and "PRIVATE KEY" not in key.stdout
    escape = fedadmin(ws, "--json", "shell", "site-1", "cat", "../server/startup/fed.json")
    assert escape.returncode == 1 and "outside" in escape.stdout

    # What happened, from the console: the site's own log, its worker's log of the run, the learning curves.
    agent_log = ok_json(ws, "logs", "site-1", "--lines", "20")
    assert agent_log["file"] == "log.txt" and 0 < len(agent_log["lines"]) <= 20
    assert any("training worker" in line for line in agent_log["lines"]), agent_log["lines"]
    worker_log = ok_json(ws, "logs", "site-1", "--run", "1", "--lines", "2000")
    assert any("run 1 finished" in line for line in worker_log["lines"]), worker_log["lines"][-5:]
    server_log = ok_json(ws, "logs", "server", "--level", "info", "--lines", "50")
    assert any("round 1 closed" in line for line in server_log["lines"])
    for bad in (["logs", "site-1", "../server/log.txt"], ["logs", "../../etc/passwd"], ["logs", "all"]):
        refused = fedadmin(ws, "--json", *bad)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
    no_run = fedadmin(ws, "--json", "logs", "site-1", "--run", "9")
    assert no_run.returncode == 1 and "no run 9" in no_run.stdout
    # --follow: the lines appended after it started, as JSON lines, until Ctrl-C (exit 0).
    env = dict(python_env(), FEDADMIN_KIT=str(ws / "admin"))
    follower = subprocess.Popen(
        [sys.executable, "-m", "fedadmin.cli", "--json", "logs", "server", "-n", "1", "--follow"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(follower.stdout.readline())
        assert first["ok"] and len(first["lines"]) == 1
        ok_json(ws, "set-timeout", "12")  # the server logs it
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while not any("set-timeout" in line for line in seen) and time.monotonic() < deadline:
            seen += json.loads(follower.stdout.readline())["lines"]
        assert any("admin admin (project_admin): set-timeout server -> ok" in line for line in seen), seen
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(5)
    per_round = ok_json(ws, "metrics")
    assert per_round["metric"] == "accuracy" and [r["round"] for r in per_round["records"]] == [0, 1, "final"]
    for record in per_round["records"]:
        assert set(record["sites"]) == {"site-1", "site-2"}, record
        values = [record["sites"][s]["accuracy"] for s in ("site-1", "site-2")]
        assert record["mean"]["accuracy"] == pytest.approx(sum(values) / 2)
    assert per_round["records"][-1]["mean"]["accuracy"] > per_round["records"][0]["mean"]["accuracy"]
    png = tmp_path / "curves.png"
    ok_json(ws, "metrics", "--png", str(png))
    from PIL import Image

    with Image.open(png) as picture:
        picture.verify()
        assert picture.format == "PNG" and picture.size[0] >= 300
    table = fedadmin(ws, "metrics")
    assert table.returncode == 0 and "mean accuracy by round" in table.stdout and "●" in table.stdout

    slow = copy_mmar(tmp_path / "slow", server={"num_rounds": 50}, train_args={"epochs_per_round": 100000})
    ok_json(ws, "set-run", "2")
    ok_json(ws, "deploy", str(slow), "all")
    ok_json(ws, "start", "all")
    deadline = time.monotonic() + 60
    while len(workers_of(ws)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers_of(ws)) == 2, "both sites should be training run 2"

    # A worker killed with SIGKILL: the site shows a training exception naming the signal and starts again.
    site1 = str(ws / "site-1")
    next(p for p in workers_of(ws) if site1 in " ".join(p.cmdline())).kill()  # ours, by its PID
    _wait_status(ws, "site-1", "training exception")
    assert "killed by SIGKILL" in replies(ok_json(ws, "status", "site-1"))["site-1"]["error"]
    assert replies(ok_json(ws, "status", "site-2"))["site-2"]["status"] in ("training starting", "training started")
    assert replies(ok_json(ws, "start", "site-1"))["site-1"]["ok"]
    _wait_status(ws, "site-1", "training started")

    no_tty = fedadmin(ws, "--json", "abort", "server")
    assert no_tty.returncode == 2 and "--yes" in no_tty.stdout + no_tty.stderr
    aborted = replies(ok_json(ws, "--yes", "abort", "server"))
    assert sorted(aborted["server"]["aborted_sites"]) == ["site-1", "site-2"]
    deadline = time.monotonic() + 10
    while workers_of(ws) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers_of(ws) == [], "abort must leave no training process"

    ok_json(ws, "--yes", "delete-run", "2")
    assert not (ws / "server" / "run_2").exists() and not (ws / "site-1" / "run_2").exists()
    assert (ws / "server" / "run_1" / "summary.json").exists()

    batch = tmp_path / "cmds.txt"
    batch.write_text("# a scripted check\nstatus server\n\nsysinfo site-1\n")
    lines = fedadmin(ws, "--json", "batch", str(batch))
    assert lines.returncode == 0, lines.stdout + lines.stderr
    assert [json.loads(line)["command"] for line in lines.stdout.splitlines()] == ["status", "sysinfo"]

    refused = fedadmin(ws, "--json", "--yes", "shutdown", "server")
    assert refused.returncode == 1 and "registered" in refused.stdout
    ok_json(ws, "--yes", "shutdown", "client")
    # Sites that shut down leave the registry at once, not after heart_beat_timeout.
    assert replies(ok_json(ws, "status", "server"))["server"]["registered_sites"] == []
    ok_json(ws, "--yes", "shutdown", "server")
    # The server leaves at once: the long-polls of the sites that shut down are released, not left to time out.
    from fedadmin.local_federation import read_records

    try:
        psutil.Process(next(r.pid for r in read_records(ws) if r.name == "server")).wait(10)
    except psutil.NoSuchProcess:
        pass  # already gone


BROKEN_TRAINER = """
from trainer import DigitsTrainer


class BrokenTrainer(DigitsTrainer):
    \"\"\"Fails in its first local phase, at every site.\"\"\"

    def train(self, progress=None):
        raise RuntimeError("the data volume is not mounted")
"""


def test_wait_and_status_say_what_a_run_waits_for_and_when_every_site_failed(federation, tmp_path):
    """Issue 19 items 5 and 4, through real processes: a site started before the server, then a run that needs
    min_num_clients=2 with one site started: status and wait name what is awaited; then a run whose every site failed
    in training: the server says it is stalled, wait exits 1 at once saying so, status shows it."""
    ws = federation
    mmar = copy_mmar(tmp_path / "mmar", server={"num_rounds": 1, "min_num_clients": 2})
    ok_json(ws, "set-run", "1")
    ok_json(ws, "deploy", str(mmar), "all")
    ok_json(ws, "start", "site-1")
    waited = fedadmin(ws, "--json", "wait", "--timeout", "3")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["awaiting"] == "server has not started run 1: fedadmin start server"
    assert "waiting: server has not started run 1: fedadmin start server" in fedadmin(ws, "status").stdout

    ok_json(ws, "start", "server")
    waited = fedadmin(ws, "--json", "wait", "--timeout", "3")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    expected = "run 1 needs min_num_clients=2, 1 site started: fedadmin start site-2"
    assert json.loads(waited.stdout)["awaiting"] == expected
    assert json.loads(waited.stdout)["result"] == f"gave up after 3s: the run is training; {expected}"
    ok_json(ws, "--yes", "abort", "server")

    broken = copy_mmar(tmp_path / "broken", server={"num_rounds": 1, "min_num_clients": 2})
    (broken / "custom" / "broken.py").write_text(BROKEN_TRAINER)
    train = json.loads((broken / "config" / "config_train.json").read_text())
    train["trainer"]["path"] = "broken.BrokenTrainer"
    (broken / "config" / "config_train.json").write_text(json.dumps(train))
    ok_json(ws, "set-run", "2")
    ok_json(ws, "deploy", str(broken), "all")
    ok_json(ws, "start", "all")
    waited = fedadmin(ws, "--json", "wait", "--timeout", "240", timeout=300)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    said = json.loads(waited.stdout)["result"]
    assert "the data volume is not mounted" in said and "`fedadmin logs site-" in said, said
    deadline = time.monotonic() + 120
    # A run stalls once its first site fails (it can no longer reach min_num_clients); the second site's failure
    # may be reported a moment later.
    while not (
        (server := replies(ok_json(ws, "status", "server"))["server"])["stalled"] and len(server["failed_sites"]) == 2
    ):
        assert time.monotonic() < deadline, f"the run never counted as stalled with both sites failed: {server}"
        time.sleep(0.5)
    assert server["run_status"] == "training" and sorted(server["failed_sites"]) == ["site-1", "site-2"]
    waited = fedadmin(ws, "--json", "wait", "--timeout", "60")
    assert waited.returncode == 1
    said = json.loads(waited.stdout)["result"]
    assert said.startswith("run 2 failed at every site that started it: site-1: training failed: "), said
    assert "`fedadmin logs site-2 --run 2 --level error`" in said
    assert said.endswith("end it with `fedadmin abort server`")
    shown = fedadmin(ws, "status")
    assert "run 2 failed at every site that started it" in shown.stdout, shown.stdout

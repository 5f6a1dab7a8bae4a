"""End to end: a real server process and real site processes train the digits example over mutual TLS."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import DIGITS, ROOT, copy_mmar, prepare_workspace, python_env, server_process, start_site, wait_json
from test_e2e_admin import ok_json

pytestmark = pytest.mark.e2e


def test_two_sites_train_three_rounds_and_the_global_model_improves(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    with server_process(ws / "server", "--mmar", str(DIGITS)):
        sites = [start_site(ws / f"site-{k}", DIGITS) for k in (1, 2)]
        processes.extend(sites)
        outputs = [p.communicate(timeout=240)[0] for p in sites]
        for proc, out in zip(sites, outputs, strict=True):
            assert proc.returncode == 0, out
        summary = wait_json(
            ws / "server" / "run_1" / "summary.json", lambda s: len(s["final_metrics"]) == 2, timeout=10
        )
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for record in summary["rounds"]:
        assert record["contributors"] == ["site-1", "site-2"]
        assert set(record["metrics"]) == {"site-1", "site-2"}
        assert record["rejected"] == []
    first = [summary["rounds"][0]["metrics"][s]["accuracy"] for s in ("site-1", "site-2")]
    last_round = [summary["rounds"][-1]["metrics"][s]["accuracy"] for s in ("site-1", "site-2")]
    final = [summary["final_metrics"][s]["accuracy"] for s in ("site-1", "site-2")]
    assert max(first) < 0.3, "the initial global model should be near chance"
    assert min(final) > 0.85
    assert min(final) >= min(last_round) - 0.02
    assert (ws / "server" / "run_1" / "models" / "global_model.fl").exists()
    assert (ws / "site-1" / "run_1" / "models" / "best_local_model.fl").exists()


def test_a_killed_site_is_dropped_from_the_round_and_rejoins_a_later_one(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=3)
    server_cfg = {"min_num_clients": 2, "num_rounds": 30, "heart_beat_timeout": 6, "wait_after_min_clients": 300}
    fast = copy_mmar(tmp_path / "fast", server=server_cfg, train_args={"num_sites": 3})
    slow = copy_mmar(tmp_path / "slow", server=server_cfg, train_args={"num_sites": 3, "epochs_per_round": 100000})
    summary_path = ws / "server" / "run_1" / "summary.json"
    with server_process(ws / "server", "--mmar", str(fast)) as server:
        site3 = start_site(ws / "site-3", slow)
        processes.append(site3)
        _wait_line(server, "site site-3 registered", 60)
        processes.extend(start_site(ws / f"site-{k}", fast) for k in (1, 2))
        _wait_line(server, "site site-2 registered", 120)
        site3.send_signal(signal.SIGKILL)  # the whole site, mid-round (it trains round 0 slowly)
        site3.wait(10)
        summary = wait_json(summary_path, lambda s: len(s["rounds"]) >= 1, timeout=30)
        assert summary["rounds"][0]["contributors"] == ["site-1", "site-2"]
        assert summary["rounds"][0]["dropped"] == ["site-3"]
        assert any("site site-3 dropped" in line for line in server.output_lines)
        back = start_site(ws / "site-3", fast)
        processes.append(back)
        summary = wait_json(
            summary_path,
            lambda s: any("site-3" in r.get("contributors", []) for r in s["rounds"]) or s["status"] != "training",
            timeout=180,
        )
        if back.poll() is not None:
            raise AssertionError("site-3 did not come back:\n" + back.communicate()[0][-3000:])
        ok_json(ws, "--yes", "abort", "server")  # the sites leave at once, rather than train 30 rounds
        for proc in processes[1:]:
            proc.communicate(timeout=60)
    rejoined = [r["round"] for r in summary["rounds"] if "site-3" in r.get("contributors", [])]
    assert rejoined and rejoined[0] > 0, [(r["round"], r.get("contributors")) for r in summary["rounds"]]


def test_a_server_killed_mid_run_resumes_at_the_open_round_and_no_round_is_lost_or_repeated(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    mmar = copy_mmar(tmp_path / "mmar", server={"min_num_clients": 2, "num_rounds": 3})
    summary_path = ws / "server" / "run_1" / "summary.json"
    with server_process(ws / "server", "--mmar", str(mmar)) as server:
        sites = [start_site(ws / f"site-{k}", mmar) for k in (1, 2)]
        processes.extend(sites)
        wait_json(summary_path, lambda s: len(s["rounds"]) >= 1, timeout=180)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    time.sleep(1.0)
    assert all(p.poll() is None for p in sites), "the sites should wait for the server, not give up"
    with server_process(ws / "server") as server:
        for proc in sites:
            out = proc.communicate(timeout=240)[0]
            assert proc.returncode == 0, out
        summary = wait_json(summary_path, lambda s: s["status"] == "completed", timeout=30)
        assert any("run 1 resumed at round" in line for line in server.output_lines)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert all(r["contributors"] == ["site-1", "site-2"] for r in summary["rounds"])


def _wait_line(server, text, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in server.output_lines):
            return
        if server.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"server never logged {text!r}:\n" + "".join(server.output_lines[-40:]))


def test_server_refuses_a_bad_mmar_naming_the_file_and_key(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    bad = copy_mmar(tmp_path / "bad", server={"num_rounds": "three"})
    proc = subprocess.run(
        [sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(ws / "server"), "--mmar", str(bad)],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "config_fed_server.json" in proc.stderr and "num_rounds" in proc.stderr
    assert not (ws / "server" / "run_1").exists(), "nothing may be written for a refused MMAR"


def test_site_with_a_broken_kit_exits_3_naming_the_file(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    (ws / "site-1" / "startup" / "fed.json").write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "fedclient.cli", "train", "--workspace", str(ws / "site-1"), "--mmar", str(DIGITS)],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "fed.json" in proc.stderr
    assert json.loads((ws / "server" / "startup" / "fed.json").read_text())["name"] == "server"


def test_each_privacy_protocol_filters_a_sites_updates_through_a_whole_run(tmp_path, processes):
    protocols = {
        "site-1": ("LaplacianProtocol", 1000.0),
        "site-2": ("PercentileProtocol", 0.0),
        "site-3": ("SVTProtocol", 0.1),
    }
    ws = prepare_workspace(tmp_path / "ws", clients=3)
    server_cfg = {"min_num_clients": 3, "num_rounds": 2}
    three = {"num_sites": 3}
    server_mmar = copy_mmar(tmp_path / "server-mmar", server=server_cfg, train_args=three)
    with server_process(ws / "server", "--mmar", str(server_mmar)):
        sites = []
        for site, (name, _) in protocols.items():
            mmar = copy_mmar(
                tmp_path / f"{site}-mmar", server=server_cfg, client={"privacy": {"name": name}}, train_args=three
            )
            sites.append(start_site(ws / site, mmar))
        processes.extend(sites)
        for proc in sites:
            out = proc.communicate(timeout=240)[0]
            assert proc.returncode == 0, out
        summary = wait_json(
            ws / "server" / "run_1" / "summary.json", lambda s: len(s["final_metrics"]) == 3, timeout=10
        )
    assert summary["status"] == "completed"
    for record in summary["rounds"]:
        assert record["privacy"] == {
            site: {"protocol": name, "epsilon": eps} for site, (name, eps) in protocols.items()
        }
    assert summary["privacy_epsilon_total"] == {site: 2 * eps for site, (_, eps) in protocols.items()}

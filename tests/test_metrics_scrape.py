"""The server's Prometheus endpoint, scraped from a real server: the values a run leaves, and where it listens."""

from __future__ import annotations

import time

import psutil
import pytest
from conftest import DIGITS, prepare_workspace, scrape, server_process, start_site, wait_json

from fedcommon.model_file import load_model

pytestmark = pytest.mark.e2e


def metrics_url(server) -> str:
    ready = next(line for line in server.output_lines if line.startswith("fedserver ready"))
    return ready.split()[-1]


def test_the_metrics_count_the_rounds_bytes_and_contributions_of_a_real_run(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    with server_process(ws / "server", "--mmar", str(DIGITS), "--metrics-port", "0") as server:
        url = metrics_url(server)
        sites = [start_site(ws / f"site-{k}", DIGITS) for k in (1, 2)]
        processes.extend(sites)
        seen: list[dict[str, float]] = []  # scrapes taken while the run trained
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in sites):
            assert time.monotonic() < deadline, "the sites did not finish"
            samples = scrape(url)
            if samples.get("fedlearn_training") == 1:
                seen.append(samples)
            time.sleep(0.1)
        for proc in sites:
            assert proc.returncode == 0, proc.communicate()[0][-3000:]
        summary = wait_json(ws / "server" / "run_1" / "summary.json", lambda s: s["status"] == "completed", 30)
        final = scrape(url)

    rounds = len(summary["rounds"])
    contributions = sum(len(r["contributors"]) for r in summary["rounds"])
    assert rounds == 3 and contributions == 6, summary["rounds"]
    model, _ = load_model(ws / "server" / "run_1" / "models" / "global_model.fl")
    model_bytes = sum(a.nbytes for a in model.values())

    # While it trained, the round gauge named the open round; each closed round counted both its contributions.
    opened = {int(s["fedlearn_round"]) for s in seen if "fedlearn_round" in s}
    assert opened and opened <= {0, 1, 2}, opened
    assert max(opened) >= 1, f"no scrape saw a round after the first: {opened}"
    for s in seen:
        if "fedlearn_round" in s:
            assert s["fedlearn_contributions_accepted_total"] >= 2 * s["fedlearn_round"], s
            accepted = s["fedlearn_contributions_accepted_total"]
            assert s["fedlearn_training_bytes_received_total"] >= accepted * model_bytes, s

    assert final["fedlearn_training"] == 0 and "fedlearn_round" not in final
    assert final["fedlearn_run_number"] == 1
    assert final["fedlearn_contributions_accepted_total"] == contributions
    assert final["fedlearn_contributions_refused_total"] == 0
    # Every contribution carries a Δ for each variable of the model; every site fetched the model every round.
    assert final["fedlearn_training_bytes_received_total"] == contributions * model_bytes
    assert final["fedlearn_training_bytes_sent_total"] >= contributions * model_bytes


def test_the_metrics_port_listens_on_the_host_asked_for_not_on_every_interface(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    with server_process(ws / "server", "--metrics-port", "0", "--metrics-host", "127.0.0.1") as server:
        url = metrics_url(server)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert "fedlearn_run_number" in scrape(url)
        # The socket itself, not the ready line (which is built from the option).
        proc = psutil.Process(server.pid)
        sockets = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")  # psutil < 6
        listening = [c.laddr for c in sockets if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert [addr.ip for addr in listening] == ["127.0.0.1"], listening

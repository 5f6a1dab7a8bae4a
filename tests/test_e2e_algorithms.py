"""End to end: the digits example trains to accuracy with a server optimizer (FedAdam) and with each site
algorithm (FedProx, SCAFFOLD), over real processes and mutual TLS; status, metrics and summary.json name them."""

from __future__ import annotations

import pytest
from conftest import copy_mmar, prepare_workspace, server_process, start_site, wait_json
from test_e2e_admin import ok_json, replies

pytestmark = pytest.mark.e2e

ALGORITHMS = {
    "FedAdam": ({"aggregator": {"name": "FedAdam", "args": {"eta": 0.1}}}, None, "FedAdam", []),
    "FedProx": (None, {"fedprox": {"mu": 0.01}}, "FedAvg", ["FedProx(mu=0.01)"]),
    "SCAFFOLD": (None, {"scaffold": True}, "FedAvg", ["SCAFFOLD"]),
}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_the_digits_example_trains_to_accuracy_with_the_algorithm(tmp_path, processes, algorithm):
    server_cfg, client_cfg, aggregator, site_algorithms = ALGORITHMS[algorithm]
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    mmar = copy_mmar(tmp_path / "mmar", server=server_cfg, client=client_cfg)
    with server_process(ws / "server", "--mmar", str(mmar)):
        sites = [start_site(ws / f"site-{k}", mmar) for k in (1, 2)]
        processes.extend(sites)
        for proc in sites:
            out = proc.communicate(timeout=240)[0]
            assert proc.returncode == 0, out
        summary = wait_json(
            ws / "server" / "run_1" / "summary.json", lambda s: len(s["final_metrics"]) == 2, timeout=10
        )
        server = replies(ok_json(ws, "status", "server"))["server"]
        metrics = ok_json(ws, "metrics")
    assert summary["status"] == "completed"
    assert summary["aggregator"]["name"] == aggregator and summary["site_algorithms"] == site_algorithms
    for record in summary["rounds"]:
        assert record["contributors"] == ["site-1", "site-2"] and record["rejected"] == []
    assert min(m["accuracy"] for m in summary["final_metrics"].values()) >= 0.85, summary["final_metrics"]
    assert server["aggregator"] == aggregator and server["site_algorithms"] == site_algorithms, server
    assert metrics["aggregator"] == aggregator and metrics["site_algorithms"] == site_algorithms
    if algorithm == "SCAFFOLD":
        assert all((ws / f"site-{k}" / "run_1" / "scaffold_site_state.fl").exists() for k in (1, 2))

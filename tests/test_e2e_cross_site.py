"""End to end: real server and sites train digits, then every site scores every model (cross-site validation)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import copy_mmar, prepare_workspace
from test_e2e_admin import fedadmin, ok_json, replies

pytestmark = pytest.mark.e2e

SITES = ["site-1", "site-2"]


def _sites_connected(ws: Path) -> bool:
    done = fedadmin(ws, "--json", "status", "server")
    if done.returncode != 0:
        return False
    return set(SITES) <= set(json.loads(done.stdout)["replies"][0].get("connected_sites", []))


def _servings(ws: Path) -> int:
    """How many times a server process has started serving in this workspace (its log says so each time)."""
    return (ws / "server" / "log.txt").read_text().count("training plane and site agents on")


def _matrix(ws: Path, *args: str) -> dict:
    return ok_json(ws, "validate", *args)


def _wait_matrix(ws: Path, cells: int, *args: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = _matrix(ws, *args)
        filled = sum(len(row) for row in out["results"].values())
        if filled >= cells or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _accuracy_cells(out: dict) -> list[float]:
    return [m["accuracy"] for row in out["results"].values() for m in row.values()]


def test_sites_validate_every_model_the_matrix_survives_a_restart_and_validation_runs_on_demand(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    started = fedadmin(ws, "poc", "start", "--workspace", str(ws), timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        # Run 1: both sites share their best models and validate everything after training.
        mmar = copy_mmar(tmp_path / "xval", server={"num_rounds": 2}, client={"cross_site_validate": True})
        ok_json(ws, "set-run", "1")
        ok_json(ws, "deploy", str(mmar), "all")
        early = fedadmin(ws, "--json", "validate")
        assert early.returncode == 1 and "has not been trained" in early.stdout
        ok_json(ws, "start", "all")
        ok_json(ws, "wait", "--timeout", "240", timeout=300)
        out = _wait_matrix(ws, 6)
        assert out["validating_sites"] == SITES
        assert out["owners"] == [*SITES, "server"]
        assert {site: set(row) for site, row in out["results"].items()} == {site: {*SITES, "server"} for site in SITES}
        accuracies = _accuracy_cells(out)
        assert len(accuracies) == 6 and all(0.6 <= a <= 1.0 for a in accuracies), accuracies
        cell = _matrix(ws, "site-2", "server")["cell"]
        assert cell["metrics"] == out["results"]["site-2"]["server"]
        missing = fedadmin(ws, "--json", "validate", "site-1", "site-9")
        assert missing.returncode == 1 and "site-9" in missing.stdout

        # The matrix is on disk in the run folder: a restarted server shows it unchanged.
        serving = _servings(ws)
        ok_json(ws, "--yes", "restart", "server")
        deadline = time.monotonic() + 60
        # The old process answers for a moment after it acknowledged the restart: wait for the new one to serve.
        while _servings(ws) == serving:
            assert time.monotonic() < deadline, "the restarted server never served again"
            time.sleep(0.2)
        while not _sites_connected(ws) and time.monotonic() < deadline:  # the agents come back by themselves
            time.sleep(0.5)
        assert _matrix(ws, "--run", "1")["results"] == out["results"]

        # Run 2: no validation after training, and site-2 keeps its model to itself; validation starts on demand.
        plain = copy_mmar(tmp_path / "plain", server={"num_rounds": 2})
        private = copy_mmar(tmp_path / "private", server={"num_rounds": 2}, client={"is_participating": False})
        ok_json(ws, "set-run", "2")
        ok_json(ws, "deploy", str(plain), "server", "site-1")
        ok_json(ws, "deploy", str(private), "site-2")
        ok_json(ws, "start", "all")
        ok_json(ws, "wait", "--timeout", "240", timeout=300)
        assert _matrix(ws)["results"] == {}
        started = replies(ok_json(ws, "validate", "--start"))
        assert set(started) == set(SITES) and started["site-1"]["run_number"] == 2
        out = _wait_matrix(ws, 4)
        assert out["declined"] == ["site-2"] and out["owners"] == ["site-1", "server"]
        assert {site: set(row) for site, row in out["results"].items()} == {
            site: {"site-1", "server"} for site in SITES
        }
        assert all(0.6 <= a <= 1.0 for a in _accuracy_cells(out))
        assert not (ws / "server" / "run_2" / "cross_site" / "models" / "site-2.fl").exists()
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), timeout=120)

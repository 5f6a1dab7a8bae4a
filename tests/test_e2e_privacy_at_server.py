"""What a privacy filter lets out, seen where it lands: the update the server received from a real site."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import copy_mmar, prepare_workspace, server_process, start_site, wait_json

from fedcommon.model_file import load_model

pytestmark = pytest.mark.e2e

PERCENTILE = 60
GAMMA = 1e-6  # per local step: below the kept |Δ/S|, so every value that leaves is clipped to ±γ·S


def test_the_update_the_server_received_is_sparse_and_clipped_by_the_percentile_protocol(tmp_path, processes):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    # One site, one round, FedAvg: the new global model is w0 + Δ, so w1 - w0 is the update the server received.
    mmar = copy_mmar(
        tmp_path / "mmar",
        server={"min_num_clients": 1, "num_rounds": 1},
        client={"privacy": {"name": "PercentileProtocol", "args": {"percentile": PERCENTILE, "gamma": GAMMA}}},
    )
    models = ws / "server" / "run_1" / "models"
    with server_process(ws / "server", "--mmar", str(mmar)):
        shutil.copyfile(models / "global_model.fl", tmp_path / "w0.fl")  # before any site has joined
        site = start_site(ws / "site-1", mmar)
        processes.append(site)
        out = site.communicate(timeout=240)[0]
        assert site.returncode == 0, out[-3000:]
        summary = wait_json(ws / "server" / "run_1" / "summary.json", lambda s: s["status"] == "completed", 30)
    assert summary["rounds"][0]["contributors"] == ["site-1"]
    assert summary["rounds"][0]["privacy"] == {"site-1": {"protocol": "PercentileProtocol", "epsilon": 0.0}}
    w0, _ = load_model(tmp_path / "w0.fl")
    w1, _ = load_model(models / "global_model.fl")
    names = [k for k, v in w0.items() if v.ndim > 0 and np.issubdtype(v.dtype, np.floating)]
    assert names, list(w0)
    delta = np.concatenate([(w1[k].astype(np.float64) - w0[k].astype(np.float64)).ravel() for k in names])

    # Sparsity: the coordinates under the percentile were uploaded as 0 and left the model exactly as it was.
    dropped = np.mean(delta == 0)
    assert abs(dropped - PERCENTILE / 100) < 0.1, f"{dropped:.1%} of the coordinates unchanged"
    # Clipping: everything that left has one magnitude, γ·S (up to float32 rounding of w0 + Δ).
    kept = np.abs(delta[delta != 0])
    level = np.median(kept)
    assert np.all(np.abs(kept - level) <= 0.05 * level), (kept.min(), level, kept.max())

"""The scale bench's simulated sites take part in real rounds, moving tensor bytes over the transport asked for."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scale_bench  # noqa: E402

SITES = 3


def server_log(work: Path) -> str:
    return (work / f"server-rounds-{SITES}.stderr.txt").read_text()


@pytest.mark.slow
def test_simulated_sites_complete_a_round_over_the_bulk_channel(tmp_path):
    out = asyncio.run(scale_bench.bench_rounds(SITES, 2.0, 1, tmp_path, 180, transport="bulk"))
    assert out["completed"], out
    assert out["site_errors"] == 0, out["first_site_error"]
    assert out["transport"] == "bulk" and out["transport_used"] == "bulk"
    # Each site takes the round's model and the final one (with END), and sends one update.
    assert out["transfers"] == {"download_bulk": 2 * SITES, "upload_bulk": SITES}
    log = server_log(tmp_path)
    assert log.count("update received over the bulk channel") == SITES
    assert log.count("model sent over the bulk channel") == 2 * SITES


@pytest.mark.slow
def test_simulated_sites_keep_to_grpc_when_told(tmp_path):
    out = asyncio.run(scale_bench.bench_rounds(SITES, 2.0, 1, tmp_path, 180, transport="grpc"))
    assert out["completed"], out
    assert out["transport_used"] == "grpc"
    assert out["transfers"] == {"download_grpc": 2 * SITES, "upload_grpc": SITES}
    assert "over the bulk channel" not in server_log(tmp_path)

"""The bare-gRPC floor benchmark runs what fedserver's fl_port runs: the same settings, real mutual-TLS connections."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import grpc_floor_bench as floor  # noqa: E402

from fedcommon import tensor_codec  # noqa: E402
from fedserver import server, training_service  # noqa: E402


def test_the_floor_server_has_the_fl_ports_channel_arguments_pool_and_slots():
    assert dict(floor.FL_OPTIONS) == dict(server.GRPC_OPTIONS)
    assert floor.WORKERS == server.FL_WORKERS
    assert floor.DOWNLOAD_SLOTS == training_service.DOWNLOAD_SLOTS
    assert floor.UPLOAD_SLOTS == training_service.MAX_CONCURRENT_UPLOADS
    assert floor.CHUNK_BYTES == tensor_codec.DEFAULT_CHUNK_BYTES
    assert floor.MAX_MESSAGE_BYTES == tensor_codec.MAX_MESSAGE_BYTES


def test_an_option_overrides_the_fl_ports_value_and_a_bad_one_is_refused():
    merged = dict(floor.server_options([floor.option("grpc.http2.bdp_probe=1"), floor.option("grpc.x=5")]))
    assert merged["grpc.http2.bdp_probe"] == 1 and merged["grpc.x"] == 5
    assert merged["grpc.keepalive_time_ms"] == 30_000
    for bad in ("bdp_probe=1", "grpc.http2.bdp_probe", "grpc.http2.bdp_probe=yes"):
        with pytest.raises(argparse.ArgumentTypeError, match="grpc.NAME=INTEGER|integer"):
            floor.option(bad)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/PID/smaps")
def test_rss_by_kind_accounts_for_the_process_and_finds_a_threads_stack():
    release = threading.Event()
    touched = threading.Event()

    def deep(n: int) -> None:  # touches a few pages of its stack, then waits
        if n:
            deep(n - 1)
        else:
            touched.set()
            release.wait(30)

    thread = threading.Thread(target=deep, args=(200,))
    thread.start()
    try:
        touched.wait(10)
        kinds = floor.rss_by_kind(os.getpid())
        rss = floor.proc_status(os.getpid(), "VmRSS")
    finally:
        release.set()
        thread.join()
    assert kinds["thread stacks"] > 0
    assert kinds["files (code, libraries)"] > 0
    assert abs(sum(kinds.values()) - rss) < 0.1 * rss


@pytest.mark.slow
def test_the_floor_bench_measures_a_bare_server_with_real_connections(capsys):
    assert floor.main(["--connections", "3", "--transfer-mib", "1", "--rounds", "1", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    labels = [s["at"] for s in report["timeline"]]
    assert labels[:3] == ["ready", "connected, long-polls held", "round 0 transferred"]
    assert labels[-1].startswith("channels closed")
    connected = report["timeline"][1]
    # A thread per held long-poll (the sync server's model), and the connections cost memory.
    assert connected["threads"] >= report["timeline"][0]["threads"] + 3
    assert report["per_connection_bytes"] > 0
    assert report["peak_bytes"] >= max(s["rss_bytes"] for s in report["timeline"])
    assert len(report["transfer_s"]) == 1

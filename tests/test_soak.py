"""Soak: many short rounds and admin commands against a real server leave its threads, files and memory flat."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import copy_mmar, prepare_workspace, server_process, wait_json

from fedadmin.connection import AdminConnection
from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.model_file import save_model
from fedcommon.tensor_codec import decode_tensors, encode_tensors
from fedcommon.wire import training_pb2 as pb

pytestmark = pytest.mark.e2e

ROUNDS = 80
WARM = 15  # rounds before the first sample: pools, caches and allocator arenas have grown to their size
# Stated bounds for what may still grow between the samples. gRPC's pools add a thread when more calls
# overlap than ever before, so a few may come; a leak per round or per command would add dozens. A model of
# 1 MiB kept per round would add 65 MiB.
MAX_MORE_THREADS = 8
MAX_MORE_FDS = 4
MAX_MORE_RSS = 24 << 20


def _proc(pid: int) -> dict[str, int]:
    status = {
        line.split(":")[0]: line.split()[1]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith(("Threads:", "VmRSS:"))
    }
    return {
        "threads": int(status["Threads"]),
        "rss": int(status["VmRSS"]) * 1024,
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
    }


def _site(ws: Path, name: str, target: str, reached: dict[int, threading.Event], errors: list[str]) -> None:
    """Train every round with a zero update, as fast as the server opens them."""
    channel = grpc.secure_channel(target, channel_credentials(load_kit(ws / name)))
    try:
        stub = TrainingStub(channel)
        md = (("fl-token", stub.Register(pb.RegisterRequest(client_name=name), timeout=30).token),)
        while True:
            chunks = stub.GetModel(pb.GetModelRequest(wait_seconds=10), metadata=md, timeout=60)
            head = next(chunks).header
            model = decode_tensors(chunks)
            if head.status == pb.END:
                return
            if head.status != pb.TRAIN:
                continue
            if head.round in reached:
                reached[head.round].set()
            update = {k: np.zeros_like(v) for k, v in model.items()}
            header = pb.ModelHeader(
                run_number=head.run_number, round=head.round, kind="delta_w", weight=1.0, num_tensors=len(update)
            )
            reply = stub.SubmitUpdate(
                iter([pb.ModelChunk(header=header), *encode_tensors(update)]), metadata=md, timeout=60
            )
            if not reply.accepted:
                errors.append(f"{name} round {head.round}: {reply.reason}")
                return
    except Exception as e:  # reported by the test, which then fails
        errors.append(f"{name}: {type(e).__name__}: {e}")
    finally:
        channel.close()


def test_many_short_rounds_and_commands_grow_no_threads_files_or_memory(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=2)
    mmar = copy_mmar(
        tmp_path / "mmar",
        server={"min_num_clients": 2, "num_rounds": ROUNDS, "initial_model": {"file": "models/initial.fl"}},
    )
    save_model(mmar / "models" / "initial.fl", {"w": np.zeros((512, 512), np.float32), "b": np.zeros(512, np.float32)})
    kit = load_kit(ws / "site-1")
    reached = {WARM: threading.Event(), ROUNDS - 1: threading.Event()}
    errors: list[str] = []
    with server_process(ws / "server", "--mmar", str(mmar)) as server:
        sites = [
            threading.Thread(target=_site, args=(ws, f"site-{k}", kit.fl_target, reached, errors), daemon=True)
            for k in (1, 2)
        ]
        for t in sites:
            t.start()
        with AdminConnection(ws / "admin", timeout=10) as admin:
            assert reached[WARM].wait(120), errors
            before = _proc(server.pid)
            while not reached[ROUNDS - 1].is_set() and not errors:  # commands all along the later rounds
                assert admin.execute("status", ["server"]).ok
        for t in sites:
            t.join(60)
        summary = wait_json(ws / "server" / "run_1" / "summary.json", lambda s: s["status"] == "completed", timeout=30)
        after = _proc(server.pid)
    assert not errors, errors
    assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS))
    assert after["threads"] <= before["threads"] + MAX_MORE_THREADS, (before, after)
    assert after["fds"] <= before["fds"] + MAX_MORE_FDS, (before, after)
    assert after["rss"] <= before["rss"] + MAX_MORE_RSS, (before, after)

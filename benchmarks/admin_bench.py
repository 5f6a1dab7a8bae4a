"""Admin-plane figures on a real local federation: console wall time, command round trip, abort, start latency."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The fixed costs of a one-shot status call, without the console: Python's start, the libraries any console of this
# protocol imports (grpc, click, protobuf's runtime with the generated admin messages), then the same Execute call to
# the same server over mutual TLS with the admin kit's files. The console's wall time above this is ours to cut.
FLOOR = """
import json, os, sys
from pathlib import Path
import click, google.protobuf, grpc
from fedcommon.wire import admin_pb2, admin_pb2_grpc
startup = Path(sys.argv[1]) / "startup"
server = json.loads((startup / "fed.json").read_text())["server"]
read = lambda name: (startup / name).read_bytes()
credentials = grpc.ssl_channel_credentials(read("rootCA.pem"), read("key.pem"), read("cert.pem"))
with grpc.secure_channel(f"{server['host']}:{server['admin_port']}", credentials) as channel:
    request = admin_pb2.CommandRequest(command="status", targets=["all"], args_json="{}")
    reply = admin_pb2_grpc.AdminServiceStub(channel).Execute(request, timeout=30)
print(len(reply.replies), flush=True)
os._exit(0)  # as the console does: no interpreter teardown
"""


def console_env(ws: Path) -> dict[str, str]:
    """The console's environment: the bench's admin kit, this tree first on the path, bytecode written and used."""
    env = dict(os.environ, FEDADMIN_KIT=str(ws / "admin"), PYTHONPATH=str(ROOT))
    # An installed console runs from bytecode (pip compiles it): with PYTHONDONTWRITEBYTECODE set, as on this VM,
    # every call would compile fedadmin's sources again, some 20 ms an operator never waits for.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def python(ws: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`python ARGS` as the console runs (console_env, from this tree's root, no terminal on stdin)."""
    return subprocess.run(
        [sys.executable, *args],
        env=console_env(ws),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def floor_call(ws: Path) -> float:
    """Wall seconds of one FLOOR process: the status call's fixed costs alone."""
    t0 = time.perf_counter()
    result = python(ws, ["-c", FLOOR, str(ws / "admin")], timeout=60)
    wall = time.perf_counter() - t0
    if result.returncode != 0 or not result.stdout.strip().isdigit() or int(result.stdout) < 1:
        raise SystemExit(f"the floor's status call failed: {result.stdout}{result.stderr}")
    return wall


def fedadmin(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = python(ws, ["-m", "fedadmin.cli", *args], timeout=300)
    if check and result.returncode != 0:
        raise SystemExit(f"fedadmin {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return result


def workers(ws: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if "fedclient.worker" in cmd and str(ws) in cmd and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def slow_mmar(dst: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "digits", dst, ignore=shutil.ignore_patterns("__pycache__"))
    train = dst / "config" / "config_train.json"
    cfg = json.loads(train.read_text())
    cfg["trainer"]["args"]["epochs_per_round"] = 100000
    train.write_text(json.dumps(cfg))
    return dst


def measure(ws: Path, tmp: Path, repeat: int) -> dict:
    from fedadmin.connection import AdminConnection

    figures: dict = {}
    walls = []
    floors = []
    fedadmin(ws, "--json", "status")  # writes the bytecode the calls below run from
    floor_call(ws)
    for _ in range(repeat):  # alternating, so both see the same machine
        t0 = time.perf_counter()
        fedadmin(ws, "--json", "status")
        walls.append(time.perf_counter() - t0)
        floors.append(floor_call(ws))
    figures["status_wall_s_median"] = statistics.median(walls)
    figures["status_wall_s"] = walls
    figures["status_floor_s_median"] = statistics.median(floors)
    figures["status_floor_s"] = floors
    figures["status_above_floor_s_median"] = statistics.median(w - f for w, f in zip(walls, floors, strict=True))

    with AdminConnection(ws / "admin", timeout=10) as conn:
        conn.execute("status", ["site-1"])
        trips = []
        for _ in range(repeat * 10):
            t0 = time.perf_counter()
            conn.execute("status", ["site-1"])
            trips.append(time.perf_counter() - t0)
    trips.sort()
    figures["site_round_trip_ms_p50"] = 1000 * trips[len(trips) // 2]
    figures["site_round_trip_ms_p90"] = 1000 * trips[int(len(trips) * 0.9)]

    fedadmin(ws, "set-run", "1")
    fedadmin(ws, "deploy", str(ROOT / "examples" / "digits"), "all")
    log = ws / "server" / "log.txt"
    before = log.read_text().count("accepted")
    t0 = time.perf_counter()
    fedadmin(ws, "start", "all")
    while log.read_text().count("accepted") == before:
        if time.perf_counter() - t0 > 120:
            raise SystemExit("no contribution within 120 s")
        time.sleep(0.02)
    figures["start_to_first_contribution_s"] = time.perf_counter() - t0
    fedadmin(ws, "wait", "--timeout", "240")

    fedadmin(ws, "set-run", "2")
    fedadmin(ws, "deploy", str(slow_mmar(tmp / "slow")), "all")
    fedadmin(ws, "start", "all")
    deadline = time.monotonic() + 60
    while len(workers(ws)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # training under way
    t0 = time.perf_counter()
    fedadmin(ws, "--yes", "abort", "server")
    while workers(ws):
        time.sleep(0.02)
    figures["abort_until_no_training_process_s"] = time.perf_counter() - t0
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from fedcommon.provision import prepare_poc

    tmp = Path(tempfile.mkdtemp(prefix="fedadmin-bench-"))
    ws = tmp / "ws"
    prepare_poc(ws, 2, "127.0.0.1", free_port(), free_port(), "bench", False)
    try:
        fedadmin(ws, "poc", "start", "--workspace", str(ws))
        figures = measure(ws, tmp, args.repeat)
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    targets = {
        "status_wall_s_median": ("<= 0.15 s", 0.15),
        "site_round_trip_ms_p50": ("<= 10 ms", 10.0),
        "abort_until_no_training_process_s": ("<= 3 s", 3.0),
    }
    if args.json:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        if isinstance(value, list):
            continue
        target = targets.get(name)
        verdict = "" if target is None else f"  target {target[0]}: {'met' if value <= target[1] else 'MISSED'}"
        print(f"{name:38s} {value:8.3f}{verdict}")


if __name__ == "__main__":
    main()

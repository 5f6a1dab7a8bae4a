"""`make demo`: a whole local federation on loopback: kits, a server, two sites, per-round metrics."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = ".fedlearn-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fmt(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", type=Path, default=ROOT / "workspace" / "demo")
    parser.add_argument("--mmar", type=Path, default=ROOT / "examples" / "digits")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    ws: Path = args.workspace.resolve()
    if ws.exists():
        if not (ws / MARKER).exists():
            print(f"demo: {ws} exists and is not a demo workspace; choose another --workspace", file=sys.stderr)
            return 2
        shutil.rmtree(ws)  # a previous demo's workspace, made by this script
    ws.mkdir(parents=True)
    (ws / MARKER).write_text("made by scripts/demo.py; removed by the next demo\n")

    from fedcommon.pki import prepare_poc

    prepare_poc(ws, args.clients, "127.0.0.1", free_port(), free_port(), "demo", False)
    print(f"demo: kits for server, site-1..site-{args.clients} and admin in {ws}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(ws / "server"), "--mmar", str(args.mmar)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        procs.append(server)
        ready = server.stdout.readline()
        if not ready.startswith("fedserver ready"):
            print(f"demo: the server did not start; see {ws / 'server' / 'log.txt'}", file=sys.stderr)
            return 1
        print(f"demo: {ready.strip()} (mutual TLS); server log: {ws / 'server' / 'log.txt'}")
        sites = []
        for k in range(1, args.clients + 1):
            site = subprocess.Popen(
                [sys.executable, "-m", "fedclient.cli", "train", "--workspace", str(ws / f"site-{k}"),
                 "--mmar", str(args.mmar)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )
            procs.append(site)
            sites.append(site)
        print(f"demo: {args.clients} sites training; their logs: {ws}/site-*/log.txt")
        summary_path = ws / "server" / "run_1" / "summary.json"
        shown = 0
        deadline = time.monotonic() + args.timeout
        summary: dict = {}
        while time.monotonic() < deadline:
            try:
                summary = json.loads(summary_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                summary = {}
            for record in summary.get("rounds", [])[shown:]:
                print(f"round {record['round']}: contributors {', '.join(record['contributors'])} "
                      f"({record['duration_s']:.1f}s); global model as each site measured it:")
                for site, metrics in record["metrics"].items():
                    print(f"    {site}: {fmt(metrics)}")
                shown += 1
            done = all(p.poll() is not None for p in sites)
            if done:
                break
            time.sleep(0.2)
        failed = [f"site-{k}" for k, p in enumerate(sites, 1) if p.returncode != 0]
        if failed or summary.get("status") != "completed":
            print(f"demo: the run did not complete (failed: {', '.join(failed) or 'none'}); see the logs above",
                  file=sys.stderr)
            return 1
        print("final global model:")
        for site, metrics in summary.get("final_metrics", {}).items():
            print(f"    {site}: {fmt(metrics)}")
        print(f"demo: run 1 completed; summary: {summary_path}")
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())

"""Round overhead with a tiny model: from the last contribution's acceptance to the next model at the sites.

A real server process (`fedserver.cli start --mmar`, mutual TLS on 127.0.0.1) runs --rounds rounds of a
1 KiB model; two sites, threads of this process with their own certificates, each long-poll GetModel,
submit a zero update at once, and long-poll again. Per round: the time from the later of the two
accepted submissions to the later of the two sites holding the next round's model. Median and p90 over the
rounds (the first is left out: it includes connection set-up). Target: median <= 50 ms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from round_bench import Child, free_ports, write_mmar  # noqa: E402

from fedcommon.chunk_wire import TrainingStub  # noqa: E402
from fedcommon.kit import channel_credentials, load_kit  # noqa: E402
from fedcommon.provision import prepare_poc  # noqa: E402
from fedcommon.tensor_codec import decode_tensors, encode_tensors  # noqa: E402
from fedcommon.wire import training_pb2 as pb  # noqa: E402

TARGET_MS = 50.0


def site_loop(
    ws: Path, site: str, target: str, rounds: int, submitted: dict, available: dict, errors: list[str]
) -> None:
    channel = grpc.secure_channel(target, channel_credentials(load_kit(ws / site)))
    try:
        stub = TrainingStub(channel)
        token = stub.Register(pb.RegisterRequest(client_name=site), timeout=30).token
        md = (("fl-token", token),)
        done = 0
        while done < rounds:
            chunks = stub.GetModel(pb.GetModelRequest(wait_seconds=10), metadata=md, timeout=30)
            head = next(chunks).header
            tensors = decode_tensors(chunks)
            if head.status == pb.WAIT:
                continue
            available.setdefault(head.round, {})[site] = time.perf_counter()
            if head.status == pb.END:
                return
            delta = {k: np.zeros_like(v) for k, v in tensors.items()}
            header = pb.ModelHeader(
                run_number=head.run_number, round=head.round, kind="delta_w", weight=1.0, num_tensors=len(delta)
            )
            reply = stub.SubmitUpdate(
                iter([pb.ModelChunk(header=header), *encode_tensors(delta)]), metadata=md, timeout=30
            )
            if not reply.accepted:
                raise RuntimeError(f"{site}: round {head.round} refused: {reply.reason}")
            submitted.setdefault(head.round, {})[site] = time.perf_counter()
            done += 1
        # the model after the last round (status END)
        chunks = stub.GetModel(pb.GetModelRequest(wait_seconds=10), metadata=md, timeout=30)
        head = next(chunks).header
        list(chunks)
        available.setdefault(head.round, {})[site] = time.perf_counter()
    except Exception as e:
        errors.append(f"{site}: {e}")
    finally:
        channel.close()


def measure(rounds: int, work: Path) -> dict:
    ws = work / "ws"
    fl_port, admin_port = free_ports(2)
    prepare_poc(ws, 2, "127.0.0.1", fl_port, admin_port, "bench", False)
    mmar = work / "mmar"
    write_mmar(mmar, 1024, 1024)
    cfg_path = mmar / "config" / "config_fed_server.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(num_rounds=rounds, wait_after_min_clients=30)
    cfg_path.write_text(json.dumps(cfg))
    server = Child(
        "server",
        [sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(ws / "server"), "--mmar", str(mmar)],
        work / "server.stderr.txt",
    )
    try:
        deadline = time.monotonic() + 120
        while "fedserver ready" not in server.next_line(deadline):
            pass
        submitted: dict[int, dict[str, float]] = {}
        available: dict[int, dict[str, float]] = {}
        errors: list[str] = []
        threads = [
            threading.Thread(
                target=site_loop, args=(ws, site, f"127.0.0.1:{fl_port}", rounds, submitted, available, errors)
            )
            for site in ("site-1", "site-2")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        if errors:
            raise RuntimeError("; ".join(errors))
    finally:
        server.stop()
    overheads = [
        max(available[r + 1].values()) - max(submitted[r].values())
        for r in range(1, rounds)
        if len(submitted.get(r, {})) == 2 and len(available.get(r + 1, {})) == 2
    ]
    ms = sorted(o * 1000 for o in overheads)
    return {
        "rounds": rounds,
        "measured": len(ms),
        "median_ms": statistics.median(ms),
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
        "max_ms": ms[-1],
        "target_ms": TARGET_MS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the run (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the line")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedlearn-overhead-"))
    try:
        result = measure(args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        verdict = "met" if result["median_ms"] <= TARGET_MS else "MISSED"
        print(
            f"round overhead, tiny model, 2 sites: median {result['median_ms']:.1f} ms, p90 "
            f"{result['p90_ms']:.1f} ms over {result['measured']} rounds (target <= {TARGET_MS:g} ms: {verdict})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

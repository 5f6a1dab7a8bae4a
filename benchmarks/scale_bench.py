"""Scale figures: N simulated sites, held in this one load-generator process, against a real server (issue 8).

Each simulated site has its own certificate (PoC kits, ECDSA P-256) and its own gRPC channel with mutual TLS
to a real `fedserver.cli start` process on 127.0.0.1, and runs on one asyncio loop (grpc.aio):

- agents (`--sites N ...`): each long-polls Retrieve (60 s, as the real agent does) and answers check_status
  with a site status, as FedAdminAgent would (the reply travels with its next Retrieve); anything else gets an
  error reply. Measured per N: the server's
  CPU while N agents are connected and idle (`--idle-s` seconds, at least the 60 s long-poll cycle), its
  RSS, its threads, and `status client` answered by all N (in-process admin round trip, and the one-shot
  `fedadmin --json status client` an operator types).
- workers (`--round-sites K`): each registers on the training plane, long-polls GetModel, receives the whole
  global model (`--round-mib` MiB), and submits a zero update of the same variables (the bytes are built once
  and shared by every simulated site; the server still receives, checks and sums each upload). The tensor bytes
  move as fedclient moves them (`--transport bulk`, the default): over the server's bulk channel when it offers a
  ticket (fedclient's BulkClient, one thread per site's transfer), else, and with `--transport grpc` always, in
  the GetModel / SubmitUpdate streams; the report counts the transfers each way (`transfers`). The server
  runs `--rounds` rounds with min_num_clients K. Per round: from the first site holding the round's model to
  the last site's upload accepted (the server closes the round inside that upload: aggregate, save). The server's
  RSS, peak RSS and threads (`server_rss_timeline`): at ready, once every site has registered (before any asks for
  the model), as each round closes, the highest of its samples every 0.1 s through the rounds (where a peak lies),
  as the run ends and 5 s later (the sites still connected); and its CPU seconds for the run. Compare with
  grpc_floor_bench.py: a bare grpcio server under the same connections and transfers.

A benchmark, not a test: exit 1 only when something does not complete. Targets are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_floor_bench import proc_status, sample  # noqa: E402
from round_bench import MIB, Child, free_ports, write_mmar  # noqa: E402

from fedadmin.connection import AdminConnection, ConnectionFailed  # noqa: E402
from fedclient.bulk_client import BulkClient, BulkUnavailable  # noqa: E402
from fedcommon.admin_defs import error_reply, ok_reply  # noqa: E402
from fedcommon.admin_serde import message_from_wire, message_to_wire  # noqa: E402
from fedcommon.bulk_wire import BulkError  # noqa: E402
from fedcommon.chunk_wire import TrainingStub  # noqa: E402
from fedcommon.kit import CA_FILE, CERT_FILE, KEY_FILE, channel_credentials, client_ssl_context, load_kit  # noqa: E402
from fedcommon.provision import prepare_poc  # noqa: E402
from fedcommon.tensor_codec import DEFAULT_CHUNK_BYTES, MAX_MESSAGE_BYTES, encode_tensors, spec_from_header  # noqa: E402
from fedcommon.wire import admin_pb2 as apb  # noqa: E402
from fedcommon.wire import admin_pb2_grpc as apb_grpc  # noqa: E402
from fedcommon.wire import training_pb2 as pb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LONG_POLL_S = 60.0  # as fedclient.admin: the real agent asks the server to hold Retrieve this long
TRANSFER_S = 1800.0  # a model download or upload, up to several GiB on a busy machine (fedclient allows 900 s)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
TARGETS = {"idle_cpu_pct": 5.0, "rss_mib": 1024.0, "status_client_s": 2.0, "round_s": 15.0}
SETTLE_S = 5.0  # after the run: how long the server is left idle before its memory is sampled again
SIM_STATUS = {"status": "training not started", "status_code": 0, "run_number": None, "progress": {}}
TRANSPORTS = ("bulk", "grpc")  # bulk: as fedclient, the bulk channel when the server offers it; grpc: never
OPEN_UPLOAD_S = 30.0
BULK_RETRY_PAUSE_S = 1.0  # as fedclient: after a broken bulk upload, a moment for the server to drop its claim


@dataclass
class SimSite:
    """One simulated site: its name, its own mutual-TLS channel and, for bulk transfers, fedclient's BulkClient."""

    name: str
    channel: grpc.aio.Channel
    target: str = ""
    bulk: BulkClient | None = None
    replies: int = 0  # requests answered
    errors: list[str] = field(default_factory=list)


def open_sites(kits: Path, names: list[str], target: str, bulk: bool = False) -> list[SimSite]:
    """The sites' channels; with `bulk`, each also gets a BulkClient with its own certificate, as a Communicator."""
    sites = []
    for n in names:
        channel = grpc.aio.secure_channel(target, channel_credentials(load_kit(kits / n)), CHANNEL_OPTIONS)
        client = None
        if bulk:
            startup = kits / n / "startup"
            files = {
                "ssl_root_cert": startup / CA_FILE,
                "ssl_cert": startup / CERT_FILE,
                "ssl_private_key": startup / KEY_FILE,
            }
            client = BulkClient(client_ssl_context(files, n))
        sites.append(SimSite(n, channel, target, client))
    return sites


# ---- agents -----------------------------------------------------------------------------------------


def answer(site: SimSite, wire: apb.AdminMessage) -> apb.AdminMessage:
    """The reply FedAdminAgent's processors would give: a site status for check_status, else an error."""
    req = message_from_wire(wire)
    if req.topic == "check_status":
        reply = ok_reply(json.dumps(SIM_STATUS), req)
    else:
        reply = error_reply(f"{site.name}: the simulated site does not run {req.topic!r}", req)
    reply.set_ref_id(req.id)
    site.replies += 1
    return message_to_wire(reply)


async def agent_loop(site: SimSite, stop: asyncio.Event, polling: set[str]) -> None:
    """Long-poll Retrieve until `stop`; as FedAdminAgent does, replies ready in time go with the next Retrieve."""
    stub = apb_grpc.SiteAgentStub(site.channel)
    replies: list[apb.AdminMessage] = []
    while not stop.is_set():
        call = stub.Retrieve(apb.RetrieveRequest(wait_seconds=LONG_POLL_S, replies=replies), timeout=LONG_POLL_S + 10)
        replies = []
        polling.add(site.name)
        try:
            reply = await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as e:
            if stop.is_set():
                break
            site.errors.append(f"Retrieve: {e.code().name}: {e.details()}")
            await asyncio.sleep(1 + random.random())
            continue
        replies = [answer(site, wire) for wire in reply.requests]


def status_client(admin_kit: Path, n: int, timeout: float) -> tuple[float, int, str]:
    """One `status client` in one process: (seconds, ok replies, first error)."""
    with AdminConnection(admin_kit, timeout=timeout) as conn:
        conn.execute("status", ["server"])  # connect and handshake outside the timing
        t0 = time.perf_counter()
        outcome = conn.execute("status", ["client"])
        took = time.perf_counter() - t0
    if outcome.error:
        return took, 0, outcome.error
    sites = [r for r in outcome.replies if r.target != "server"]
    ok = sum(1 for r in sites if r.ok)
    error = next((r.error for r in sites if not r.ok), "")
    return took, ok, error


def one_shot_status(workspace: Path) -> tuple[float, int]:
    """`fedadmin --json status client` as an operator runs it: (wall seconds, ok replies)."""
    t0 = time.perf_counter()
    env = dict(os.environ, FEDADMIN_KIT=str(workspace / "admin"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "fedadmin.cli", "--json", "status", "client"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fedadmin status client exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    return took, sum(1 for r in data.get("replies", []) if r.get("ok") and r.get("target") != "server")


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """Sample the server's Python stacks for `seconds` into `out` (collapsed stacks: one line per stack)."""
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def bench_agents(n: int, work: Path, idle_s: float, repeat: int, profile: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"sites": n}
    kits = work / f"agents-{n}"
    fl_port, admin_port = free_ports(2)
    t0 = time.monotonic()
    prepare_poc(kits, n, "127.0.0.1", fl_port, admin_port, "scale", False)
    out["provision_s"] = time.monotonic() - t0
    server = Child(
        "server",
        [sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(kits / "server")],
        work / f"server-agents-{n}.stderr.txt",
    )
    sites: list[SimSite] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        deadline = time.monotonic() + 60
        while not server.next_line(deadline).startswith("fedserver ready on"):
            pass
        pid = server.proc.pid
        out["server_rss_at_ready_bytes"] = proc_status(pid, "VmRSS")
        t0 = time.monotonic()
        sites = open_sites(kits, [f"site-{i}" for i in range(1, n + 1)], f"127.0.0.1:{fl_port}")
        polling: set[str] = set()
        tasks = [asyncio.create_task(agent_loop(s, stop, polling)) for s in sites]
        # Connected: every site answers a `status client` (this also warms up every connection).
        ok, error = 0, ""
        while ok < n:
            if time.monotonic() - t0 > 300:
                raise TimeoutError(f"only {ok} of {n} sites answered status within 300 s: {error}")
            await asyncio.sleep(1)
            try:
                _, ok, error = await asyncio.to_thread(status_client, kits / "admin", n, 60)
            except ConnectionFailed as e:  # the server is busy with N handshakes: ask again
                error = str(e)
        out["connect_s"] = time.monotonic() - t0

        await asyncio.sleep(LONG_POLL_S / 2)  # let the replies' follow-up Retrieves settle
        spy = py_spy(pid, idle_s, profile / f"idle-{n}.txt") if profile else None
        cpu0, wall0 = server.cpu_seconds(), time.monotonic()
        await asyncio.sleep(idle_s)
        cpu1, wall1 = server.cpu_seconds(), time.monotonic()
        if cpu0 is None or cpu1 is None:
            raise RuntimeError(f"the server exited ({server.tail()})")
        out["idle_window_s"] = wall1 - wall0
        out["idle_cpu_pct"] = 100 * (sum(cpu1) - sum(cpu0)) / (wall1 - wall0)
        out["server_rss_bytes"] = proc_status(pid, "VmRSS")
        out["server_threads"] = proc_status(pid, "Threads")

        if spy is not None:
            await asyncio.to_thread(spy.wait)
            spy = py_spy(pid, 8, profile / f"status-client-{n}.txt")
            await asyncio.sleep(1)
        walls, oks, server_cpu, own_cpu = [], [], [], []
        for _ in range(repeat):
            before, own = server.cpu_seconds(), time.process_time()
            took, ok, error = await asyncio.to_thread(status_client, kits / "admin", n, 60)
            after = server.cpu_seconds()
            walls.append(took)
            oks.append(ok)
            own_cpu.append(time.process_time() - own)
            if before and after:
                server_cpu.append(sum(after) - sum(before))
        # Where a fan-out's time goes on a machine the server shares with every simulated site.
        out["status_client_server_cpu_s"] = server_cpu
        out["status_client_loadgen_cpu_s"] = own_cpu
        out["status_client_s"] = walls
        out["status_client_ok"] = oks
        out["status_client_error"] = error
        if spy is not None:
            await asyncio.to_thread(spy.wait)
        shots = [await asyncio.to_thread(one_shot_status, kits) for _ in range(repeat)]
        out["one_shot_status_client_s"] = [s[0] for s in shots]
        out["one_shot_status_client_ok"] = [s[1] for s in shots]
        out["server_peak_rss_bytes"] = proc_status(pid, "VmHWM")
        out["site_errors"] = sum(len(s.errors) for s in sites)
        out["first_site_error"] = next((s.errors[0] for s in sites if s.errors), "")
    finally:
        stop.set()
        for s in sites:
            await s.channel.close(grace=None)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.stop()
    return out


# ---- workers ----------------------------------------------------------------------------------------


class ZeroUpdate:
    """The encoded chunks of a zero update for the model's variables, built once from the first download."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.chunks: list[pb.ModelChunk] | None = None
        self.chunk_bytes = chunk_bytes

    def build(self, headers: list[pb.TensorHeader]) -> None:
        if self.chunks is None:
            zeros = [(h.name, np.zeros(spec_from_header(h).shape, spec_from_header(h).dtype)) for h in headers]
            self.chunks = list(encode_tensors(zeros, self.chunk_bytes))


@dataclass
class Transfers:
    """What a worker needs to move tensor bytes: the transport asked for, the threads bulk transfers run in, and the
    count of transfers by (direction, transport)."""

    transport: str
    pool: ThreadPoolExecutor | None = None
    counts: Counter = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        used = {t for (_, t) in self.counts}
        return {
            "transport": self.transport,
            "transport_used": used.pop() if len(used) == 1 else ("mixed" if used else "none"),
            "transfers": {f"{d}_{t}": n for (d, t), n in sorted(self.counts.items())},
        }


def bulk_download(site: SimSite, head: pb.ModelHeader) -> list[pb.TensorHeader]:
    """Take the model over the bulk channel with fedclient's BulkClient; the tensors' headers (data is dropped)."""
    assert site.bulk is not None
    headers: list[pb.TensorHeader] = []
    with site.bulk.open(site.target, head.bulk_port, head.bulk_ticket, "download") as connection:
        for chunk in connection.chunks():
            if chunk.WhichOneof("part") == "tensor":
                headers.append(chunk.tensor)
    return headers


def bulk_upload(
    site: SimSite, ticket: pb.OpenUploadReply, header: pb.ModelHeader, chunks: list[pb.ModelChunk]
) -> pb.SubmitReply:
    """Send the update over the bulk channel with fedclient's BulkClient, as Communicator._submit_over_bulk does."""
    assert site.bulk is not None
    with site.bulk.open(site.target, ticket.bulk_port, ticket.ticket, "upload") as connection:
        return connection.submit(header, chunks)


async def get_model(
    site: SimSite, stub: TrainingStub, md: tuple, moves: Transfers, bulk: bool
) -> tuple[pb.ModelHeader, list[pb.TensorHeader], float, bool]:
    """Long-poll GetModel as fedclient's Communicator.getModel does: (header, tensor headers, when the header came,
    whether the tensors came over the bulk channel). A bulk download that fails is asked again over gRPC."""
    call = stub.GetModel(pb.GetModelRequest(wait_seconds=LONG_POLL_S, bulk=bulk), metadata=md, timeout=TRANSFER_S)
    first = await call.read()
    if first is grpc.aio.EOF or first.WhichOneof("part") != "header":
        raise RuntimeError(f"{site.name}: GetModel without a header")
    head, got = first.header, time.perf_counter()
    headers: list[pb.TensorHeader] = []
    if head.bulk_ticket:
        try:
            headers = await asyncio.get_running_loop().run_in_executor(moves.pool, bulk_download, site, head)
        except (BulkUnavailable, BulkError) as e:
            call.cancel()
            site.errors.append(f"bulk download: {e}")
            return await get_model(site, stub, md, moves, False)
        if await call.read() is not grpc.aio.EOF:
            raise RuntimeError(f"{site.name}: the server sent chunks besides the bulk download")
        moves.counts["download", "bulk"] += 1
        return head, headers, got, True
    while (chunk := await call.read()) is not grpc.aio.EOF:
        if chunk.WhichOneof("part") == "tensor":
            headers.append(chunk.tensor)
    if head.status != pb.WAIT:  # a model came (the last, with END, too)
        moves.counts["download", "grpc"] += 1
    return head, headers, got, False


async def submit(
    site: SimSite, stub: TrainingStub, md: tuple, moves: Transfers, header: pb.ModelHeader, chunks: list, bulk: bool
) -> pb.SubmitReply:
    """Send the update as Communicator.submitUpdate does: over the bulk channel when the model came over it and the
    server gives a ticket, else (or when that fails) in a SubmitUpdate stream."""
    if bulk:
        request = pb.OpenUploadRequest(run_number=header.run_number, round=header.round)
        ticket = await stub.OpenUpload(request, metadata=md, timeout=OPEN_UPLOAD_S)
        if ticket.bulk_port:
            loop = asyncio.get_running_loop()
            try:
                reply = await loop.run_in_executor(moves.pool, bulk_upload, site, ticket, header, chunks)
            except BulkUnavailable as e:
                site.errors.append(f"bulk upload: {e}")
            except BulkError as e:
                site.errors.append(f"bulk upload broke off: {e}")
                await asyncio.sleep(BULK_RETRY_PAUSE_S)
            else:
                moves.counts["upload", "bulk"] += 1
                return reply
    reply = await stub.SubmitUpdate(iter([pb.ModelChunk(header=header), *chunks]), metadata=md, timeout=TRANSFER_S)
    moves.counts["upload", "grpc"] += 1
    return reply


async def worker(
    site: SimSite,
    update: ZeroUpdate,
    rounds: dict[int, dict[str, tuple[float, float]]],
    registered: asyncio.Barrier,
    uploaded: Callable[[int, int], None],
    moves: Transfers,
) -> None:
    """Register, wait until every site has, then take part in every round until the run ends."""
    stub = TrainingStub(site.channel)
    token = (await stub.Register(pb.RegisterRequest(client_name=site.name), timeout=120)).token
    md = (("fl-token", token),)
    await registered.wait()
    while True:
        asked = moves.transport == "bulk" and site.bulk is not None and site.bulk.usable(site.target)
        head, headers, got, over_bulk = await get_model(site, stub, md, moves, asked)
        if head.status == pb.WAIT:
            continue
        if head.status == pb.END:
            return
        update.build(headers)
        assert update.chunks is not None
        header = pb.ModelHeader(
            run_number=head.run_number, round=head.round, kind="delta_w", weight=1.0, num_tensors=len(headers)
        )
        reply = await submit(site, stub, md, moves, header, update.chunks, over_bulk)
        if not reply.accepted:
            raise RuntimeError(f"{site.name}: round {head.round} refused: {reply.reason}")
        done = rounds.setdefault(head.round, {})
        done[site.name] = (got, time.perf_counter())
        uploaded(head.round, len(done))


async def sample_when_registered(registered: asyncio.Barrier, pid: int, timeline: list[dict[str, Any]]) -> None:
    """One sample once every site has registered, before the first of them asks for a model."""
    while registered.n_waiting < registered.parties - 1:
        await asyncio.sleep(0.01)
    timeline.append(sample(pid, "registered"))
    await registered.wait()


async def sample_highest(pid: int, stop: asyncio.Event, highest: dict[str, Any], every_s: float = 0.1) -> None:
    """Sample the server until `stop`, keeping the sample of highest RSS: where a peak between the timeline's
    moments lies."""
    while not stop.is_set():
        taken = await asyncio.to_thread(sample, pid, "highest sampled")
        if taken["rss_bytes"] > highest.get("rss_bytes", 0):
            highest.clear()
            highest.update(taken)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


async def bench_rounds(
    k: int,
    size_mib: float,
    num_rounds: int,
    work: Path,
    timeout_s: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    transport: str = "bulk",
) -> dict[str, Any]:
    out: dict[str, Any] = {"sites": k, "size_mib": size_mib, "rounds": num_rounds, "upload_chunk_bytes": chunk_bytes}
    # A real site's transfer runs in its own thread: one per simulated site, so none waits for another's.
    moves = Transfers(transport, ThreadPoolExecutor(k, "bulk-site") if transport == "bulk" else None)
    kits = work / f"rounds-{k}"
    fl_port, admin_port = free_ports(2)
    prepare_poc(kits, k, "127.0.0.1", fl_port, admin_port, "scale", False)
    mmar = work / f"mmar-{k}"
    model_bytes = int(size_mib * MIB) // 4 * 4
    write_mmar(mmar, model_bytes, 1 * MIB)
    config = mmar / "config" / "config_fed_server.json"
    server_cfg = json.loads(config.read_text())
    server_cfg.update(min_num_clients=k, max_num_clients=k, num_rounds=num_rounds, heart_beat_timeout=600)
    config.write_text(json.dumps(server_cfg, indent=2))
    server = Child(
        "server",
        [sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(kits / "server"), "--mmar", str(mmar)],
        work / f"server-rounds-{k}.stderr.txt",
    )
    sites: list[SimSite] = []
    try:
        # Deploying and starting copy the initial model (twice): allow for a large one on a slow disk.
        deadline = time.monotonic() + 60 + 30 * model_bytes / (1 << 30)
        while not server.next_line(deadline).startswith("fedserver ready on"):
            pass
        pid = server.proc.pid
        out["server_ready_rss_bytes"] = proc_status(pid, "VmRSS")
        timeline = [sample(pid, "ready")]
        out["server_rss_timeline"] = timeline
        sites = open_sites(kits, [f"site-{i}" for i in range(1, k + 1)], f"127.0.0.1:{fl_port}", transport == "bulk")
        rounds: dict[int, dict[str, tuple[float, float]]] = {}
        update = ZeroUpdate(chunk_bytes)
        # Every site connected and registered, none has asked for a model yet: what their sessions cost.
        registered = asyncio.Barrier(k + 1)  # the sites and the sampler

        def uploaded(number: int, uploads: int) -> None:
            if uploads == k:  # the server closed the round inside this upload
                timeline.append(sample(pid, f"round {number} closed"))

        t0, cpu0 = time.monotonic(), server.cpu_seconds()
        workers = [worker(s, update, rounds, registered, uploaded, moves) for s in sites]
        watched, highest = asyncio.Event(), {}
        watcher = asyncio.create_task(sample_highest(pid, watched, highest))
        try:
            await asyncio.wait_for(
                asyncio.gather(*workers, sample_when_registered(registered, pid, timeline)), timeout_s
            )
        finally:
            watched.set()
            await watcher
        if highest:
            timeline.append(highest)
        out["run_s"] = time.monotonic() - t0
        cpu1 = server.cpu_seconds()
        if cpu0 is not None and cpu1 is not None:  # (user, system) CPU seconds of the server for the whole run
            out["server_run_cpu_s"] = [cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]]
        summary = json.loads((kits / "server" / "run_1" / "summary.json").read_text())
        out["status"] = summary.get("status")
        walls = {}
        for number, times in sorted(rounds.items()):
            if len(times) != k:
                raise RuntimeError(f"round {number}: {len(times)} of {k} sites took part")
            walls[number] = max(t[1] for t in times.values()) - min(t[0] for t in times.values())
        out["round_walls_s"] = [walls[r] for r in sorted(walls)]
        # The first round also holds the sites' registration and connection set-up.
        out["round_s"] = out["round_walls_s"][1:] or out["round_walls_s"]
        out["server_peak_rss_bytes"] = proc_status(server.proc.pid, "VmHWM")
        # The sites are still connected and registered, no transfer is in flight: what holding them costs.
        out["server_rss_after_bytes"] = proc_status(server.proc.pid, "VmRSS")
        timeline.append(sample(pid, "run ended"))
        await asyncio.sleep(SETTLE_S)
        timeline.append(sample(pid, f"run ended + {SETTLE_S:g} s"))
        out["completed"] = out["status"] == "completed"
        out["site_errors"] = sum(len(s.errors) for s in sites)
        out["first_site_error"] = next((s.errors[0] for s in sites if s.errors), "")
    finally:
        out.update(moves.report())
        for s in sites:
            await s.channel.close(grace=None)
        if moves.pool is not None:
            moves.pool.shutdown(wait=False, cancel_futures=True)
        server.stop()
    return out


# ---- report -----------------------------------------------------------------------------------------


def verdict(value: float | None, target: float) -> str:
    return "" if value is None else ("met" if value <= target else "MISSED")


def render(report: dict[str, Any]) -> str:
    rows = [["figure", "median", "runs", "target", ""]]
    for a in report["agents"]:
        n = a["sites"]
        if a.get("error"):
            rows.append([f"{n} sites", "failed", "", "", a["error"][:80]])
            continue
        rss = a["server_rss_bytes"] / MIB
        rows += [
            [
                f"{n} sites: server idle CPU",
                f"{a['idle_cpu_pct']:.2f} % of a core",
                "1",
                f"<= {TARGETS['idle_cpu_pct']:g}",
                verdict(a["idle_cpu_pct"], TARGETS["idle_cpu_pct"]),
            ],
            [
                f"{n} sites: server RSS (peak)",
                f"{rss:.0f} MiB ({a['server_peak_rss_bytes'] / MIB:.0f})",
                "1",
                f"<= {TARGETS['rss_mib']:g}",
                verdict(a["server_peak_rss_bytes"] / MIB, TARGETS["rss_mib"]),
            ],
            [f"{n} sites: server threads", str(a["server_threads"]), "1", "", ""],
            [
                f"{n} sites: `status client`, in one process",
                f"{statistics.median(a['status_client_s']):.3g} s",
                str(len(a["status_client_s"])),
                f"<= {TARGETS['status_client_s']:g}",
                verdict(statistics.median(a["status_client_s"]), TARGETS["status_client_s"]),
            ],
            [
                f"{n} sites: one-shot `fedadmin --json status client`",
                f"{statistics.median(a['one_shot_status_client_s']):.3g} s",
                str(len(a["one_shot_status_client_s"])),
                f"<= {TARGETS['status_client_s']:g}",
                verdict(statistics.median(a["one_shot_status_client_s"]), TARGETS["status_client_s"]),
            ],
        ]
    for r in report["rounds"]:
        label = f"{r['sites']} sites: {r['size_mib']:g} MiB round ({r.get('transport_used', '?')})"
        if r.get("error"):
            rows.append([label, "failed", "", "", r["error"][:80]])
            continue
        rows.append(
            [
                label,
                f"{statistics.median(r['round_s']):.3g} s",
                str(len(r["round_s"])),
                f"<= {TARGETS['round_s']:g}",
                verdict(statistics.median(r["round_s"]), TARGETS["round_s"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"agents": [], "rounds": []}
    for n in args.sites:
        try:
            report["agents"].append(await bench_agents(n, work, args.idle_s, args.repeat, args.profile))
        except Exception as e:  # a benchmark reports what broke and goes on
            report["agents"].append({"sites": n, "error": f"{type(e).__name__}: {e}"})
    if args.round_sites:
        try:
            report["rounds"].append(
                await bench_rounds(
                    args.round_sites,
                    args.round_mib,
                    args.rounds,
                    work,
                    args.timeout,
                    args.upload_chunk_kib << 10,
                    args.transport,
                )
            )
        except Exception as e:
            report["rounds"].append(
                {"sites": args.round_sites, "size_mib": args.round_mib, "error": f"{type(e).__name__}: {e}"}
            )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="*", default=[100, 1000], help="agent counts (default 100 1000)")
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle window, seconds (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="status client calls per count (default 3)")
    parser.add_argument("--round-sites", type=int, default=100, help="sites in the rounds (0: skip; default 100)")
    parser.add_argument("--round-mib", type=float, default=10.0, help="model size for the rounds (default 10)")
    parser.add_argument(
        "--upload-chunk-kib",
        type=int,
        default=DEFAULT_CHUNK_BYTES >> 10,
        help=f"size of the sites' upload messages (default {DEFAULT_CHUNK_BYTES >> 10}, as fedclient's)",
    )
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="bulk",
        help="how the rounds' tensor bytes move: bulk (default, as fedclient: the bulk channel when the server "
        "offers it, else gRPC) or grpc (the GetModel / SubmitUpdate streams only)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds to run (default 3; the first is set-up)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for the rounds")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the kits and the server logs (prints where)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder for py-spy samples of the server (idle window, status client): needs py-spy",
    )
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.workdir))
    try:
        report = asyncio.run(run(args, tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["targets"] = TARGETS
    print(json.dumps(report, indent=2) if args.json else render(report))
    failed = [r for r in report["agents"] + report["rounds"] if r.get("error") or r.get("completed") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The floor under the server's memory with many sites: a bare grpcio server's RSS per mutual-TLS connection.

A child process runs a grpcio server and nothing of fedlearn but its malloc settings (fedserver/malloc_arenas.py):
the fl_port's channel arguments (FL_OPTIONS, a test keeps them equal to fedserver.server.GRPC_OPTIONS), a thread
pool of the same size, mutual TLS with a PoC kit's certificates. This process opens N channels to it, one
certificate each as scale_bench's sites, and each holds what a site holds on the server between rounds: a
long-poll (a unary call the server keeps for `--wait-s`, as Retrieve and GetModel do, one thread each in the sync
server). Then every connection downloads and uploads `--transfer-mib` MiB in 2 MiB messages (at most 8 downloads
at once, as fedserver's download slots), as a round of scale_bench does. Measured from /proc: the server's RSS
at ready, with N connections, after the transfers, a few seconds later, and after the channels close; the
differences per connection.

A benchmark, not a test: targets are neither printed nor asserted. Compare with scale_bench.py's
server_rss_timeline (the real fedserver, the same N and model size).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402

MIB = 1 << 20
CHUNK_BYTES = 2 * MIB  # fedcommon.tensor_codec.DEFAULT_CHUNK_BYTES: the messages of a model's stream
MAX_MESSAGE_BYTES = 16 * MIB  # fedcommon.tensor_codec.MAX_MESSAGE_BYTES
DOWNLOAD_SLOTS = 8  # fedserver.training_service.DOWNLOAD_SLOTS: downloads that send bytes at once
UPLOAD_SLOTS = 4  # fedserver.training_service.MAX_CONCURRENT_UPLOADS: uploads received at once
WORKERS = 4096  # fedserver.server.FL_WORKERS
# fedserver.server.GRPC_OPTIONS, value for value (test_grpc_floor_bench checks): importing fedserver.server here
# would load numpy and the rest of the server, which is what this floor leaves out.
FL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_concurrent_streams", 256),
    ("grpc.max_connection_idle_ms", 300_000),
]
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
SERVICE = "floor.Floor"
SETTLE_S = 5.0


def _raw(data: bytes) -> bytes:
    return data


# ---- the bare server (child process) ---------------------------------------------------------------


class FloorService:
    """Hold (a long-poll), Pull (a model's stream), Push (an upload's stream): raw bytes, no fedlearn code."""

    def __init__(self, stop: threading.Event, upload_slots: int, chunk_bytes: int) -> None:
        self._stop = stop
        self._slots = threading.BoundedSemaphore(DOWNLOAD_SLOTS)
        self._upload_slots = threading.BoundedSemaphore(upload_slots)
        self._chunk = bytes(chunk_bytes)  # one buffer sent by every download, as a file's pages would be

    def hold(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._stop.wait(min(float(request.decode("ascii")), 600.0))
        return b""

    def pull(self, request: bytes, context: grpc.ServicerContext):
        left = min(int(request.decode("ascii")), 1 << 34)
        with self._slots:
            while left > 0:
                n = min(left, len(self._chunk))
                yield self._chunk[:n] if n < len(self._chunk) else self._chunk
                left -= n

    def push(self, request_iterator, context: grpc.ServicerContext) -> bytes:
        # As fedserver's SubmitUpdate: the first message (its header) is read before waiting for an upload slot.
        got = len(next(request_iterator, b""))
        with self._upload_slots:
            got += sum(len(chunk) for chunk in request_iterator)
        return str(got).encode("ascii")

    def trim(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Give malloc's free pages back to the kernel (glibc's malloc_trim); answers 1 if any were."""
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return str(libc.malloc_trim(0)).encode("ascii")

    def handler(self) -> grpc.GenericRpcHandler:
        kw = {"request_deserializer": _raw, "response_serializer": _raw}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Hold": grpc.unary_unary_rpc_method_handler(self.hold, **kw),
                "Pull": grpc.unary_stream_rpc_method_handler(self.pull, **kw),
                "Push": grpc.stream_unary_rpc_method_handler(self.push, **kw),
                "Trim": grpc.unary_unary_rpc_method_handler(self.trim, **kw),
            },
        )


def serve(args: argparse.Namespace) -> None:
    """Serve on a free port of 127.0.0.1 until stdin closes; prints `ready PORT`."""
    if not args.glibc_default:
        from fedserver.malloc_arenas import bound_malloc_arenas

        bound_malloc_arenas()
    if args.stack_kib:
        threading.stack_size(args.stack_kib << 10)
    startup = args.serve / "startup"
    creds = grpc.ssl_server_credentials(
        [((startup / "key.pem").read_bytes(), (startup / "cert.pem").read_bytes())],
        root_certificates=(startup / "rootCA.pem").read_bytes(),
        require_client_auth=True,
    )
    stop = threading.Event()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="fl"),
        options=server_options(args.option),
        maximum_concurrent_rpcs=args.workers,
    )
    server.add_generic_rpc_handlers((FloorService(stop, args.upload_slots, args.chunk_kib << 10).handler(),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(f"ready {port}", flush=True)
    sys.stdin.read()
    stop.set()
    server.stop(grace=None).wait(10)


# ---- the connections (this process) ----------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status field in bytes (kB fields) or as a count."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            value = int(line.split()[1])
            return value * 1024 if line.rstrip().endswith("kB") else value
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


ARENA_HEAP_BYTES = 64 * MIB  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's heaps are mapped at this alignment


def rss_by_kind(pid: int) -> dict[str, int]:
    """The process's resident bytes by the kind of mapping that holds them (from /proc/PID/smaps)."""
    kinds: dict[str, int] = {}
    previous_guard_end = -1
    kind = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            perms, path = fields[1], fields[5] if len(fields) > 5 else ""
            if path == "[heap]":
                kind = "malloc main heap"
            elif path.startswith("/"):
                kind = "files (code, libraries)"
            elif path:
                kind = path
            elif start == previous_guard_end and perms.startswith("rw"):
                kind = "thread stacks"  # a pthread stack sits just above its guard page
            elif start % ARENA_HEAP_BYTES == 0 and perms.startswith("rw"):
                kind = "malloc thread arenas"
            else:
                kind = "other anonymous (mmapped buffers)"
            is_guard = perms.startswith("---") and not path and end - start <= 64 << 10
            previous_guard_end = end if is_guard else -1
        elif fields[0] == "Rss:":
            kinds[kind] = kinds.get(kind, 0) + int(fields[1]) * 1024
    return {k: v for k, v in sorted(kinds.items()) if v}


def sample(pid: int, at: str) -> dict[str, Any]:
    """Process `pid`'s RSS, its peak so far, its threads and where the RSS lies, labelled with the moment `at`."""
    return {
        "at": at,
        "rss_bytes": proc_status(pid, "VmRSS"),
        "peak_bytes": proc_status(pid, "VmHWM"),
        "threads": proc_status(pid, "Threads"),
        "rss_by_kind": rss_by_kind(pid),
    }


class Connection:
    """One site's channel (its own certificate) and the long-polls it keeps open."""

    def __init__(self, kit: Path, target: str) -> None:
        startup = kit / "startup"
        creds = grpc.ssl_channel_credentials(
            root_certificates=(startup / "rootCA.pem").read_bytes(),
            private_key=(startup / "key.pem").read_bytes(),
            certificate_chain=(startup / "cert.pem").read_bytes(),
        )
        self.channel = grpc.aio.secure_channel(target, creds, CLIENT_OPTIONS)
        kw = {"request_serializer": _raw, "response_deserializer": _raw}
        self.hold = self.channel.unary_unary(f"/{SERVICE}/Hold", **kw)
        self.pull = self.channel.unary_stream(f"/{SERVICE}/Pull", **kw)
        self.push = self.channel.stream_unary(f"/{SERVICE}/Push", **kw)
        self.trim = self.channel.unary_unary(f"/{SERVICE}/Trim", **kw)
        self.polls: list[asyncio.Task] = []

    async def keep_polling(self, wait_s: float) -> None:
        """Long-poll again as each one ends, as an agent does with Retrieve."""
        while True:
            await self.hold(str(wait_s).encode("ascii"), timeout=wait_s + 30)

    async def transfer(self, nbytes: int, chunk: bytes, down: bool, up: bool) -> None:
        """Download `nbytes`, then upload as many, as a site's round does (either may be left out)."""
        if down:
            got = 0
            async for part in self.pull(str(nbytes).encode("ascii"), timeout=1800):
                got += len(part)
            if got != nbytes:
                raise RuntimeError(f"downloaded {got} of {nbytes} bytes")
        if up:
            chunks = [chunk[: min(len(chunk), nbytes - off)] for off in range(0, nbytes, len(chunk))]
            sent = int(await self.push(iter(chunks), timeout=1800))
            if sent != nbytes:
                raise RuntimeError(f"the server received {sent} of {nbytes} bytes")


async def wait_threads(pid: int, at_least: int, timeout: float) -> None:
    """Until the server has `at_least` threads (a thread per held call): the long-polls have arrived."""
    deadline = time.monotonic() + timeout
    while proc_status(pid, "Threads") < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server has {proc_status(pid, 'Threads')} threads, not {at_least}, in {timeout} s")
        await asyncio.sleep(0.1)


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    # Here, not at the top: the server child runs this file too, and must not load these.
    from round_bench import Child, free_ports

    from fedcommon.provision import prepare_poc

    n = args.connections
    prepare_poc(work, n, "127.0.0.1", *free_ports(2), "floor", False)
    cmd = [sys.executable, __file__, "--serve", str(work / "server"), "--workers", str(args.workers)]
    cmd += ["--stack-kib", str(args.stack_kib), "--upload-slots", str(args.upload_slots)]
    cmd += ["--chunk-kib", str(args.chunk_kib)]
    cmd += ["--glibc-default"] if args.glibc_default else []
    for key, value in args.option:
        cmd += ["--option", f"{key}={value}"]
    server = Child("bare grpc server", cmd, work / "server.stderr.txt", stdin=True)
    conns: list[Connection] = []
    out: dict[str, Any] = {"connections": n, "polls": args.polls, "transfer_mib": args.transfer_mib}
    out["transfer"] = args.transfer
    out["upload_slots"] = args.upload_slots
    out["chunk_bytes"] = args.chunk_kib << 10
    out["options"] = dict(server_options(args.option))
    timeline: list[dict[str, Any]] = []
    out["timeline"] = timeline
    try:
        port = int(server.next_line(time.monotonic() + 60).split()[1])
        pid = server.proc.pid
        await asyncio.sleep(1)
        timeline.append(sample(pid, "ready"))
        base_threads = timeline[0]["threads"]
        conns = [Connection(work / f"site-{i}", f"127.0.0.1:{port}") for i in range(1, n + 1)]
        for c in conns:
            c.polls = [asyncio.create_task(c.keep_polling(args.wait_s)) for _ in range(args.polls)]
        await wait_threads(pid, base_threads + n * args.polls, 300)
        await asyncio.sleep(2)
        timeline.append(sample(pid, "connected, long-polls held"))
        if args.transfer_mib > 0:
            nbytes = int(args.transfer_mib * MIB)
            chunk = bytes(args.chunk_kib << 10)
            down, up = args.transfer in ("both", "down"), args.transfer in ("both", "up")
            walls = []
            for number in range(args.rounds):
                t0 = time.monotonic()
                await asyncio.gather(*(c.transfer(nbytes, chunk, down, up) for c in conns))
                walls.append(time.monotonic() - t0)
                timeline.append(sample(pid, f"round {number} transferred"))
                if args.trim:
                    await conns[0].trim(b"", timeout=60)
                    timeline.append(sample(pid, f"round {number}: after malloc_trim"))
            out["transfer_s"] = walls
            await asyncio.sleep(SETTLE_S)
            timeline.append(sample(pid, f"after the transfers + {SETTLE_S:g} s"))
        for c in conns:
            for task in c.polls:
                task.cancel()
            await c.channel.close(grace=None)
        conns = []
        await asyncio.sleep(SETTLE_S)
        timeline.append(sample(pid, f"channels closed + {SETTLE_S:g} s"))
    finally:
        for c in conns:
            for task in c.polls:
                task.cancel()
            await c.channel.close(grace=None)
        if server.proc.poll() is None:
            server.proc.stdin.close()
            try:
                server.proc.wait(15)
            except subprocess.TimeoutExpired:
                server.stop()
    rss = {s["at"]: s["rss_bytes"] for s in timeline}
    ready = timeline[0]["rss_bytes"]
    out["rss_ready_bytes"] = ready
    out["per_connection_bytes"] = (timeline[1]["rss_bytes"] - ready) / n
    if args.transfer_mib > 0:
        out["per_connection_after_transfers_bytes"] = (rss[f"after the transfers + {SETTLE_S:g} s"] - ready) / n
    out["peak_bytes"] = timeline[-1]["peak_bytes"]
    return out


def server_options(overrides: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """FL_OPTIONS with `overrides` replacing or adding keys."""
    merged = dict(FL_OPTIONS)
    merged.update(overrides)
    return list(merged.items())


def render(report: dict[str, Any]) -> str:
    n = report["connections"]
    lines = [f"bare grpcio server, mutual TLS, {n} connections x {report['polls']} long-poll(s)"]
    for s in report["timeline"]:
        lines.append(f"  {s['at']:<36} RSS {s['rss_bytes'] / MIB:8.1f} MiB   threads {s['threads']}")
        kinds = ", ".join(f"{k} {v / MIB:.1f}" for k, v in s["rss_by_kind"].items())
        lines.append(f"    MiB by mapping: {kinds}")
    lines.append(f"  per connection: {report['per_connection_bytes'] / 1024:.0f} KiB")
    if "per_connection_after_transfers_bytes" in report:
        after = report["per_connection_after_transfers_bytes"] / 1024
        lines.append(f"  per connection after {report['transfer_mib']:g} MiB down and up each: {after:.0f} KiB")
    lines.append(f"  peak RSS: {report['peak_bytes'] / MIB:.1f} MiB")
    return "\n".join(lines)


def option(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("grpc."):
        raise argparse.ArgumentTypeError(f"{text!r}: give a channel argument as grpc.NAME=INTEGER")
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be an integer") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=100, help="client connections (default 100)")
    parser.add_argument("--polls", type=int, default=1, help="long-polls each connection holds (default 1)")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long the server holds a long-poll")
    parser.add_argument("--transfer-mib", type=float, default=10.0, help="MiB each connection downloads and uploads")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"server thread pool (default {WORKERS})")
    parser.add_argument("--stack-kib", type=int, default=0, help="server threads' stack size (0: the default)")
    parser.add_argument(
        "--chunk-kib", type=int, default=CHUNK_BYTES >> 10, help=f"message size (default {CHUNK_BYTES >> 10})"
    )
    parser.add_argument("--rounds", type=int, default=4, help="times every connection transfers (default 4)")
    parser.add_argument(
        "--transfer", choices=("both", "down", "up"), default="both", help="which way the transfers go (default both)"
    )
    parser.add_argument(
        "--upload-slots", type=int, default=UPLOAD_SLOTS, help=f"uploads received at once (default {UPLOAD_SLOTS})"
    )
    parser.add_argument("--trim", action="store_true", help="have the server call malloc_trim after each round")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc as it is in the server")
    parser.add_argument(
        "--option", type=option, action="append", default=[], help="a server channel argument, grpc.NAME=INTEGER"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs, each with a fresh server (default 1)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args)
        return 0
    if min(args.connections, args.repeat, args.chunk_kib, args.upload_slots) < 1 or args.polls < 0:
        parser.error("--connections, --repeat, --chunk-kib and --upload-slots must be at least 1, --polls at least 0")
    runs = []
    for _ in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="grpc-floor-"))
        try:
            runs.append(asyncio.run(measure(args, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(runs, indent=2) if args.json else "\n".join(render(r) for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

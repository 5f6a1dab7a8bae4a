"""The floor under round_bench's round: the same bytes over bare mutual-TLS sockets, with nothing of fedlearn.

One server process and two site processes on loopback, with the PoC kits' certificates and the same TLS settings as
fedlearn's bulk channel (`fedcommon.kit` contexts, Python's ssl). In the round, each site pulls the model into the
model it holds (touched before the round, as round_bench's sites build theirs) and sends it back at once as its
update; the server adds each update into a running sum as it arrives, then adds the sum to the model and writes the
model to a file and fsyncs it. The round's wall is timed as round_bench times it: the first site's pull starting to
the last site's push acknowledged, after the model is durable.

It is a lower bound, not a design: it checks nothing (no tokens, no tensor names, shapes or finiteness), keeps the
model as well as the running sum in memory, touched before the round (fedlearn's server keeps only the sum there),
has no protocol around the bytes, and its sites compute no update and keep no copy of the global model. Whatever it
takes on a machine, fedlearn's round cannot take less there.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedcommon.kit import CA_FILE, CERT_FILE, KEY_FILE, client_ssl_context, load_kit, server_ssl_context  # noqa: E402
from fedcommon.provision import prepare_poc  # noqa: E402

MIB = 2**20
PIECE = 4 * MIB  # what the server reads before adding it to the sum, as fedlearn's bulk channel reads pieces
SEND_SLICE = 16 * MIB
WRITE_SLICE = 64 * MIB
SITES = ("site-1", "site-2")
TIMEOUT_S = 600.0


def recv_exact(conn: socket.socket, view: memoryview) -> None:
    while view:
        n = conn.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed early")
        view = view[n:]


def send_all(conn: socket.socket, view: memoryview) -> None:
    for at in range(0, len(view), SEND_SLICE):
        conn.sendall(view[at : at + SEND_SLICE])


def open_direct(path: Path, flags: int) -> tuple[int, bool]:
    """A descriptor with direct I/O where the file system takes it, else through the page cache; and which."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), True
    except OSError:
        return os.open(path, flags, 0o600), False


def write_durably(path: Path, data: np.ndarray) -> bool:
    """The model to disk, fsynced: direct I/O where the file system takes it (the fastest way on this VM), else the
    page cache; returns whether it was direct. `data` must be page-aligned, as O_DIRECT needs (page_aligned)."""
    view = memoryview(data).cast("B")
    fd, direct = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for at in range(0, len(view), WRITE_SLICE):
            os.write(fd, view[at : at + WRITE_SLICE])
        os.fsync(fd)
    finally:
        os.close(fd)
    return direct


def follow_parent() -> None:
    """Exit when the benchmark that started this child is gone (killed on a timeout, say): nothing is left behind."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def page_aligned(count: int) -> np.ndarray:
    """float32 zeros in anonymous memory of their own (malloc would put a header before them)."""
    return np.frombuffer(mmap.mmap(-1, count * 4), np.float32)


def disk_seconds(folder: Path, nbytes: int) -> dict[str, Any]:
    """This disk's own speed, as fedlearn's server uses it for model-sized files: a new file written direct and
    fsynced, then read back direct (disk_direct: false where the file system refused direct I/O)."""
    data = page_aligned(nbytes // 4)
    data.fill(1.0)
    path = folder / "disk.bin"
    t0 = time.perf_counter()
    wrote_direct = write_durably(path, data)
    t1 = time.perf_counter()
    view = memoryview(data).cast("B")
    fd, read_direct = open_direct(path, os.O_RDONLY)
    try:
        for at in range(0, len(view), WRITE_SLICE):
            os.preadv(fd, [view[at : at + WRITE_SLICE]], at)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    path.unlink()
    return {"disk_write_s": t1 - t0, "disk_read_s": t2 - t1, "disk_direct": wrote_direct and read_direct}


def serve(kit_folder: Path, nbytes: int, out_file: Path) -> int:
    follow_parent()
    context = server_ssl_context(load_kit(kit_folder))
    model = page_aligned(nbytes // 4)
    model.fill(1.0)
    total = page_aligned(model.size)
    total.fill(0.0)  # touched now, as model is
    pieces = range(0, model.size, PIECE // 4)
    locks = {at: threading.Lock() for at in pieces}
    model_bytes = memoryview(model).cast("B")
    done = threading.Event()
    arrived = threading.Barrier(len(SITES), action=lambda: close_round(model, total, out_file))
    errors: list[str] = []

    def close_round(model: np.ndarray, total: np.ndarray, path: Path) -> None:
        model += total
        write_durably(path, model)

    def one_site(raw: socket.socket) -> None:
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                command = bytearray(1)
                recv_exact(conn, memoryview(command))
                send_all(conn, model_bytes)
                piece = np.empty(PIECE // 4, np.float32)
                scaled = np.empty_like(piece)
                for at in pieces:
                    part = piece[: min(piece.size, model.size - at)]
                    recv_exact(conn, memoryview(part).cast("B"))
                    np.multiply(part, 1.0 / len(SITES), out=scaled[: part.size])
                    with locks[at]:
                        np.add(total[at : at + part.size], scaled[: part.size], out=total[at : at + part.size])
                arrived.wait(TIMEOUT_S)
                conn.sendall(b"K")
        except Exception as e:  # reported on stdout; the round then fails
            errors.append(f"{type(e).__name__}: {e}")
            arrived.abort()
        finally:
            done.set()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
        threads = []
        for _ in SITES:
            raw, _addr = listener.accept()
            threads.append(threading.Thread(target=one_site, args=(raw,)))
            threads[-1].start()
        for t in threads:
            t.join()
    print(json.dumps({"errors": errors}), flush=True)
    return 1 if errors else 0


def site(kit_folder: Path, port: int, nbytes: int) -> int:
    follow_parent()
    startup = kit_folder / "startup"
    files = {"ssl_root_cert": startup / CA_FILE, "ssl_cert": startup / CERT_FILE, "ssl_private_key": startup / KEY_FILE}
    context = client_ssl_context(files, kit_folder.name)
    weights = np.empty(nbytes // 4, np.float32)
    weights.fill(0.0)  # the site's own model, built before the round as round_bench's sites build theirs
    view = memoryview(weights).cast("B")
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as conn:
        print(json.dumps({"ready": True}), flush=True)
        if sys.stdin.readline().strip() != "go":  # the barrier: every site connected
            return 1
        pull_start = time.perf_counter()
        conn.sendall(b"P")
        recv_exact(conn, view)
        pull_end = time.perf_counter()
        send_all(conn, view)
        ack = bytearray(1)
        recv_exact(conn, memoryview(ack))
        push_end = time.perf_counter()
    print(json.dumps({"pull_start": pull_start, "pull_end": pull_end, "push_end": push_end}), flush=True)
    return 0


def read_json_line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a child ended early (exit {proc.wait()})")
    return json.loads(line)


def one_round(work: Path, size_mib: float) -> dict:
    nbytes = int(size_mib * MIB) // 4096 * 4096  # whole pages, as direct I/O needs
    kits = work / "kits"
    prepare_poc(kits, len(SITES), "127.0.0.1", 8002, 8003, "floor", False)  # the ports are not used
    me = [sys.executable, str(Path(__file__).resolve()), "--bytes", str(nbytes)]
    children: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen(
            [*me, "--serve", str(kits / "server"), "--out-file", str(work / "model.bin")],
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(server)
        port = read_json_line(server)["port"]
        sites = []
        for name in SITES:
            sites.append(
                subprocess.Popen(
                    [*me, "--site", str(kits / name), "--port", str(port)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            children.append(sites[-1])
        for s in sites:
            read_json_line(s)
        for s in sites:
            s.stdin.write("go\n")
            s.stdin.flush()
        times = [read_json_line(s) for s in sites]  # a site that failed raises; the server is then killed below
        errors = read_json_line(server)["errors"]
        if errors:
            raise RuntimeError("the server: " + "; ".join(errors))
        start = min(t["pull_start"] for t in times)
        round_wall = max(t["push_end"] for t in times) - start
        pulls_done = max(t["pull_end"] for t in times) - start
    finally:
        for child in children:  # each has ended or is about to, unless the round failed; one that hangs is killed
            try:
                child.wait(timeout=30 if sys.exc_info()[0] is None else 1)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return {"size_mib": size_mib, "round_wall_s": round_wall, "pulls_done_s": pulls_done, **disk_seconds(work, nbytes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--site", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.bytes, args.out_file)
    if args.site:
        return site(args.site, args.port, args.bytes)
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="round-floor-") as tmp:  # where round_bench works
            runs.append(one_round(Path(tmp), args.size_mib))
    report = {
        "runs": runs,
        **{
            f"{k}_median": statistics.median(r[k] for r in runs)
            for k in ("round_wall_s", "disk_write_s", "disk_read_s")
        },
    }
    if args.json:
        print(json.dumps(report))
    else:
        for r in runs:
            print(
                f"{r['size_mib']:g} MiB: round {r['round_wall_s']:.2f} s (pulls done at {r['pulls_done_s']:.2f} s); "
                f"the disk: written direct + fsync {r['disk_write_s']:.2f} s, read direct {r['disk_read_s']:.2f} s"
            )
        print(f"median round {report['round_wall_s_median']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark one federated round with 2 sites on a synthetic float32 model (not a test; `make bench`).

For each model size: fresh PoC kits and a synthetic MMAR in a temp folder, a real server
(`python -m fedserver.cli start`) and two sites (benchmarks/bench_site.py, DirectFederatedClient) on
loopback with mutual TLS. Each site first builds its own model, as a training loop builds its network
(--fresh-site-arrays: it holds none, and its pull decodes into arrays it allocates). Both sites register,
then start the round together: pull the global model into their model, change it slightly, push the
update. Measured: round wall time, bytes moved, peak RSS of the server and of each site, and per-phase
timings inside the sites. Printed as a table; --json prints one JSON object.

Targets (DESIGN.md §4, §13): a 100 MiB round in <= 3 s; peak server RSS <= 3x the model; 1 GiB completes.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedcommon.model_file import ModelFileWriter  # noqa: E402
from fedcommon.provision import prepare_poc  # noqa: E402

MIB = 1024 * 1024
TASK = "bench"
SITES = ("site-1", "site-2")
ROUND_TARGET_S = 3.0
ROUND_TARGET_MIB = 100
SERVER_RSS_TARGET_X = 3.0
STOP_GRACE_S = 10.0
NOISE_FRACTION = 0.10


# ---- set-up ---------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held open until every port is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tensor_sizes(model_bytes: int, tensor_bytes: int) -> list[int]:
    """Byte sizes of float32 tensors of `tensor_bytes` each (the last one smaller) adding up to model_bytes."""
    sizes = [tensor_bytes] * (model_bytes // tensor_bytes)
    if model_bytes % tensor_bytes:
        sizes.append(model_bytes % tensor_bytes)
    return sizes


def write_model(path: Path, model_bytes: int, tensor_bytes: int, seed: int = 0) -> int:
    """A .fl model of float32 tensors, written one tensor at a time; returns the number of tensors."""
    rng = np.random.default_rng(seed)
    sizes = tensor_sizes(model_bytes, tensor_bytes)
    specs = []
    for i, nbytes in enumerate(sizes):
        n = nbytes // 4
        shape = (n // 1024, 1024) if n % 1024 == 0 else (n,)
        specs.append((f"layer{i:04d}.weight", np.dtype(np.float32), shape))
    with open(path, "wb") as f:
        writer = ModelFileWriter(f, specs, {"source": "benchmarks/round_bench.py"})
        for name, _dtype, shape in specs:
            arr = rng.random(int(np.prod(shape)), dtype=np.float32).reshape(shape)
            arr -= 0.5
            writer.write(name, arr)
        writer.check_complete()
    return len(specs)


def write_mmar(root: Path, model_bytes: int, tensor_bytes: int) -> int:
    """A synthetic MMAR: 2 sites, 1 round, an initial model file; returns the number of tensors."""
    (root / "config").mkdir(parents=True)
    (root / "custom").mkdir()
    (root / "models").mkdir()
    server = {
        "format_version": 1,
        "task_name": TASK,
        "min_num_clients": 2,
        "max_num_clients": 2,
        "wait_after_min_clients": 30,
        "start_round": 0,
        "num_rounds": 1,
        "heart_beat_timeout": 60,
        "exclude_vars": [],
        "aggregation_weights": {},
        "initial_model": {"file": "models/initial.fl"},
    }
    client = {"format_version": 1, "task_name": TASK, "exclude_vars": [], "weight_by": "uniform", "privacy": None}
    # The benchmark sites own their loop and never build the trainer; mmar.py still checks it exists.
    train = {"trainer": {"path": "bench.Nothing", "args": {}}, "seed": 0}
    for name, data in (
        ("config_fed_server.json", server),
        ("config_fed_client.json", client),
        ("config_train.json", train),
    ):
        (root / "config" / name).write_text(json.dumps(data, indent=2) + "\n")
    (root / "custom" / "bench.py").write_text('"""Benchmark trainer placeholder."""\n\n\nclass Nothing:\n    pass\n')
    return write_model(root / "models" / "initial.fl", model_bytes, tensor_bytes)


# ---- child processes ------------------------------------------------------------------------------


class Child:
    """A subprocess whose stdout lines are read by a thread; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, stdin: bool = False):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, deadline: float) -> str:
        """The next stdout line; raises when the process ends first or the deadline passes."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self.name}: no output in time ({self.tail()})")
        try:
            line = self.lines.get(timeout=left)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no output in time ({self.tail()})") from None
        if line is None:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} ({self.tail()})")
        return line

    def next_event(self, deadline: float) -> dict:
        """The next JSON line (other lines are skipped); an "error" event raises."""
        while True:
            line = self.next_line(deadline)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "error":
                raise RuntimeError(f"{self.name}: {event.get('error')}\n{event.get('traceback', '')}")
            return event

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(text[-lines:]) or "log empty"

    def proc_status(self, key: str) -> int | None:
        """A /proc/<pid>/status size field (VmHWM, VmRSS) in bytes, None once the process is gone."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None

    def cpu_seconds(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds of the process so far, all threads; None once it is gone."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def disk_bytes(self) -> tuple[int, int] | None:
        """(read, written) bytes the process has made the storage under its files move so far (/proc/<pid>/io: page-
        cache hits are not reads; direct I/O counts); None once it is gone."""
        try:
            fields = dict(line.split(": ") for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines())
            return int(fields["read_bytes"]), int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])
        except (OSError, KeyError, ValueError):
            return None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM by PID, SIGKILL after `grace` seconds; idempotent."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._log.close()


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs of the machine have spent busy (not idle or iowait) since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ---- one round ------------------------------------------------------------------------------------


def read_summary(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def aggregate_seconds(log_path: Path) -> float | None:
    """The server's own "aggregated in X s" figure for closing the round (aggregation + model write)."""
    try:
        found = re.findall(r"aggregated in ([0-9.]+)s", log_path.read_text(errors="replace"))
    except OSError:
        return None
    return float(found[-1]) if found else None


def sum_read_from(log_path: Path) -> str | None:
    """Where the server's close read the round's sum from ("memory" or "disk"), as its log says."""
    try:
        found = re.findall(r"its sum read from (\w+)", log_path.read_text(errors="replace"))
    except OSError:
        return None
    return found[-1] if found else None


def bench_round(
    size_mib: float,
    work: Path,
    tensor_mib: float,
    timeout_s: float,
    profile: bool,
    server_args: list[str],
    held_model: bool = True,
) -> dict[str, Any]:
    """Run one round on a model of `size_mib` MiB under `work`; returns the measurements (and "error")."""
    model_bytes = int(size_mib * MIB) // 4 * 4
    out: dict[str, Any] = {"size_mib": size_mib, "model_bytes": model_bytes, "completed": False, "error": None}
    children: list[Child] = []
    t_setup = time.monotonic()
    deadline = time.monotonic() + timeout_s
    try:
        kits = work / "kits"
        fl_port, admin_port = free_ports(2)
        prepare_poc(kits, len(SITES), "127.0.0.1", fl_port, admin_port, "bench", False)
        mmar = work / "mmar"
        out["num_tensors"] = write_mmar(mmar, model_bytes, int(tensor_mib * MIB) // 4 * 4)

        server = Child(
            "server",
            [
                *(sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(kits / "server")),
                *("--mmar", str(mmar), *server_args),
            ],
            work / "server.stderr.txt",
        )
        children.append(server)
        while not server.next_line(deadline).startswith("fedserver ready on"):
            pass
        out["server_rss_at_ready_bytes"] = server.proc_status("VmRSS")

        sites = []
        for name in SITES:
            cmd = [
                sys.executable,
                str(REPO / "benchmarks" / "bench_site.py"),
                "--workspace",
                str(kits / name),
                "--task",
                TASK,
            ]
            if held_model:  # as a training loop holds its network before it first pulls
                cmd += ["--local-model", str(mmar / "models" / "initial.fl")]
            if profile:
                cmd += ["--profile", str(work / f"{name}.prof")]
            site = Child(name, cmd, work / f"{name}.stderr.txt", stdin=True)
            children.append(site)
            sites.append(site)
        ready = {s.name: s.next_event(deadline) for s in sites}
        out["setup_s"] = time.monotonic() - t_setup
        cpu0, busy0 = server.cpu_seconds(), machine_busy_seconds()
        disk0 = [c.disk_bytes() for c in children]
        for site in sites:  # the barrier: both are registered and idle
            site.send("go\n")
        results = {s.name: s.next_event(deadline) for s in sites}
        for name, r in results.items():
            r["rss_at_ready_bytes"] = ready[name].get("rss_bytes")

        summary_path = kits / "server" / "run_1" / "summary.json"
        summary = read_summary(summary_path)
        while (summary is None or summary.get("status") != "completed") and time.monotonic() < deadline:
            time.sleep(0.1)
            summary = read_summary(summary_path)
        cpu1, busy1 = server.cpu_seconds(), machine_busy_seconds()
        disk1 = [c.disk_bytes() for c in children]
        if all(disk0) and all(disk1):  # the round's own disk I/O: server and sites
            out["disk_read_bytes"] = sum(b[0] - a[0] for a, b in zip(disk0, disk1, strict=True))
            out["disk_write_bytes"] = sum(b[1] - a[1] for a, b in zip(disk0, disk1, strict=True))
            out["disk_bytes_by_process"] = {
                c.name: {"read": b[0] - a[0], "write": b[1] - a[1]}
                for c, a, b in zip(children, disk0, disk1, strict=True)
            }
        if cpu0 and cpu1:
            out["server_cpu_user_s"], out["server_cpu_system_s"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        if busy0 is not None and busy1 is not None and cpu0 and cpu1:
            # A noisy machine shows here: CPU time used by other processes while the round ran.
            ours = sum(cpu1) - sum(cpu0) + sum(r["cpu_user_s"] + r["cpu_system_s"] for r in results.values())
            out["machine_busy_s"] = busy1 - busy0
            out["other_processes_cpu_s"] = max(0.0, busy1 - busy0 - ours)
        out["server_peak_rss_bytes"] = server.proc_status("VmHWM")
        out["server_rss_after_bytes"] = server.proc_status("VmRSS")
        out["status"] = (summary or {}).get("status")
        rounds = (summary or {}).get("rounds") or []
        out["server_round_duration_s"] = rounds[0].get("duration_s") if rounds else None
        out["server_aggregate_s"] = aggregate_seconds(kits / "server" / "log.txt")
        out["server_sum_read_from"] = sum_read_from(kits / "server" / "log.txt")
        out["completed"] = out["status"] == "completed"

        out["round_wall_s"] = max(r["push_end"] for r in results.values()) - min(
            r["pull_start"] for r in results.values()
        )
        out["bytes_down"] = sum(r["bytes_down"] for r in results.values())
        out["bytes_up"] = sum(r["bytes_up"] for r in results.values())
        out["bytes_moved"] = out["bytes_down"] + out["bytes_up"]
        out["throughput_mib_s"] = out["bytes_moved"] / MIB / out["round_wall_s"] if out["round_wall_s"] > 0 else None
        out["sites"] = results
    except Exception as e:  # a benchmark reports what broke and goes on with the next size
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        for child in reversed(children):
            child.stop()
    return out


def judge(r: dict[str, Any]) -> dict[str, bool | None]:
    """Each target met (True), missed (False) or not applicable/measured (None)."""
    verdict: dict[str, bool | None] = {"completes": bool(r.get("completed"))}
    wall = r.get("round_wall_s")
    applies = wall is not None and r["size_mib"] <= ROUND_TARGET_MIB
    verdict["round_le_3s"] = (wall <= ROUND_TARGET_S) if applies else None
    peak = r.get("server_peak_rss_bytes")
    verdict["server_rss_le_3x"] = (peak <= SERVER_RSS_TARGET_X * r["model_bytes"]) if peak else None
    return verdict


# ---- output ---------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f} MiB"


def mark(ok: bool | None, label: str) -> str:
    return "" if ok is None else f" [{label} {'ok' if ok else 'MISSED'}]"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_label(r: dict[str, Any], repeat: int) -> str:
    return f"{r['size_mib']:g} MiB" + (f" #{r['attempt']}" if repeat > 1 else "")


def render(report: dict[str, Any]) -> str:
    runs = report["runs"]
    rep = report["repeat"]
    parts = [
        f"fedlearn round benchmark: {len(SITES)} sites, 1 round, float32 tensors of {report['tensor_mib']:g} MiB, "
        f"loopback mutual TLS, {report['cpus']} CPUs; gRPC chunk {report['chunk']}",
        "",
    ]
    head = [
        "model",
        "round wall",
        "server round*",
        "aggregate**",
        "moved (down+up)",
        "rate",
        "server peak RSS",
        "site-1 peak RSS",
        "site-2 peak RSS",
        "completed",
    ]
    rows = [head]
    for r in runs:
        v = r["verdict"]
        if r.get("round_wall_s") is None:
            rows.append(
                [
                    run_label(r, rep),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    mib(r.get("server_peak_rss_bytes")),
                    "-",
                    "-",
                    f"no{mark(v['completes'], '')}",
                ]
            )
            continue
        peak = r.get("server_peak_rss_bytes")
        x = f" = {peak / r['model_bytes']:.2f}x" if peak else ""
        sites = r.get("sites", {})
        rows.append(
            [
                run_label(r, rep),
                f"{r['round_wall_s']:.2f} s{mark(v['round_le_3s'], '<=3 s')}",
                "-" if r.get("server_round_duration_s") is None else f"{r['server_round_duration_s']:.2f} s",
                "-" if r.get("server_aggregate_s") is None else f"{r['server_aggregate_s']:.2f} s",
                f"{mib(r['bytes_moved'])} ({r['bytes_down'] / MIB:,.0f} + {r['bytes_up'] / MIB:,.0f})",
                f"{r['throughput_mib_s']:,.0f} MiB/s",
                f"{mib(peak)}{x}{mark(v['server_rss_le_3x'], '<=3x')}",
                *(mib(sites.get(s, {}).get("peak_rss_bytes")) for s in SITES),
                ("yes" if r["completed"] else "no") + mark(v["completes"], "completes"),
            ]
        )
    parts += [
        table(rows),
        "",
        "*  server round: summary.json duration_s, from the round's opening (server start) to its close",
        "** aggregate: the server's 'aggregated in' log figure (apply the sums + write the global model)",
        "",
    ]

    # where the time and memory go, per site
    cols = [(r, s) for r in runs for s in SITES if s in r.get("sites", {})]
    if cols:
        names: list[str] = []
        for r, s in cols:
            names += [n for n in r["sites"][s]["phases_s"] if n not in names]
        rows = [["site step (s)", *(f"{run_label(r, rep)} {s}" for r, s in cols)]]
        for key, name in (("pull_s", "pull (total)"), ("push_s", "push (total)")):
            rows.append([name, *(f"{r['sites'][s][key]:.3f}" for r, s in cols)])
        for n in names:
            rows.append([f"  {n}", *(f"{r['sites'][s]['phases_s'].get(n, 0.0):.3f}" for r, s in cols)])
        rows.append(["  push: send + server (rest of push)", *(f"{push_rest(r['sites'][s]):.3f}" for r, s in cols)])
        rows.append(
            [
                "CPU during the round (user + system)",
                *(f"{r['sites'][s]['cpu_user_s']:.2f} + {r['sites'][s]['cpu_system_s']:.2f}" for r, s in cols),
            ]
        )
        rows.append(["minor page faults during the round", *(f"{r['sites'][s]['minor_faults']:,}" for r, s in cols)])
        rows.append(["site RSS", *("" for _ in cols)])
        rows.append(["  at ready", *(mib(r["sites"][s].get("rss_at_ready_bytes")) for r, s in cols)])
        rows.append(["  peak after pull", *(mib(r["sites"][s].get("peak_rss_after_pull_bytes")) for r, s in cols)])
        rows.append(["  peak", *(mib(r["sites"][s].get("peak_rss_bytes")) for r, s in cols)])
        parts += [table(rows), ""]
        rows = [["server", *(run_label(r, rep) for r in runs)]]
        rows.append(["RSS", *("" for _ in runs)])
        rows.append(["  at ready", *(mib(r.get("server_rss_at_ready_bytes")) for r in runs)])
        rows.append(["  peak (VmHWM)", *(mib(r.get("server_peak_rss_bytes")) for r in runs)])
        rows.append(["  after the round", *(mib(r.get("server_rss_after_bytes")) for r in runs)])
        rows.append(
            [
                "CPU during the round (user + system)",
                *(
                    f"{r['server_cpu_user_s']:.2f} + {r['server_cpu_system_s']:.2f}"
                    if "server_cpu_user_s" in r
                    else "-"
                    for r in runs
                ),
            ]
        )
        rows.append(
            [
                "disk read + written in the round, server and sites",
                *(
                    f"{mib(r['disk_read_bytes'])} + {mib(r['disk_write_bytes'])}" if "disk_read_bytes" in r else "-"
                    for r in runs
                ),
            ]
        )
        rows.append(["machine", *("" for _ in runs)])
        rows.append(
            [
                "  CPU busy during the round, all processes",
                *(f"{r['machine_busy_s']:.2f} s" if "machine_busy_s" in r else "-" for r in runs),
            ]
        )
        rows.append(
            [
                "  of which other processes (noise)",
                *(f"{r['other_processes_cpu_s']:.2f} s" if "other_processes_cpu_s" in r else "-" for r in runs),
            ]
        )
        rows.append(
            [
                "  CPU available (CPUs x round wall)",
                *(f"{report['cpus'] * r['round_wall_s']:.2f} s" if r.get("round_wall_s") else "-" for r in runs),
            ]
        )
        parts += [table(rows), ""]
        noisy = [
            run_label(r, rep)
            for r in runs
            if r.get("round_wall_s")
            and r.get("other_processes_cpu_s", 0) > NOISE_FRACTION * report["cpus"] * r["round_wall_s"]
        ]
        if noisy:
            parts += [
                f"WARNING: other processes used over {NOISE_FRACTION:.0%} of the CPU during "
                f"{', '.join(noisy)}: those figures are inflated; rerun on a quiet machine.",
                "",
            ]
    for r in runs:
        if r.get("error"):
            parts.append(f"{run_label(r, rep)}: ERROR {r['error']}")
    return "\n".join(parts).rstrip() + "\n"


def push_rest(site: dict) -> float:
    """Push time not spent in the site's own copies: streaming, the server's checks and, last, its close."""
    own = sum(v for k, v in site["phases_s"].items() if k.startswith("push: ") and "gRPC thread" not in k)
    return site["push_s"] - own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes-mib",
        type=float,
        nargs="+",
        default=[100, 1024],
        metavar="MIB",
        help="model sizes to run, in MiB (default: 100 1024)",
    )
    parser.add_argument(
        "--chunk-mib",
        type=float,
        default=None,
        help="gRPC chunk size in MiB (recorded only: not passed on to the server or sites yet)",
    )
    parser.add_argument("--tensor-mib", type=float, default=16, help="size of each tensor, in MiB (default: 16)")
    parser.add_argument(
        "--bulk-port", type=int, default=None, help="the server's --bulk-port (-1: no bulk channel, all over gRPC)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds per size, each with fresh processes (default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folders go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folders (kits, MMAR, logs)")
    parser.add_argument("--profile", action="store_true", help="write cProfile stats of each site's round (--keep)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per size (default: 1200)")
    parser.add_argument(
        "--fresh-site-arrays",
        action="store_true",
        help="the sites hold no model before the round: the pull decodes into arrays it allocates (the benchmark "
        "before 2026-12-07; by default each site builds its model first, as a training loop does)",
    )
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)

    runs = []
    for size in args.sizes_mib:
        for attempt in range(1, args.repeat + 1):
            work = Path(tempfile.mkdtemp(prefix=f"fedbench-{size:g}mib-", dir=args.workdir))
            try:
                server_args = [] if args.bulk_port is None else ["--bulk-port", str(args.bulk_port)]
                r = bench_round(
                    size,
                    work,
                    args.tensor_mib,
                    args.timeout,
                    args.profile,
                    server_args,
                    held_model=not args.fresh_site_arrays,
                )
            finally:
                if args.keep:
                    print(f"kept {work}", file=sys.stderr)
                else:
                    shutil.rmtree(work, ignore_errors=True)
            r["attempt"] = attempt
            r["verdict"] = judge(r)
            if args.keep:
                r["workdir"] = str(work)
            runs.append(r)
            if not args.json:
                print(
                    f"{size:g} MiB run {attempt}/{args.repeat}: "
                    + (f"error: {r['error']}" if r["error"] else f"round {r['round_wall_s']:.2f} s"),
                    file=sys.stderr,
                )

    report = {
        "benchmark": "one federated round, 2 sites",
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "tensor_mib": args.tensor_mib,
        "chunk": "default 2 MiB" + (f" (--chunk-mib {args.chunk_mib:g} not passed on yet)" if args.chunk_mib else ""),
        "chunk_mib_requested": args.chunk_mib,
        "site_model": "fresh arrays" if args.fresh_site_arrays else "held before the round",
        "targets": {
            "round_wall_s_100mib": ROUND_TARGET_S,
            "server_peak_rss_x_model": SERVER_RSS_TARGET_X,
            "completes": True,
        },
        "runs": runs,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report), end="")
    return 0 if all(r["completed"] and not r["error"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

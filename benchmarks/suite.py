"""`make bench`: every performance figure (issues 8, 22 and 25) in one table, also written as JSON.

Runs each benchmark of this folder in its own process (`--json`), takes medians over its runs, sets each
figure beside its target, the figure measured before issue 25 (benchmarks/previous.json) and, where one fits,
a baseline measured in this same run (numpy copying the bytes a round moves). Under a timed target it prints the
floor it stands on, measured in the same run: the 1 GiB round's bytes over bare mutual-TLS sockets and this disk's
speed (round_floor_bench.py), the tiny federation's torch imports (tiny_fed_bench.py). Prints the table and writes
it to benchmarks/results.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MiB = 2**20


def run_json(script: str, *args: str, timeout: float = 3600, reports_failures: bool = False) -> Any:
    """The JSON a benchmark prints under --json; its stderr passes through.

    With `reports_failures`, a benchmark that exits 1 but names what failed in its JSON is read too.
    """
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *args, "--json"],
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=HERE.parent,
    )
    if proc.returncode != 0 and not (reports_failures and proc.returncode == 1 and proc.stdout.strip()):
        raise RuntimeError(f"{script} failed (exit {proc.returncode})")
    return json.loads(proc.stdout)


def copy_seconds(nbytes: int, repeat: int = 3) -> float:
    """Median time numpy takes to copy `nbytes` (the baseline a round's data movement is set against)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "system": platform.platform(),
    }


PREVIOUS = HERE / "previous.json"


def figure(
    name: str,
    runs: list[float],
    unit: str,
    target: float | None = None,
    higher_is_better: bool = False,
    baseline: float | None = None,
    baseline_name: str = "",
) -> dict[str, Any]:
    value = statistics.median(runs) if runs else None
    met = None
    if value is not None and target is not None:
        met = value >= target if higher_is_better else value <= target
    return {
        "figure": name,
        "median": value,
        "unit": unit,
        "runs": runs,
        "target": target,
        "higher_is_better": higher_is_better,
        "met": met,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio_to_baseline": value / baseline if value is not None and baseline else None,
    }


def not_measured(name: str, unit: str, target: float | None, why: str) -> dict[str, Any]:
    return {**figure(name, [], unit, target), "not_measured": why}


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    figures = []
    rounds = run_json("round_bench.py", "--sizes-mib", *map(str, args.sizes_mib), "--repeat", str(args.repeat))
    for size in args.sizes_mib:
        runs = [r for r in rounds["runs"] if r["size_mib"] == size and r.get("completed")]
        model = size * MiB
        # a round moves the model 4 times (2 downloads, 2 uploads); timed on at most 1 GiB and scaled
        copied = min(int(model), 2**30)
        copy = copy_seconds(copied) * 4 * model / copied
        target = {1024: 10.0}.get(int(size))  # issue 25; the 4 GiB round reports its time (no target)
        figures.append(
            figure(
                f"round {size:g} MiB, 2 sites: wall",
                [r["round_wall_s"] for r in runs],
                "s",
                target,
                baseline=copy,
                baseline_name="numpy copying the 4x model bytes it moves",
            )
        )
        if target is not None:
            where = sorted({r.get("server_sum_read_from") or "?" for r in runs})
            figures.append(
                figure(
                    f"  its close: aggregation + model write, sum from {'/'.join(where)}",
                    [r["server_aggregate_s"] for r in runs if r.get("server_aggregate_s") is not None],
                    "s",
                )
            )
            fresh = run_json(
                "round_bench.py", "--sizes-mib", f"{size:g}", "--repeat", str(args.repeat), "--fresh-site-arrays"
            )
            figures.append(
                figure(
                    "  the same with sites pulling into arrays they allocate (the method until 2026-12-07)",
                    [r["round_wall_s"] for r in fresh["runs"] if r.get("completed")],
                    "s",
                )
            )
            figures += round_floor_figures(size, args.repeat)
            for what in ("read", "write"):
                figures.append(
                    figure(
                        f"  its disk I/O, server and sites: {what}",
                        [r[f"disk_{what}_bytes"] / 2**30 for r in runs if f"disk_{what}_bytes" in r],
                        "GiB",
                    )
                )
        figures.append(
            figure(
                f"round {size:g} MiB: throughput", [r["throughput_mib_s"] for r in runs], "MiB/s", higher_is_better=True
            )
        )
        figures.append(
            figure(
                f"round {size:g} MiB: server peak RSS / model",
                [r["server_peak_rss_bytes"] / model for r in runs if r.get("server_peak_rss_bytes")],
                "x",
                {1024: 2.5, 4096: 1.5}.get(int(size)),
            )
        )
        site_x = [max(s.get("peak_rss_bytes") or 0 for s in r["sites"].values()) / model for r in runs]
        figures.append(
            figure(f"round {size:g} MiB: site peak RSS / model", site_x, "x", {1024: 3.0, 4096: 2.0}.get(int(size)))
        )
    aggregation = [run_json("aggregation_bench.py", "--repeat", "3") for _ in range(args.repeat)]
    figures.append(
        figure(
            "aggregation 256 MiB: throughput",
            [a["ours_gb_s"] for a in aggregation],
            "GB/s",
            higher_is_better=True,
            baseline=statistics.median(a["numpy_gb_s"] for a in aggregation),
            baseline_name="numpy a += w*b on the same arrays",
        )
    )
    figures.append(
        figure("aggregation: ours / numpy", [a["ratio"] for a in aggregation], "x", 0.5, higher_is_better=True)
    )
    overhead = [run_json("round_overhead_bench.py", "--rounds", "30") for _ in range(args.repeat)]
    figures.append(figure("round overhead, tiny model", [o["median_ms"] for o in overhead], "ms", 50.0))
    admin = run_json("admin_bench.py", "--repeat", str(max(5, args.repeat)))
    figures.append(figure("one-shot `fedadmin status`", [w * 1000 for w in admin["status_wall_s"]], "ms", 150.0))
    figures.append(
        figure(
            "  its floor: python, grpc + click imports, one mTLS call",
            [w * 1000 for w in admin["status_floor_s"]],
            "ms",
        )
    )
    figures.append(figure("command round trip in one process, p50", [admin["site_round_trip_ms_p50"]], "ms", 5.0))
    jobs = run_json("jobs_bench.py", "--jobs", "20", reports_failures=True)
    figures.append(
        figure(
            "20 jobs at once, max_jobs 2: completed, each once",
            [float(jobs["all_completed_once"])],
            "yes=1",
            1.0,
            higher_is_better=True,
        )
    )
    figures.append(figure("job: submit to RUNNING, resources free", [jobs["submit_to_running_s_median"]], "s"))
    figures.append(figure("job: time over the same run by hand", [jobs["overhead_per_job_s_median"]], "s"))
    figures.append(figure("20 jobs: submit to all ended", [jobs["drain_s_median"]], "s"))
    tiny = run_json("tiny_fed_bench.py", "--repeat", str(args.repeat))
    tiny_runs = tiny["runs"]
    figures.append(
        figure("2 sites x 3 rounds, tiny model: `poc start` to run finished", [r["total"] for r in tiny_runs], "s", 5.0)
    )
    figures.append(
        figure(
            "  its floor: torch's 3 imports (initial model, 2 workers), all at once",
            [r["imports_floor"] for r in tiny_runs],
            "s",
        )
    )
    for phase in ("poc_start", "deploy", "start", "first_round"):
        figures.append(figure(f"  tiny federation: {phase.replace('_', ' ')}", [r[phase] for r in tiny_runs], "s"))
    figures += scale_figures(args)
    return figures


def round_floor_figures(size_mib: float, repeat: int) -> list[dict[str, Any]]:
    """The floor under a timed round, measured beside it (round_floor_bench.py): the same bytes between three
    processes over bare mutual-TLS sockets, summed in memory, and this disk's speed for a model-sized file."""
    floor = run_json("round_floor_bench.py", "--size-mib", f"{size_mib:g}", "--repeat", str(repeat))
    runs = floor["runs"]
    return [
        figure("  its floor: bare mutual-TLS sockets, sum in memory", [r["round_wall_s"] for r in runs], "s"),
        figure(f"  this disk: {size_mib:g} MiB read direct", [r["disk_read_s"] for r in runs], "s"),
        figure(f"  this disk: {size_mib:g} MiB written direct + fsync", [r["disk_write_s"] for r in runs], "s"),
    ]


def scale_figures(args: argparse.Namespace) -> list[dict[str, Any]]:
    """N simulated sites in one load-generator process (scale_bench.py); the last N carries the targets."""
    scale = run_json(
        "scale_bench.py", "--sites", *map(str, args.scale_sites), "--repeat", str(args.repeat), "--round-sites", "0"
    )
    # The rounds in a fresh server each time: its peak RSS is one figure per server process.
    for _ in range(args.repeat):
        rounds = run_json(
            "scale_bench.py",
            "--sites",
            "--round-sites",
            "100",
            "--round-mib",
            "10",
            "--rounds",
            "4",
            reports_failures=True,
        )
        scale["rounds"] += rounds["rounds"]
    figures = []
    largest = max(args.scale_sites)
    for a in scale["agents"]:
        n = a["sites"]
        target = (lambda t: t) if n == largest else (lambda t: None)
        if a.get("error"):
            for name, unit, t in (
                (f"{n} sites: server idle CPU", "% of a core", 5.0),
                (f"{n} sites: `status client`", "s", 2.0),
            ):
                figures.append(not_measured(name, unit, target(t), a["error"]))
            continue
        figures.append(figure(f"{n} sites: server idle CPU", [a["idle_cpu_pct"]], "% of a core", target(5.0)))
        figures.append(figure(f"{n} sites: server peak RSS", [a["server_peak_rss_bytes"] / MiB], "MiB", target(1024.0)))
        figures.append(figure(f"{n} sites: `status client`, in one process", a["status_client_s"], "s", target(2.0)))
        figures.append(
            figure(
                f"{n} sites: one-shot `fedadmin --json status client`", a["one_shot_status_client_s"], "s", target(2.0)
            )
        )
    ok = [r for r in scale["rounds"] if not r.get("error")]
    name = "100 sites: 10 MiB round"
    for r in scale["rounds"]:
        if r.get("error"):
            figures.append(not_measured(name, "s", 15.0, r["error"]))
    if ok:
        figures.append(figure(name, [statistics.median(r["round_s"]) for r in ok], "s", 15.0))
        figures.append(
            figure(
                f"{name}: server peak RSS / model",
                [r["server_peak_rss_bytes"] / (r["size_mib"] * MiB) for r in ok],
                "x",
                10.0,
            )
        )
        # The floor under it: the same server once the 100 sites have registered, before a byte of a model moves.
        registered = [
            s["rss_bytes"] / (r["size_mib"] * MiB)
            for r in ok
            for s in r.get("server_rss_timeline", [])
            if s["at"] == "registered"
        ]
        figures.append(figure("  its floor: 100 sites registered, nothing moving", registered, "x"))
        # After the rounds: the sites still connected, the server's threads for their calls kept, nothing in flight;
        # and how much of that is code and libraries mapped from files (it depends on the page cache: README).
        after = [r["server_rss_after_bytes"] / (r["size_mib"] * MiB) for r in ok if "server_rss_after_bytes" in r]
        figures.append(figure("  after the rounds, nothing moving", after, "x"))
        mapped = [
            s["rss_by_kind"].get("files (code, libraries)", 0) / (r["size_mib"] * MiB)
            for r in ok
            for s in r.get("server_rss_timeline", [])
            if s["at"] == "run ended" and "rss_by_kind" in s
        ]
        figures.append(figure("  of it, code and libraries mapped from files", mapped, "x"))
    return figures


def with_previous(figures: list[dict[str, Any]], path: Path) -> str:
    """Set each figure's `previous` from `path` (figure name -> value); returns what the file says it is."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    known = data.get("figures", {})
    for f in figures:
        f["previous"] = known.get(f["figure"])
    return str(data.get("what", ""))


def render(figures: list[dict[str, Any]]) -> str:
    rows = [["figure", "median", "runs", "target", "", "previous", "vs baseline"]]
    for f in figures:
        value = "-" if f["median"] is None else f"{f['median']:.3g} {f['unit']}"
        target = "" if f["target"] is None else f"{'>=' if f['higher_is_better'] else '<='} {f['target']:g}"
        verdict = {True: "met", False: "MISSED", None: ""}[f["met"]]
        if f.get("not_measured"):
            verdict = "not measured"
        ratio = "" if f["ratio_to_baseline"] is None else f"{f['ratio_to_baseline']:.2f}x {f['baseline_name']}"
        previous = f.get("previous")
        previous = "" if previous is None else f"{previous:.3g} {f['unit']}"
        rows.append([f["figure"], value, str(len(f["runs"])), target, verdict, previous, ratio])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[10, 100, 1024, 4096])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; medians are shown (default 3)")
    parser.add_argument(
        "--scale-sites",
        type=int,
        nargs="+",
        default=[100, 1000],
        help="simulated site counts for the scale figures (default 100 1000)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--previous", type=Path, default=PREVIOUS, help="figures to show beside (default benchmarks/previous.json)"
    )
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    figures = collect(args)
    previous = with_previous(figures, args.previous)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "repeat": args.repeat,
        "figures": figures,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    info = report["machine"]
    print(
        f"fedlearn benchmarks, {report['date']}, {info['cpus']} CPUs ({info['cpu']}), "
        f"{(info['memory_bytes'] or 0) / 2**30:.0f} GiB"
    )
    print(render(figures))
    if previous:
        print(f"previous: {previous}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

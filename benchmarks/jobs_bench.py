"""Issue 22's job figures on a real local federation (2 sites, max_jobs 2, 2 CPU slots per site): 20 tiny jobs
submitted at once all complete, each started exactly once; submit → RUNNING when resources are free; the time a
job takes end to end against the same run driven by hand (set-run, deploy, start, wait)."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from admin_bench import fedadmin, free_port  # noqa: E402  (benchmarks/ is this script's folder)

ENDED = ("COMPLETED", "FAILED", "ABORTED")


def out_json(ws: Path, *args: str) -> dict:
    return json.loads(fedadmin(ws, "--json", *args).stdout)


def tiny_mmar(dst: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "digits", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for name, changes in (("config_fed_server.json", {"num_rounds": 1}),):
        path = dst / "config" / name
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))
    path = dst / "config" / "config_train.json"
    cfg = json.loads(path.read_text())
    cfg["trainer"]["args"]["epochs_per_round"] = 1
    path.write_text(json.dumps(cfg))
    return dst


def wait_jobs(ws: Path, ids: list[int], timeout: float) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["job_id"]: j for j in out_json(ws, "jobs")["jobs"]}
        if all(jobs[i]["state"] in ENDED for i in ids):
            return jobs
        if time.monotonic() > deadline:
            raise SystemExit(f"jobs did not end in {timeout}s: {[jobs[i]['state'] for i in ids]}")
        time.sleep(0.5)


def starts(ws: Path, site: str) -> dict[int, int]:
    """How many starts of each run number succeeded at a site, as its audit log records them."""
    counts: dict[int, int] = {}
    for line in (ws / site / "audit.log").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("command") in ("start", "start-mgpu") and entry.get("ok") is True:
            number = int(entry.get("run_number") or 0)
            counts[number] = counts.get(number, 0) + 1
    return counts


def measure(jobs: int) -> dict:
    from fedcommon.provision import prepare_poc

    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    ws = tmp / "ws"
    prepare_poc(ws, 2, "127.0.0.1", free_port(), free_port(), "bench", False)
    (ws / "server" / "local").mkdir(exist_ok=True)
    (ws / "server" / "local" / "jobs.json").write_text(json.dumps({"max_jobs": 2}))
    for site in ("site-1", "site-2"):
        (ws / site / "local").mkdir(exist_ok=True)
        (ws / site / "local" / "resources.json").write_text(json.dumps({"cpu_slots": 2}))
    mmar = tiny_mmar(tmp / "mmar")
    fedadmin(ws, "poc", "start", "--workspace", str(ws))
    try:
        # By hand: set-run, deploy, start, wait.
        t0 = time.monotonic()
        fedadmin(ws, "set-run", "1000")
        fedadmin(ws, "deploy", str(mmar), "all")
        fedadmin(ws, "start", "all")
        fedadmin(ws, "wait", "--timeout", "300")
        by_hand = time.monotonic() - t0
        # One job alone: submit → RUNNING, and submit → COMPLETED.
        t0 = time.monotonic()
        alone = int(out_json(ws, "submit", str(mmar))["job_id"])
        fedadmin(ws, "wait", "--job", str(alone), "--timeout", "300")
        as_job = time.monotonic() - t0
        record = out_json(ws, "job", "show", str(alone))
        to_running = record["started_at"] - record["submitted_at"]
        # 20 at once.
        t0 = time.monotonic()
        ids = [int(out_json(ws, "submit", str(mmar), "--name", f"j{i}")["job_id"]) for i in range(jobs)]
        ended = wait_jobs(ws, ids, timeout=60 * jobs)
        drained = time.monotonic() - t0
        counts = {p: starts(ws, p) for p in ("site-1", "site-2")}
        once = all(counts[p].get(i) == 1 for p in counts for i in ids)
    finally:
        fedadmin(ws, "poc", "stop", "--workspace", str(ws), check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "jobs": jobs,
        "completed": sum(1 for i in ids if ended[i]["state"] == "COMPLETED"),
        "each_started_once": once,
        "drain_s": drained,
        "submit_to_running_s": to_running,
        "job_s": as_job,
        "by_hand_s": by_hand,
        "overhead_per_job_s": as_job - by_hand,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    runs = [measure(args.jobs) for _ in range(args.repeat)]
    summary = {
        "runs": runs,
        "all_completed_once": all(r["completed"] == r["jobs"] and r["each_started_once"] for r in runs),
        "submit_to_running_s_median": statistics.median(r["submit_to_running_s"] for r in runs),
        "overhead_per_job_s_median": statistics.median(r["overhead_per_job_s"] for r in runs),
        "drain_s_median": statistics.median(r["drain_s"] for r in runs),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if key != "runs":
                print(f"{key}: {value}")
    return 0 if summary["all_completed_once"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

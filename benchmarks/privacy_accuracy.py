"""What each privacy protocol does to the digits example's accuracy: one local federation per setting.

Runs `fedadmin poc run` on a copy of examples/digits with no filter, then with each built-in protocol
at its defaults (and any extra settings given), and prints the final accuracy per site and the epsilon
each site spent. Usage: .venv/bin/python benchmarks/privacy_accuracy.py [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
SETTINGS: list[tuple[str, dict | None]] = [
    ("none", None),
    ("PercentileProtocol", {"name": "PercentileProtocol"}),
    ("PercentileProtocol percentile=90", {"name": "PercentileProtocol", "args": {"percentile": 90}}),
    ("LaplacianProtocol", {"name": "LaplacianProtocol"}),
    ("SVTProtocol", {"name": "SVTProtocol"}),
    (
        "SVTProtocol fraction=0.5 epsilon=10 gamma=0.01",
        {"name": "SVTProtocol", "args": {"fraction": 0.5, "epsilon": 10.0, "gamma": 0.01}},
    ),
]


def run_one(privacy: dict | None, clients: int, scratch: Path) -> dict:
    mmar = scratch / "mmar"
    shutil.rmtree(mmar, ignore_errors=True)
    shutil.copytree(DIGITS, mmar, ignore=shutil.ignore_patterns("__pycache__"))
    config = mmar / "config" / "config_fed_client.json"
    data = json.loads(config.read_text())
    data.pop("privacy", None)
    if privacy is not None:
        data["privacy"] = privacy
    config.write_text(json.dumps(data, indent=2))
    ws = scratch / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedadmin.cli",
            "--json",
            "poc",
            "run",
            str(mmar),
            "--clients",
            str(clients),
            "--workspace",
            str(ws),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"poc run failed:\n{done.stdout}\n{done.stderr}")
    out = json.loads(done.stdout)
    summary = json.loads(Path(out["summary"]).read_text())
    return {
        "final": {s: m["accuracy"] for s, m in sorted(out["final_metrics"].items())},
        "epsilon": summary.get("privacy_epsilon_total", {}),
        "rounds": len(summary["rounds"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    print(f"{'privacy filter':<48} {'rounds':>6}  final accuracy per site   epsilon spent per site")
    with tempfile.TemporaryDirectory(prefix="privacy-accuracy-") as tmp:
        for label, privacy in SETTINGS:
            result = run_one(privacy, args.clients, Path(tmp))
            accuracy = "  ".join(f"{a:.3f}" for a in result["final"].values())
            spent = "  ".join(f"{e:g}" for e in result["epsilon"].values()) or "-"
            print(f"{label:<48} {result['rounds']:>6}  {accuracy:<24} {spent}", flush=True)


if __name__ == "__main__":
    main()

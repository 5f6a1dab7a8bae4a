"""`make demo`: a whole local federation on loopback through the console: `fedadmin poc run` prepares kits,
starts a server and the sites, deploys and trains the MMAR, prints per-round metrics, and stops everything."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", type=Path, default=ROOT / "workspace" / "demo")
    parser.add_argument("--mmar", type=Path, default=ROOT / "examples" / "digits")
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()

    from fedadmin.cli import main as fedadmin

    fedadmin(
        ["poc", "run", str(args.mmar), "--clients", str(args.clients), "--workspace", str(args.workspace)],
        prog_name="fedadmin",
    )


if __name__ == "__main__":
    main()

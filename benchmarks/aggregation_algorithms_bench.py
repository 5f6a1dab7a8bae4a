"""Each built-in aggregator on the server's path: time per round and peak RSS / model, N sites x M MiB.

Per algorithm, in a fresh process: a float32 model of --size-mib (tensors of --tensor-mib), two rounds of --sites
updates. Streaming aggregators sum each update as it arrives (UpdateAccumulator) and write the next model and
their state variable by variable (write_next_model); the others write each update to an UpdateStore on disk and
read them back memory-mapped. Time: the aggregation's own work per round (adding or storing the updates, then
writing the next model), medians of the two rounds; generating an update is not counted. Peak RSS is sampled
every 5 ms, above the process's RSS before the model exists, over the model's size: holding one update as it
arrives (the server holds one contribution at a time) is included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedcommon.model_file import save_model  # noqa: E402
from fedserver.aggregation import (  # noqa: E402
    StateFiles,
    UpdateStore,
    build_aggregator,
    check_spec,
    store_deltas,
    write_next_model,
)
from fedserver.aggregator import UpdateAccumulator, VarSpec  # noqa: E402

SPECS = {
    "FedAvg": {"name": "FedAvg"},
    "FedAvgM": {"name": "FedAvgM"},
    "FedAdam": {"name": "FedAdam"},
    "FedYogi": {"name": "FedYogi"},
    "FedAdagrad": {"name": "FedAdagrad"},
    "FedMedian": {"name": "FedMedian"},
    "FedTrimmedAvg": {"name": "FedTrimmedAvg", "args": {"beta": 0.2}},
    "Krum": {"name": "Krum", "args": {"num_malicious": 1}},
    "MultiKrum": {"name": "MultiKrum", "args": {"num_malicious": 1, "num_selected": 3}},
}


class PeakRss:
    """The largest RSS of this process seen while running, sampled on a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one(name: str, size_mib: float, tensor_mib: float, sites: int) -> dict:
    n = int(size_mib * 2**20) // 4
    per = max(1, int(tensor_mib * 2**20) // 4)
    shapes = {f"t{i}": (min(per, n - i * per),) for i in range((n + per - 1) // per)}
    specs = {k: VarSpec(np.dtype(np.float32), s) for k, s in shapes.items()}
    choice = check_spec(SPECS[name])
    base_rss = psutil.Process().memory_info().rss
    times = []
    with tempfile.TemporaryDirectory() as tmp, PeakRss() as rss:
        folder = Path(tmp)
        model_path = folder / "global.fl"
        save_model(model_path, {k: np.zeros(s, np.float32) for k, s in shapes.items()})
        for round_number in range(2):
            aggregator = build_aggregator(choice)
            spent = 0.0
            if aggregator.needs_all_updates:
                sink = UpdateStore(folder / f"round_{round_number}", specs)
            else:
                sink = UpdateAccumulator(specs)
            for site in range(sites):
                rng = np.random.default_rng(round_number * 100 + site)
                update = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
                t0 = time.perf_counter()
                sink.add(update, 1.0 + site)
                spent += time.perf_counter() - t0
                del update
            t0 = time.perf_counter()
            delta_of = store_deltas(aggregator, sink) if aggregator.needs_all_updates else sink.take_mean
            write_next_model(
                aggregator,
                choice.label,
                delta_of,
                model_path,
                StateFiles(folder),
                round_number,
                {"round": round_number + 1},
            )
            if aggregator.needs_all_updates:
                sink.clear()
            spent += time.perf_counter() - t0
            times.append(spent)
            del sink, delta_of
    model_bytes = n * 4
    return {
        "algorithm": name,
        "size_mib": size_mib,
        "sites": sites,
        "round_s": statistics.median(times),
        "peak_rss_over_model": (rss.peak - base_rss) / model_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=100, help="model size (default 100 MiB)")
    parser.add_argument("--tensor-mib", type=float, default=16, help="size of each tensor (default 16 MiB)")
    parser.add_argument("--sites", type=int, default=5, help="updates per round (default 5)")
    parser.add_argument("--only", choices=sorted(SPECS), action="append", help="this algorithm (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    parser.add_argument("--one", choices=sorted(SPECS), help=argparse.SUPPRESS)  # the child's own run
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.size_mib, args.tensor_mib, args.sites)))
        return 0
    rows = []
    for name in args.only or SPECS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                name,
                "--size-mib",
                str(args.size_mib),
                "--tensor-mib",
                str(args.tensor_mib),
                "--sites",
                str(args.sites),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(out))
        row = rows[-1]
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{name:14s} {args.size_mib:g} MiB x {args.sites} sites: {row['round_s']:6.2f} s/round, "
                f"peak RSS {row['peak_rss_over_model']:.2f} x model",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

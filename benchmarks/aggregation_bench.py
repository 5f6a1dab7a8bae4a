"""Aggregation alone: the server's UpdateAccumulator.add against numpy's in-place `a += w * b` on the same arrays.

Both sum one weighted float32 update into a running sum of the same size; GB/s counts the update's bytes.
Medians over --repeat runs; the ratio is ours over numpy's (target >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedserver.aggregator import UpdateAccumulator, VarSpec  # noqa: E402

TARGET_RATIO = 0.5


def measure(size_mib: float, tensor_mib: float, repeat: int) -> dict:
    n = int(size_mib * 2**20) // 4
    per = max(1, int(tensor_mib * 2**20) // 4)
    names = [f"t{i}" for i in range(0, n, per)]
    shapes = {name: (min(per, n - i * per),) for i, name in enumerate(names)}
    specs = {name: VarSpec(np.dtype(np.float32), shape) for name, shape in shapes.items()}
    rng = np.random.default_rng(0)
    base = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    update = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    ours, numpy_times = [], []
    for _ in range(repeat):
        acc = UpdateAccumulator(specs)
        acc.add({k: v.copy() for k, v in base.items()}, 1.0)  # the running sum exists, as after a first site
        incoming = {k: v.copy() for k, v in update.items()}  # arrives as a fresh buffer, as off the wire
        t0 = time.perf_counter()
        acc.add(incoming, 0.5)
        ours.append(time.perf_counter() - t0)
        sums = {k: v.copy() for k, v in base.items()}
        t0 = time.perf_counter()
        for k, b in update.items():
            sums[k] += 0.5 * b
        numpy_times.append(time.perf_counter() - t0)
    nbytes = n * 4
    ours_s, numpy_s = statistics.median(ours), statistics.median(numpy_times)
    return {
        "size_mib": size_mib,
        "bytes": nbytes,
        "repeat": repeat,
        "ours_s": ours_s,
        "numpy_s": numpy_s,
        "ours_gb_s": nbytes / ours_s / 1e9,
        "numpy_gb_s": nbytes / numpy_s / 1e9,
        "ratio": numpy_s / ours_s,
        "target_ratio": TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=256, help="update size (default 256 MiB)")
    parser.add_argument("--tensor-mib", type=float, default=16, help="size of each tensor (default 16 MiB)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the median is reported (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the line")
    args = parser.parse_args(argv)
    result = measure(args.size_mib, args.tensor_mib, args.repeat)
    if args.json:
        print(json.dumps(result))
    else:
        verdict = "met" if result["ratio"] >= TARGET_RATIO else "MISSED"
        print(
            f"aggregation of {args.size_mib:g} MiB: {result['ours_gb_s']:.2f} GB/s, numpy a += w*b "
            f"{result['numpy_gb_s']:.2f} GB/s, ratio {result['ratio']:.2f} (target >= {TARGET_RATIO}: {verdict})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

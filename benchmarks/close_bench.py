"""The server's round close alone: a DiskSum of two staged uploads and write_next_model, timed (and profiled).

Usage: PYTHONPATH=. python benchmarks/close_bench.py --mib 1024 [--repeat 2] [--memory] [--profile out.prof]
--memory: the uploads are mirrored into the round's sum in memory (fedserver.memory_sum), as "round_sum" keeps it.
Each repeat builds fresh inputs (the model and two staged uploads on disk) outside the timed part.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fedcommon.model_file import ModelFileWriter
from fedserver.aggregation import FedAvg, StateFiles, write_next_model
from fedserver.aggregator import VarSpec
from fedserver.disk_sum import DiskSum
from fedserver.memory_sum import MemorySum
from fedserver.staged_upload import StagedUpload


def build(
    folder: Path, model_bytes: int, tensor_bytes: int, block_bytes: int | None, memory: bool = False
) -> tuple[Path, DiskSum]:
    """A float32 model file and a DiskSum holding two staged uploads of the same layout (mirrored in memory too)."""
    n = tensor_bytes // 4
    specs = {f"layer{i:04d}.weight": VarSpec(np.dtype(np.float32), (n,)) for i in range(model_bytes // tensor_bytes)}
    rng = np.random.default_rng(0)
    block = rng.random(n, dtype=np.float32) - 0.5
    model = folder / "model.fl"
    with open(model, "wb") as f:
        w = ModelFileWriter(f, [(k, s.dtype, s.shape) for k, s in specs.items()], {})
        for k in specs:
            w.write(k, block)
        w.check_complete()
        f.flush()
        os.fsync(f.fileno())
        # as on the server, whose model was written with direct I/O: not in the page cache
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    mirror = MemorySum(specs) if memory else None
    total = DiskSum(folder, specs, max_weight=10.0, block_bytes=block_bytes, memory=mirror)
    for weight in (3.0, 5.0):
        staged = StagedUpload(folder / "staging", specs, mirror=mirror.writer(weight / 10.0) if mirror else None)
        for k in specs:
            staged.write(k, 0, block * (weight / 10))
        total.add(staged, weight)
    return model, total


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="model size in MiB (default: 1024)")
    parser.add_argument("--tensor-mib", type=int, default=16, help="tensor size in MiB (default: 16)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--sum-block-mib", type=int, default=None, help="the sum's read block (default: sized to the model)"
    )
    parser.add_argument("--memory", action="store_true", help="the round's sum mirrored in memory")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of the last close here")
    args = parser.parse_args()
    results = []
    for _ in range(args.repeat):
        folder = Path(tempfile.mkdtemp(prefix="close-bench-", dir=args.workdir))
        try:
            block = (args.sum_block_mib or 0) << 20 or None
            model, total = build(folder, args.mib << 20, args.tensor_mib << 20, block, args.memory)
            prof = cProfile.Profile() if args.profile else None
            t0, c0 = time.perf_counter(), cpu()
            if prof:
                prof.enable()
            write_next_model(FedAvg(), "FedAvg", total.take_mean, model, StateFiles(folder), 0, {"round": 1})
            if prof:
                prof.disable()
                prof.dump_stats(args.profile)
            results.append({"wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(cpu() - c0, 3)})
            total.clear()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"mib": args.mib, "memory": args.memory, "closes": results}))


if __name__ == "__main__":
    main()

"""One benchmark site: connect, wait for "go" on stdin, pull the global model, nudge it, push it back.

With --local-model, the site first builds its own model, shaped as the run's initial model file says and written
once, as a training loop builds its network before it first pulls; the pull then decodes into those arrays.

Started by benchmarks/round_bench.py (not a test). Protocol on stdout, one JSON object per line:
  {"event": "ready", ...}   after registering with the server; then a line "go" on stdin starts the round
  {"event": "result", ...}  timings (time.time() stamps and per-phase seconds), bytes moved, peak RSS
  {"event": "error", ...}   when anything failed (exit status 1)

Phase timings come from thin perf_counter wrappers around the client's own steps (no code of the
client is changed); --profile PATH also writes cProfile stats of the main thread to PATH.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import resource
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedclient import communicator as comm_mod  # noqa: E402
from fedclient.direct_client import DirectFederatedClient  # noqa: E402
from fedclient.worker import kit_ssl_args  # noqa: E402
from fedcommon.kit import load_kit  # noqa: E402
from fedcommon.model_file import read_index  # noqa: E402

MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set size now (VmRSS), 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Phases:
    """Seconds spent in named steps, and the peak RSS seen when each step ended."""

    def __init__(self) -> None:
        self.stage = "connect"  # "pull" or "push" while the round runs; prefixes the step names
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_after: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        key = f"{self.stage}: {name}"
        self.seconds[key] += seconds
        self.peak_after[key] = peak_rss_bytes()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        return timed

    def wrap_generator(self, name: str, fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
        """Time only the work inside the generator (gRPC pulls it from its own thread)."""

        def timed(*args: Any, **kwargs: Any) -> Iterator:
            it = fn(*args, **kwargs)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self.add(name, time.perf_counter() - t0)
                    return
                self.seconds[f"{self.stage}: {name}"] += time.perf_counter() - t0
                yield item

        return timed


def instrument(client: DirectFederatedClient, phases: Phases) -> None:
    """Wrap the client's steps in timers; behaviour is unchanged."""
    mm = client.model_manager
    read_stream = comm_mod.Communicator._read_model_stream
    client.communicator._read_model_stream = phases.wrap("receive + decode stream", read_stream)
    mm.assign_current_model = phases.wrap("assign_current_model (global to disk)", mm.assign_current_model)
    rw = mm.model_reader_writer
    rw.extract_model = phases.wrap("extract_model (copy of weights)", rw.extract_model)
    mm.update_current_model = phases.wrap("update_current_model (copy in)", mm.update_current_model)
    mm.read_current_model = phases.wrap("read_current_model (extract + delta)", mm.read_current_model)
    comm_mod.encode_tensors = phases.wrap_generator("encode_tensors (gRPC thread)", comm_mod.encode_tensors)


def perturb(model: dict[str, np.ndarray]) -> None:
    """A cheap, in-place change to every tensor: its first element grows by 1e-3 (by 1 for integers)."""
    for arr in model.values():
        if arr.size:
            flat = arr.reshape(-1)
            flat[0] += flat.dtype.type(1e-3 if np.issubdtype(flat.dtype, np.floating) else 1)


def local_model(path: Path) -> dict[str, np.ndarray]:
    """The site's own model before its first round, shaped as the run's initial model file says, every byte
    written once (as a training loop builds and initialises its network before it first pulls)."""
    with open(path, "rb") as f:
        entries = read_index(f, path).entries
    return {e.name: np.full(e.shape, 0, e.dtype) for e in entries}


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_site(args: argparse.Namespace) -> dict:
    kit = load_kit(args.workspace)
    client = DirectFederatedClient(
        kit.name, kit_ssl_args(kit), True, server_args=[{"name": args.task, "target": kit.fl_target}]
    )
    phases = Phases()
    instrument(client, phases)
    try:
        if args.local_model is not None:
            # the seed API's way to hand the model manager the loop's weights: the pull decodes into these arrays
            client.model_manager.update_current_model(local_model(args.local_model))
        client.connect_to_server()
        emit({"event": "ready", "site": kit.name, "rss_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()})
        if not args.no_wait:
            line = sys.stdin.readline()
            if line.strip() != "go":
                raise RuntimeError(f"expected 'go' on stdin, got {line!r}")
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        phases.stage = "pull"
        pull_start, t0 = time.time(), time.perf_counter()
        data = client.pull_models_from_server()
        pull_s = time.perf_counter() - t0
        pull_end = time.time()
        peak_after_pull = peak_rss_bytes()
        if data["status"] != "train":
            raise RuntimeError(f"server offered {data['status']!r}, not a round to train")
        model = data["model"]
        t0 = time.perf_counter()
        perturb(model)
        phases.add("perturb", time.perf_counter() - t0)
        phases.stage = "push"
        push_start, t0 = time.time(), time.perf_counter()
        reply = client.push_models_to_server(model, {"weight": 1.0})
        push_s = time.perf_counter() - t0
        push_end = time.time()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        if not reply.accepted:
            raise RuntimeError(f"contribution refused: {reply.reason}")
        nbytes = sum(int(a.nbytes) for a in model.values())
        return {
            "event": "result",
            "site": kit.name,
            "round": data["round"],
            "pull_start": pull_start,
            "pull_end": pull_end,
            "push_start": push_start,
            "push_end": push_end,
            "pull_s": pull_s,
            "push_s": push_s,
            "num_tensors": len(model),
            "bytes_down": nbytes,
            "bytes_up": nbytes,
            "cpu_user_s": ru1.ru_utime - ru0.ru_utime,
            "cpu_system_s": ru1.ru_stime - ru0.ru_stime,
            "minor_faults": ru1.ru_minflt - ru0.ru_minflt,
            "peak_rss_after_pull_bytes": peak_after_pull,
            "peak_rss_bytes": peak_rss_bytes(),
            "phases_s": dict(phases.seconds),
            "phase_peak_rss_bytes": phases.peak_after,
        }
    finally:
        client.close_connect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True, help="the site's kit folder (holds startup/)")
    parser.add_argument("--task", default="bench", help="task name of the run (default: bench)")
    parser.add_argument("--no-wait", action="store_true", help="start the round at once, without waiting for 'go'")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of the round here")
    parser.add_argument(
        "--local-model",
        type=Path,
        default=None,
        help="build the site's own model from this model file's index before registering (else the first pull "
        "decodes into fresh arrays)",
    )
    args = parser.parse_args(argv)
    try:
        result = run_site(args)
    except BaseException as e:  # report every failure to the driver, then fail
        emit({"event": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return 1
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

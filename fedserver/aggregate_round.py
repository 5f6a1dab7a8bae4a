"""A round aggregated by a custom aggregator from the MMAR's custom/: in a child process, never in the server.

Deployed code runs on the server only in a sandboxed child (DESIGN §10, fedserver.untrusted_code). The server
keeps a custom aggregator's updates on disk (an UpdateStore, whichever family the class is: the server never
imports it); `aggregate_in_child` copies the round's inputs into a work folder the child may use, runs
`python -m fedserver.aggregate_round`, checks what it wrote as it would check a contribution, and only then puts
the new state and the new global model in place. A child that fails, hangs or writes something unusable fails
the round with the reason; the model and state stay.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedcommon.algorithms import AggregatorChoice
from fedcommon.atomic import atomic_writer
from fedcommon.mmar import CUSTOM_DIR
from fedcommon.model_file import ModelIndex, load_model, read_index, read_tensor
from fedcommon.tensor_codec import TensorSpec
from fedserver.aggregation import (
    AggregateError,
    StateFiles,
    UpdateStore,
    build_aggregator,
    load_state,
    store_deltas,
    write_next_model,
)
from fedserver.aggregator import ContributionError, UpdateAccumulator, VarSpec
from fedserver.untrusted_code import CodePolicy, CodeRefused, Sandbox, code_sandbox, drop_privileges

WORK_GLOBAL = "global.fl"
WORK_UPDATES = "updates"
WORK_JOB = "job.json"


def run_round(mmar_dir: Path, work: Path) -> None:
    """In the child: aggregate the round described in `work` with the MMAR's aggregator, into `work`."""
    job = json.loads((work / WORK_JOB).read_text())
    choice = AggregatorChoice(name=None, path=job["path"], args=job["args"])
    aggregator = build_aggregator(choice, [mmar_dir / "custom"])
    with open(work / WORK_GLOBAL, "rb") as f:
        index = read_index(f)
    specs = {e.name: VarSpec(e.dtype, e.shape) for e in index.entries}
    excluded = frozenset(job["excluded"])
    store = UpdateStore(work / WORK_UPDATES, specs, excluded, job["max_weight"])
    if aggregator.needs_all_updates:
        delta_of = store_deltas(aggregator, store)
    else:
        # The weighted mean, summed exactly as the server's streaming path sums it.
        accumulator = UpdateAccumulator(specs, excluded, job["max_weight"])
        for path, weight in zip(store.files, store.weights, strict=True):
            update, _ = load_model(path)
            accumulator.add({k: np.asarray(v) for k, v in update.items()}, float(weight))
        delta_of = accumulator.take_mean
    write_next_model(
        aggregator, choice.label, delta_of, work / WORK_GLOBAL, StateFiles(work), job["round"], job["meta"], excluded
    )


def aggregate_in_child(
    mmar_dir: Path,
    policy: CodePolicy,
    what: str,
    choice: AggregatorChoice,
    model_path: Path,
    states: StateFiles,
    round_number: int,
    meta: dict,
    excluded: frozenset[str],
    store_folder: Path,
    max_weight: float,
    timeout: float = 3600.0,
) -> None:
    """Replace the global model of `round_number` (and the aggregator's state) with the round's aggregate by the
    custom aggregator `choice`, computed in a sandboxed child from the updates in `store_folder` (an UpdateStore's).

    AggregateError, with nothing replaced, when the policy refuses the code or the child fails or writes nonsense.
    `what` names the run in refusals ("run 3").
    """
    try:
        with (
            code_sandbox(mmar_dir, policy, what) as sandbox,
            tempfile.TemporaryDirectory(prefix="fedlearn-round-") as tmp,
        ):
            _run_child(
                sandbox,
                Path(tmp),
                choice,
                model_path,
                states,
                round_number,
                meta,
                excluded,
                store_folder,
                max_weight,
                timeout,
            )
    except CodeRefused as e:
        raise AggregateError(f"custom aggregator {choice.path}: {e}") from None


def _run_child(
    sandbox: Sandbox,
    work: Path,
    choice: AggregatorChoice,
    model_path: Path,
    states: StateFiles,
    round_number: int,
    meta: dict,
    excluded: frozenset[str],
    store_folder: Path,
    max_weight: float,
    timeout: float,
) -> None:
    shutil.copyfile(model_path, work / WORK_GLOBAL)
    old_state = states.path(round_number)
    if old_state.exists():
        shutil.copyfile(old_state, work / old_state.name)
    shutil.copytree(store_folder, work / WORK_UPDATES)
    (work / WORK_JOB).write_text(
        json.dumps(
            {
                "path": choice.path,
                "args": choice.args,
                "round": round_number,
                "meta": meta,
                "excluded": sorted(excluded),
                "max_weight": max_weight,
            }
        )
    )
    if sandbox.argv:  # ["--run-as", "uid:gid"]: the child runs as that user and the work folder is its
        uid, gid = (int(v) for v in sandbox.argv[-1].split(":"))
        for p in (work, *work.rglob("*")):
            os.chown(p, uid, gid, follow_symlinks=False)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedserver.aggregate_round",
                "--mmar",
                str(sandbox.mmar),
                "--work",
                str(work),
                *sandbox.argv,
            ],
            env=sandbox.env,
            cwd=sandbox.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AggregateError(f"custom aggregator {choice.path} took more than {timeout:g} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise AggregateError(f"custom aggregator {choice.path}: {lines[-1] if lines else 'failed'}")
    new_model, new_state = work / WORK_GLOBAL, work / states.path(round_number + 1).name
    with open(model_path, "rb") as f:
        expected = read_index(f, model_path)
    try:
        _check_like(new_model, expected)
        if load_state(new_state).get("aggregator") != choice.label:
            raise ValueError("its state is not the aggregator's")
    except (OSError, ValueError, ContributionError) as e:
        raise AggregateError(f"custom aggregator {choice.path} wrote an unusable result: {e}") from None
    for source, target in ((new_state, states.path(round_number + 1)), (new_model, model_path)):
        with atomic_writer(target, direct=True) as out, open(source, "rb") as src:  # the state first: StateFiles
            shutil.copyfileobj(src, out, 1 << 20)
    states.prune(round_number + 1)


def _check_like(path: Path, expected: ModelIndex) -> None:
    """The child's model has the global model's variables, dtypes and shapes, and only finite values."""
    checker = UpdateAccumulator({e.name: VarSpec(e.dtype, e.shape) for e in expected.entries})
    with open(path, "rb") as f:
        index = read_index(f, path)
        if sorted(e.name for e in index.entries) != sorted(e.name for e in expected.entries):
            raise ValueError("its variables are not the global model's")
        for entry in index.entries:
            checker.check_tensor(TensorSpec(entry.name, entry.dtype, entry.shape))
            checker.check_finite(entry.name, read_tensor(f, entry))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mmar", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--run-as", help="UID:GID to become before the MMAR's code is imported (server as root)")
    args = parser.parse_args()
    if args.run_as:
        # fedlearn's modules are already imported (above); the child becomes the unprivileged user for good, and
        # only then imports the archive's code.
        drop_privileges(args.run_as, args.mmar / CUSTOM_DIR)
    try:
        run_round(args.mmar, args.work)
    except Exception as e:  # the parent shows the last line as the round's reason
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

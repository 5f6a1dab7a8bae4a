"""Aggregation algorithms: how one round's updates become the next global model (DESIGN §7).

Two families share one interface (`Aggregator`), applied one variable at a time so a model never sits in memory
twice. Streaming aggregators see the weighted mean of the updates, summed as they arrive (UpdateAccumulator); the
ones that need every update at once (median, trimmed mean, Krum) read them memory-mapped from an `UpdateStore`
on disk. Both end in `step()`, which may keep per-variable state (server momentum, Adam's m and v); the state is a
dict of arrays and JSON scalars, saved in the model file format beside the global model.

`aggregate()` is the offline form of one round (tests, replays, users checking their own aggregator).
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from fedcommon.algorithms import (
    AGGREGATORS,
    SCAFFOLD_CONTROL_PREFIX,
    SCAFFOLD_DELTA_PREFIX,
    AggregatorChoice,
    parse_aggregator,
)
from fedcommon.atomic import atomic_writer
from fedcommon.components import build_component
from fedcommon.direct_io import aligned_empty, in_page_cache, range_bytes, read_range, reopen_direct
from fedcommon.dtypes import accumulator_dtype, is_float
from fedcommon.mmar import Component
from fedcommon.model_file import (
    DIRECT_MIN_BYTES,
    ModelFileError,
    ModelFileWriter,
    ModelIndex,
    TensorEntry,
    load_model,
    read_index,
    read_tensor,
    save_model,
)
from fedcommon.run_folder import make_folders
from fedcommon.tensor_codec import TensorSpec
from fedserver.aggregator import AggregateError, ContributionError, UpdateAccumulator, VarSpec, check_weight
from fedserver.staged_upload import StagedUpload

log = logging.getLogger(__name__)

State = dict[str, Any]  # "slot/variable" -> np.ndarray, plus JSON scalars ("aggregator", "rounds")
# The needs-all family reads updates in blocks of about this many bytes (all contributions together).
BLOCK_BYTES = 4 << 20
DEFAULT_MAX_WEIGHT = 1e9  # config_fed_server.json's max_contribution_weight default

# From this size on, the new global model is written with direct I/O (see write_next_model).
DIRECT_MODEL_BYTES = 64 << 20


class Aggregator:
    """One aggregation algorithm, applied variable by variable. Subclass it for a custom aggregator.

    needs_all_updates False: `step` gets the weighted mean of the round's updates (streamed, O(model) memory).
    needs_all_updates True: `prepare` sees every update first, then `combine` gives each variable's update.
    `state_slots` names the arrays `step` keeps per variable (shape and accumulator dtype of the variable);
    `init_state` gives their values before the first round.
    """

    needs_all_updates: ClassVar[bool] = False
    state_slots: ClassVar[tuple[str, ...]] = ()

    def init_state(self, slot: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A state array before the first round: zeros."""
        return np.zeros(shape, dtype)

    def prepare(self, updates: UpdateStore) -> None:
        """See every update of the round before `combine` (needs_all_updates only)."""

    def combine(self, name: str, updates: VariableUpdates) -> np.ndarray:
        """The round's update of variable `name` from every contribution's (needs_all_updates only)."""
        return weighted_mean(updates, np.arange(len(updates.arrays)))

    def step(self, name: str, x: np.ndarray, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """The variable's new value from its value `x` and the round's update `delta` (both the accumulator dtype).

        `delta` may be overwritten; `state` holds this variable's arrays, updated in place or replaced.
        """
        return np.add(x, delta, out=delta)


class FedAvg(Aggregator):
    """x <- x + mean: today's aggregation (McMahan et al. 2017)."""


class FedAvgM(Aggregator):
    """Server momentum (Hsu et al. 2019): m <- server_momentum*m + mean; x <- x + server_lr*m."""

    state_slots = ("m",)

    def __init__(self, server_lr: float, server_momentum: float) -> None:
        self.lr, self.momentum = server_lr, server_momentum

    def step(self, name, x, delta, state):
        m = state["m"]
        np.multiply(m, self.momentum, out=m)
        np.add(m, delta, out=m)
        return np.add(x, np.multiply(m, self.lr, out=delta), out=delta)


class FedOpt(Aggregator):
    """Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, without bias correction:
    m <- beta_1*m + (1-beta_1)*mean; v from tau^2 by the subclass's rule; x <- x + eta*m/(sqrt(v)+tau)."""

    state_slots = ("m", "v")

    def __init__(self, eta: float, beta_1: float, tau: float, beta_2: float = 0.0) -> None:
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau

    def init_state(self, slot, shape, dtype):
        return np.full(shape, self.tau**2, dtype) if slot == "v" else np.zeros(shape, dtype)

    def second_moment(self, v: np.ndarray, square: np.ndarray) -> None:
        """Update v in place from the mean's square (which it may overwrite)."""
        raise NotImplementedError

    def step(self, name, x, delta, state):
        # In place where it can be: beyond x, m and v, two variable-sized buffers (Yogi: three).
        m, v = state["m"], state["v"]
        square = np.square(delta)
        np.multiply(m, self.beta_1, out=m)
        m += np.multiply(delta, 1.0 - self.beta_1, out=delta)
        self.second_moment(v, square)
        step = np.sqrt(v, out=square)
        step += self.tau
        np.divide(m, step, out=step)
        step *= self.eta
        return np.add(x, step, out=step)


class FedAdam(FedOpt):
    def second_moment(self, v, square):
        np.multiply(v, self.beta_2, out=v)
        v += np.multiply(square, 1.0 - self.beta_2, out=square)


class FedYogi(FedOpt):
    def second_moment(self, v, square):
        sign = np.sign(np.subtract(v, square))
        np.multiply(square, 1.0 - self.beta_2, out=square)
        v -= np.multiply(square, sign, out=square)


class FedAdagrad(FedOpt):
    def __init__(self, eta: float, beta_1: float, tau: float) -> None:
        super().__init__(eta, beta_1, tau)

    def second_moment(self, v, square):
        v += square


class FedMedian(Aggregator):
    """x <- x + coordinate-wise median of the updates (Yin et al. 2018); even n: mean of the middle two."""

    needs_all_updates = True

    def combine(self, name, updates):
        return updates.per_block(lambda block: np.median(block, axis=0))


class FedTrimmedAvg(Aggregator):
    """x <- x + per coordinate, the mean of the updates without the floor(beta*n) smallest and largest."""

    needs_all_updates = True

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def combine(self, name, updates):
        n = len(updates.arrays)
        k = math.floor(self.beta * n)
        return updates.per_block(lambda block: np.sort(block, axis=0)[k : n - k].mean(axis=0, dtype=block.dtype))


class MultiKrum(Aggregator):
    """Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent" (NeurIPS 2017).

    Score of update i: the sum of squared L2 distances (over all variables) to its n-f-2 nearest others; the
    num_selected lowest scores are averaged with their weights. Needs n > 2f+2.
    """

    needs_all_updates = True

    def __init__(self, num_malicious: int, num_selected: int) -> None:
        self.f, self.m = num_malicious, num_selected
        self.selected = np.arange(0)
        self.scores: list[float] = []

    def prepare(self, updates):
        n = len(updates)
        if n <= 2 * self.f + 2:
            raise AggregateError(
                f"{type(self).__name__} with num_malicious={self.f} needs more than "
                f"{2 * self.f + 2} contributions, the round has {n}"
            )
        if self.m > n:
            raise AggregateError(
                f"{type(self).__name__}: num_selected={self.m} is more than the round's {n} contributions"
            )
        distances = updates.squared_distances()
        nearest = n - self.f - 2
        scores = [float(np.sort(np.delete(distances[i], i))[:nearest].sum()) for i in range(n)]
        self.selected = np.argsort(scores, kind="stable")[: self.m]
        self.scores = scores
        log.info(
            "%s scores %s; selected contributions %s",
            type(self).__name__,
            [f"{s:.4g}" for s in scores],
            self.selected.tolist(),
        )

    def combine(self, name, updates):
        return weighted_mean(updates, self.selected)


class Krum(MultiKrum):
    """Krum: the update with the lowest score (MultiKrum with num_selected = 1)."""

    def __init__(self, num_malicious: int) -> None:
        super().__init__(num_malicious, 1)


BUILT_INS: dict[str, type[Aggregator]] = {
    c.__name__: c for c in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum, MultiKrum)
}
assert set(BUILT_INS) == set(AGGREGATORS), "fedcommon.algorithms declares what fedserver.aggregation implements"


def build_aggregator(choice: AggregatorChoice, search_paths: Sequence[Path] = ()) -> Aggregator:
    """The aggregator of a checked choice; a custom one is built from `search_paths` (the MMAR's custom/)."""
    if choice.name is not None:
        return BUILT_INS[choice.name](**choice.args)
    try:
        built = build_component(Component(path=choice.path, args=choice.args), search_paths)
    except Exception as e:
        raise ValueError(f"aggregator {choice.path!r} cannot be built: {e}") from e
    if not isinstance(built, Aggregator):
        raise ValueError(f"aggregator {choice.path!r} must subclass fedserver.aggregation.Aggregator")
    return built


def check_spec(spec: Mapping | AggregatorChoice) -> AggregatorChoice:
    """The checked choice of a config's "aggregator" dict; ValueError naming each bad key and the valid ones."""
    if isinstance(spec, AggregatorChoice):
        return spec
    choice, problems = parse_aggregator(spec)
    if problems:
        raise ValueError("; ".join(f"aggregator.{k}: {m}" if k else f"aggregator: {m}" for k, m in problems))
    return choice


# ---- the updates of a round on disk ---------------------------------------------------------------------------


class VariableUpdates:
    """One variable's update from each contribution that carries it: memory-mapped arrays and their weights."""

    def __init__(
        self, arrays: list[np.memmap], weights: np.ndarray, owners: np.ndarray, release: Callable[[int, int, int], None]
    ) -> None:
        self.arrays = arrays
        self.weights = weights
        self.owners = owners  # the contributions' numbers in the UpdateStore
        self._release = release

    @property
    def shape(self) -> tuple[int, ...]:
        return self.arrays[0].shape

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[0].dtype

    def blocks(self, rows: Sequence[int] | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """(coordinates, a (rows, coordinates) array) over the flattened variable, a few MiB at a time.

        Pages read are handed back to the kernel after each block, so the process's memory stays bounded
        however large the variable.
        """
        rows = range(len(self.arrays)) if rows is None else rows
        flat = [self.arrays[i].reshape(-1) for i in rows]
        size = flat[0].size if flat else 0
        step = max(1, BLOCK_BYTES // max(1, len(flat) * self.dtype.itemsize))
        for start in range(0, size, step):
            where = slice(start, min(size, start + step))
            yield where, np.stack([f[where] for f in flat])
            for i in rows:
                self._release(self.owners[i], start * self.dtype.itemsize, (where.stop - start) * self.dtype.itemsize)

    def per_block(self, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """fn applied over the contributions' axis of each block: one value per coordinate."""
        out = np.empty(int(np.prod(self.shape, dtype=np.int64)), self.dtype)
        for where, block in self.blocks():
            out[where] = fn(block)
        return out.reshape(self.shape)


def weighted_mean(updates: VariableUpdates, rows: Sequence[int]) -> np.ndarray:
    """Sum of w_i * update_i / sum of w_i over `rows`, block by block."""
    w = updates.weights[np.asarray(rows)]
    w = (w / w.sum()).astype(updates.dtype)
    out = np.empty(int(np.prod(updates.shape, dtype=np.int64)), updates.dtype)
    for where, block in updates.blocks(rows):
        out[where] = w @ block
    return out.reshape(updates.shape)


class UpdateStore:
    """A round's updates kept on disk in `folder`, one model file per contribution, read back memory-mapped.

    Each update is stored in its variables' accumulator dtype (fedcommon.dtypes); the folder survives a server
    restart, so the round's contributions are not lost. Weights are checked as by UpdateAccumulator.
    """

    def __init__(
        self,
        folder: Path,
        specs: dict[str, VarSpec],
        excluded: frozenset[str] = frozenset(),
        max_weight: float = DEFAULT_MAX_WEIGHT,
    ) -> None:
        self.folder = Path(folder)
        make_folders(self.folder)
        self.specs = specs
        self.excluded = excluded
        self.max_weight = max_weight
        self._files = sorted(p for p in self.folder.iterdir() if re.fullmatch(r"\d{6}\.fl", p.name))
        self._maps: dict[int, np.memmap] = {}
        self._indexes: list[ModelIndex] = []
        for path in self._files:
            with open(path, "rb") as f:
                self._indexes.append(read_index(f, path))

    def __len__(self) -> int:
        return len(self._files)

    def add(self, update: dict[str, np.ndarray], weight: float, site: str = "") -> None:
        """Write one checked update (see UpdateAccumulator.add) to disk atomically; empties `update`."""
        check_weight(weight, self.max_weight)
        arrays = {}
        for name in list(update):
            arr = update.pop(name)
            if name in self.excluded:
                continue
            if arr.dtype.kind == "u":  # wrapped around on the site: read it as signed (as UpdateAccumulator)
                arr = arr.view(arr.dtype.str.replace("u", "i"))
            arrays[name] = arr.astype(accumulator_dtype(arr.dtype), copy=False)
        path = self.folder / f"{len(self._files):06d}.fl"
        save_model(path, arrays, {"weight": float(weight), "site": site})
        with open(path, "rb") as f:
            self._indexes.append(read_index(f, path))
        self._files.append(path)

    def add_staged(self, staged: StagedUpload, weight: float, site: str = "") -> None:
        """Write one staged upload's variables to disk atomically, a variable at a time (see add)."""
        check_weight(weight, self.max_weight)
        staged.close()
        path = self.folder / f"{len(self._files):06d}.fl"
        with open(staged.path, "rb") as src:
            entries = [e for e in read_index(src, staged.path).entries if e.name in staged.received]
            with atomic_writer(path) as dst:
                writer = ModelFileWriter(
                    dst, [(e.name, e.dtype, e.shape) for e in entries], {"weight": float(weight), "site": site}
                )
                for entry in entries:
                    writer.write(entry.name, read_tensor(src, entry))
                writer.check_complete()
        with open(path, "rb") as f:
            self._indexes.append(read_index(f, path))
        self._files.append(path)

    @property
    def weights(self) -> np.ndarray:
        return np.array([float(index.meta["weight"]) for index in self._indexes])

    @property
    def files(self) -> list[Path]:
        """The contributions' model files, in the order they came."""
        return list(self._files)

    @property
    def sites(self) -> list[str]:
        return [str(index.meta.get("site", "")) for index in self._indexes]

    def names(self) -> list[str]:
        """The variables some contribution carries, in the order they were first seen."""
        return list(dict.fromkeys(e.name for index in self._indexes for e in index.entries))

    def variable(self, name: str) -> VariableUpdates:
        """Every contribution's update of `name` (memory-mapped), with its weight."""
        arrays, owners, offsets = [], [], {}
        for k, index in enumerate(self._indexes):
            entry = index.by_name().get(name)
            if entry is None:
                continue
            whole = self._map(k)
            arrays.append(whole[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).reshape(entry.shape))
            owners.append(k)
            offsets[k] = entry.offset
        owners = np.array(owners, dtype=np.int64)
        return VariableUpdates(
            arrays, self.weights[owners], owners, lambda k, start, length: self._release(k, offsets[k] + start, length)
        )

    def squared_distances(self) -> np.ndarray:
        """D[i, j]: the squared L2 distance between updates i and j over every variable both carry (float64)."""
        n = len(self)
        distances = np.zeros((n, n))
        for name in self.names():
            updates = self.variable(name)
            idx = updates.owners
            for _, block in updates.blocks():
                block = block.astype(np.float64, copy=False)
                for a in range(len(idx)):
                    distances[idx[a], idx] += np.square(block - block[a]).sum(axis=1)
        return distances

    def clear(self) -> None:
        """Forget the round's updates and delete their files."""
        self._maps.clear()
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files, self._indexes = [], []

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(self._files[k], dtype=np.uint8, mode="r")
        return self._maps[k]

    def _release(self, k: int, start: int, length: int) -> None:
        # The kernel drops the pages from this process (they stay in the page cache): RSS stays bounded.
        whole = self._maps.get(k)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if whole is None or advice is None or not isinstance(getattr(whole, "_mmap", None), mmap.mmap):
            return
        page = mmap.PAGESIZE
        first = start - start % page
        with contextlib.suppress(ValueError, OSError):
            whole._mmap.madvise(advice, first, start + length - first)


# ---- one variable's step, and the state ----------------------------------------------------------------------


def step_variable(
    aggregator: Aggregator, label: str, name: str, x: np.ndarray, delta: np.ndarray, state: dict[str, np.ndarray]
) -> np.ndarray:
    """The variable's new value in its own dtype (integers rounded); AggregateError for what must not be written.

    `x` may be overwritten. The result, and each state array, must be finite, of the variable's shape and of its
    accumulator dtype: a custom aggregator that breaks this fails the round, and the last good model stays.
    """
    acc = accumulator_dtype(x.dtype)
    _check_array(label, name, "update", delta, x.shape, acc)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is refused below, by name
            new = aggregator.step(name, x.astype(acc, copy=False), delta, state)
    except AggregateError:
        raise
    except Exception as e:
        raise AggregateError(f"aggregator {label} failed on variable {name!r}: {type(e).__name__}: {e}") from e
    _check_array(label, name, "new value", new, x.shape, acc)
    for slot in aggregator.state_slots:
        _check_array(label, name, f"state {slot!r}", state.get(slot), x.shape, acc)
    if not is_float(x.dtype):
        return np.rint(new).astype(x.dtype)
    if new.dtype == x.dtype:  # checked finite above, as it is written
        return new
    with np.errstate(over="ignore"):
        new = new.astype(x.dtype, copy=False)
    if new.size and not (np.isfinite(new.max()) and np.isfinite(new.min())):
        raise AggregateError(f"variable {name!r} of the aggregate is not finite")
    return new


def _check_array(label: str, name: str, what: str, arr: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if not isinstance(arr, np.ndarray):
        raise AggregateError(f"aggregator {label}: variable {name!r}: {what} is {type(arr).__name__}, not an array")
    if arr.shape != shape or arr.dtype != dtype:
        raise AggregateError(
            f"aggregator {label}: variable {name!r}: {what} is {arr.dtype.name}{list(arr.shape)}, "
            f"expected {dtype.name}{list(shape)}"
        )
    if arr.size and not (np.isfinite(arr.max()) and np.isfinite(arr.min())):
        if what == "new value":
            raise AggregateError(f"variable {name!r} of the aggregate is not finite (aggregator {label})")
        raise AggregateError(f"aggregator {label}: variable {name!r}: {what} holds NaN or Inf")


def variable_state(
    aggregator: Aggregator, state: Mapping[str, Any] | None, name: str, x: np.ndarray
) -> dict[str, np.ndarray]:
    """Variable `name`'s state arrays from a state dict, or their initial values (a fresh copy either way)."""
    acc = accumulator_dtype(x.dtype)
    out = {}
    for slot in aggregator.state_slots:
        held = None if state is None else state.get(f"{slot}/{name}")
        out[slot] = (
            np.array(held, dtype=acc, copy=True) if held is not None else aggregator.init_state(slot, x.shape, acc)
        )
    return out


def check_state(state: Mapping[str, Any] | None, label: str) -> None:
    """ValueError when a saved state belongs to another aggregator."""
    if state is not None and state.get("aggregator") != label:
        raise ValueError(f"the aggregator state is of {state.get('aggregator')!r}, the run aggregates with {label!r}")


def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a state dict atomically: its arrays as tensors, its scalars as the file's metadata."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    save_model(path, arrays, {k: v for k, v in state.items() if k not in arrays})


def load_state(path: str | os.PathLike) -> State:
    """A state dict that save_state wrote."""
    arrays, meta = load_model(path)
    return {**meta, **arrays}


class StateFiles:
    """The aggregator's state after each round, one file per round (`aggregator_state_<round>.fl` in `folder`).

    A state is written before the global model it belongs to, and found by the model's round: after a kill -9
    between the two renames, the resumed run still pairs the model with its own state.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, round_number: int) -> Path:
        return self.folder / f"aggregator_state_{round_number}.fl"

    def load(self, round_number: int) -> State | None:
        """The state that goes with the global model of `round_number`, or None before any."""
        path = self.path(round_number)
        return load_state(path) if path.exists() else None

    @contextlib.contextmanager
    def open(self, round_number: int) -> Iterator[Mapping[str, Any] | None]:
        """Like `load`, but each array is read from disk only when asked for (one variable at a time)."""
        path = self.path(round_number)
        if not path.exists():
            yield None
            return
        with open(path, "rb") as f:
            yield _StateFile(f, read_index(f, path))

    def prune(self, keep_round: int) -> None:
        """Delete the states of other rounds."""
        for path in self.folder.glob("aggregator_state_*.fl"):
            if path != self.path(keep_round):
                path.unlink(missing_ok=True)


class _StateFile(Mapping):
    """A saved state read lazily: scalars from the file's metadata, arrays from disk on access."""

    def __init__(self, f, index: ModelIndex) -> None:
        self._f, self._entries, self._meta = f, index.by_name(), index.meta

    def __getitem__(self, key: str) -> Any:
        if key in self._entries:
            return read_tensor(self._f, self._entries[key])
        return self._meta[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._meta, *self._entries])

    def __len__(self) -> int:
        return len(self._meta) + len(self._entries)


# ---- one round, on the server's files -----------------------------------------------------------------------------


def write_next_model(
    aggregator: Aggregator,
    label: str,
    delta_of: Callable[[str], np.ndarray | None],
    model_path: Path,
    states: StateFiles,
    round_number: int,
    meta: dict,
    excluded: frozenset[str] = frozenset(),
    control: UpdateAccumulator | None = None,
    control_fraction: float = 1.0,
) -> None:
    """Replace the global model of `round_number` at `model_path` with the next one, and save its state.

    Variable by variable (O(largest variable) beyond what `delta_of` holds): `delta_of(name)` is the round's
    update of a variable or None (excluded, or nobody sent it: the variable and its state are kept). The new state
    is saved (states.path(round_number + 1)) before the model is replaced. AggregateError: nothing is replaced.
    SCAFFOLD: `control` sums the round's delta c_i (see control_accumulator); the server's c is kept in the state.
    """
    with contextlib.ExitStack() as stack:
        old_state = stack.enter_context(states.open(round_number))
        src = stack.enter_context(open(model_path, "rb"))
        if aggregator.state_slots:
            check_state(old_state, label)
        index = read_index(src, model_path)
        slots = [
            (f"{slot}/{e.name}", accumulator_dtype(e.dtype), e.shape)
            for e in index.entries
            if e.name not in excluded
            for slot in aggregator.state_slots
        ]
        if control is not None:
            slots += [
                (f"{CONTROL_SLOT}/{e.name}", accumulator_dtype(e.dtype), e.shape)
                for e in index.entries
                if e.name in control.specs
            ]
        # A large model goes around the page cache (new page-cache pages cost a first touch, benchmarks/README.md); a
        # small one stays in it, where the next round's downloads, a hundred of them maybe, read it for free.
        direct = sum(e.nbytes for e in index.entries) >= DIRECT_MODEL_BYTES
        with atomic_writer(model_path, direct=direct) as dst:
            writer = ModelFileWriter(dst, [(e.name, e.dtype, e.shape) for e in index.entries], meta)
            with atomic_writer(states.path(round_number + 1), direct=direct) as state_dst:  # renamed first: StateFiles
                scalars = {"aggregator": label, "rounds": int((old_state or {}).get("rounds", 0)) + 1}
                state_writer = ModelFileWriter(state_dst, slots, scalars)
                # closed even when a step fails: the read in flight ends before the file does
                tensors = stack.enter_context(contextlib.closing(tensors_ahead(src, index, model_path)))
                for entry, x in tensors:
                    var_state = variable_state(aggregator, old_state, entry.name, x)
                    delta = None if entry.name in excluded else delta_of(entry.name)
                    if delta is not None:
                        x = step_variable(aggregator, label, entry.name, x, delta, var_state)
                    writer.write(entry.name, x)
                    if entry.name not in excluded:
                        for slot in aggregator.state_slots:
                            state_writer.write(f"{slot}/{entry.name}", var_state[slot])
                    if control is not None and entry.name in control.specs:
                        c = control_step(
                            entry.name,
                            old_control(old_state, entry.name, entry.dtype, entry.shape),
                            control.take_mean(entry.name),
                            control_fraction,
                        )
                        state_writer.write(f"{CONTROL_SLOT}/{entry.name}", c)
                writer.check_complete()
                state_writer.check_complete()
    states.prune(round_number + 1)


def tensors_ahead(src: BinaryIO, index: ModelIndex, path: Path) -> Iterator[tuple[TensorEntry, np.ndarray]]:
    """Each tensor of the open model file `src`, writable; a thread reads the next while the caller works on this
    one (the close's disk wait overlaps its computing). An array is valid until the next is asked for.

    Two buffers, grown to the largest tensor, are reused: no fresh memory per variable. Large tensors that are not
    in the page cache are read with direct I/O (as read_tensor).
    """
    fd = src.fileno()
    direct_fd, direct = reopen_direct(fd)
    buffers: list[np.ndarray] = [aligned_empty(0), aligned_empty(0)]

    def read(k: int, entry: TensorEntry) -> np.ndarray:
        need = range_bytes(entry.offset, entry.nbytes)
        if buffers[k % 2].nbytes < need:
            buffers[k % 2] = aligned_empty(need)
        use_direct = direct and entry.nbytes >= DIRECT_MIN_BYTES and not in_page_cache(fd, entry.offset, entry.nbytes)
        try:
            raw = read_range(direct_fd if use_direct else fd, buffers[k % 2], entry.offset, entry.nbytes, str(path))
        except OSError as e:
            raise ModelFileError(f"tensor {entry.name!r}: {e}") from None
        return raw.view(entry.dtype).reshape(entry.shape)

    entries = index.entries
    try:
        # closed early (an error), it waits for the read in flight on leaving the executor
        with ThreadPoolExecutor(1, thread_name_prefix="model-read-ahead") as reader:
            pending = reader.submit(read, 0, entries[0]) if entries else None
            for k, entry in enumerate(entries):
                x = pending.result()
                # the buffer of the tensor before this one is free: the caller is done with it
                pending = reader.submit(read, k + 1, entries[k + 1]) if k + 1 < len(entries) else None
                yield entry, x
    finally:
        os.close(direct_fd)


def store_deltas(aggregator: Aggregator, store: UpdateStore) -> Callable[[str], np.ndarray | None]:
    """`delta_of` for an aggregator that needs every update: prepare() over the store, then combine() per variable."""
    if not len(store):
        raise AggregateError("the round has no contributions")
    aggregator.prepare(store)
    names = set(store.names())

    def delta_of(name: str) -> np.ndarray | None:
        if name not in names:
            return None
        updates = store.variable(name)
        delta = aggregator.combine(name, updates)
        return np.array(delta, copy=True) if isinstance(delta, np.memmap) else delta

    return delta_of


# ---- the offline form -----------------------------------------------------------------------------------------


def aggregate(
    spec: Mapping | AggregatorChoice,
    global_model: Mapping[str, np.ndarray],
    contributions: Sequence[tuple[Mapping[str, np.ndarray], float]],
    state: State | None,
    *,
    excluded: frozenset[str] | set[str] = frozenset(),
    max_weight: float = DEFAULT_MAX_WEIGHT,
    search_paths: Sequence[Path] = (),
    workdir: str | os.PathLike | None = None,
    scaffold: bool = False,
    num_sites: int | None = None,
) -> tuple[dict[str, np.ndarray], State]:
    """One round: the next global model and the aggregator's state, as the server computes them.

    spec: config_fed_server.json's "aggregator" dict; contributions: (update, weight) with weight = aggregation
    weight x samples (or iterations); state: what the previous call returned, None at the first round.
    max_weight: the run's max_contribution_weight x its largest aggregation weight (weights are divided by it, as
    on the server). Updates are checked as the server checks them (ContributionError); a round that cannot be
    aggregated raises AggregateError. Needs-all aggregators keep the updates under `workdir` (a temp folder).
    scaffold: each update also carries its site's delta c_i (split_scaffold); the server's c is updated in the state
    ("scaffold_c/<variable>"), with |S|/N = len(contributions) / num_sites (None: every site took part).
    """
    choice = check_spec(spec)
    aggregator = build_aggregator(choice, search_paths)
    check_state(state, choice.label)
    excluded = frozenset(excluded)
    specs = {name: VarSpec(np.asarray(a).dtype, np.asarray(a).shape) for name, a in global_model.items()}
    checker = UpdateAccumulator(specs, excluded, max_weight)
    control = control_accumulator(specs, excluded) if scaffold else None
    updates = []
    for k, (update, weight) in enumerate(contributions):
        try:
            if control is not None:
                update, delta_c = split_scaffold(dict(update), specs, excluded)
                control.add({name: _read_only(a) for name, a in delta_c.items()}, 1.0)
            for name, arr in update.items():
                checker.check_tensor(TensorSpec(name, arr.dtype, arr.shape))
                UpdateAccumulator.check_finite(name, arr)
        except ContributionError as e:
            raise ContributionError(f"contribution {k}: {e}") from None
        # Read-only views: the accumulator copies them instead of scaling the caller's arrays in place.
        updates.append(({name: _read_only(a) for name, a in update.items()}, weight))
    with contextlib.ExitStack() as stack:
        if aggregator.needs_all_updates:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
            store = UpdateStore(folder, specs, excluded, max_weight)
            for update, weight in updates:
                store.add(update, weight)
            delta_of = store_deltas(aggregator, store)
        else:
            accumulator = UpdateAccumulator(specs, excluded, max_weight)
            for update, weight in updates:
                accumulator.add(update, weight)
            delta_of = accumulator.take_mean
        new_model, new_state = {}, {"aggregator": choice.label, "rounds": int((state or {}).get("rounds", 0)) + 1}
        for name, value in global_model.items():
            x = np.array(value, copy=True)
            var_state = variable_state(aggregator, state, name, x)
            delta = None if name in excluded else delta_of(name)
            new_model[name] = x if delta is None else step_variable(aggregator, choice.label, name, x, delta, var_state)
            if name not in excluded:
                new_state.update({f"{slot}/{name}": var_state[slot] for slot in aggregator.state_slots})
            if control is not None and name in control.specs:
                fraction = 1.0 if num_sites is None else len(contributions) / num_sites
                new_state[f"{CONTROL_SLOT}/{name}"] = control_step(
                    name, old_control(state, name, x.dtype, x.shape), control.take_mean(name), fraction
                )
    return new_model, new_state


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = np.asarray(arr).view()
    view.flags.writeable = False
    return view


# ---- SCAFFOLD on the server ------------------------------------------------------------------------------------


def split_scaffold(
    update: dict[str, np.ndarray], specs: Mapping[str, VarSpec], excluded: frozenset[str] = frozenset()
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A SCAFFOLD contribution split into its model update and its delta c_i (Karimireddy et al. 2020, Alg. 1).

    ContributionError (the contribution is refused, the others proceed) when a delta c_i is missing for a variable
    the update carries, is not of the variable's shape and dtype, holds NaN or Inf, or names no variable.
    """
    model, control = {}, {}
    for name, arr in update.items():
        if name.startswith(SCAFFOLD_DELTA_PREFIX):
            control[name[len(SCAFFOLD_DELTA_PREFIX) :]] = arr
        else:
            model[name] = arr
    for name, arr in control.items():
        spec = specs.get(name)
        if spec is None or name in excluded:
            raise ContributionError(f"SCAFFOLD delta c for {name!r}, which is not aggregated in this model")
        if not is_float(spec.dtype):
            raise ContributionError(f"SCAFFOLD delta c for {name!r}, an integer variable (it has no control variate)")
        if arr.dtype != spec.dtype or arr.shape != spec.shape:
            raise ContributionError(
                f"SCAFFOLD delta c for {name!r}: {arr.dtype.name}{list(arr.shape)}, the model has "
                f"{spec.dtype.name}{list(spec.shape)}"
            )
        UpdateAccumulator.check_finite(f"{SCAFFOLD_DELTA_PREFIX}{name}", arr)
    missing = [n for n in model if n in specs and n not in excluded and is_float(specs[n].dtype) and n not in control]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ContributionError(f"SCAFFOLD delta c missing for {len(missing)} variable(s): {shown}")
    return model, control


CONTROL_SLOT = "scaffold_c"  # the server's control variate c, per variable, in the aggregator's state


def control_accumulator(specs: Mapping[str, VarSpec], excluded: frozenset[str] = frozenset()) -> UpdateAccumulator:
    """Sums a round's delta c_i, each with weight 1 (the paper's mean is unweighted): over the model's floating
    variables that are aggregated."""
    floating = {n: s for n, s in specs.items() if is_float(s.dtype) and n not in excluded}
    return UpdateAccumulator(floating, max_weight=1.0)


def old_control(state: Mapping[str, Any] | None, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The server's c of a variable before this round (zeros at first), in its accumulator dtype."""
    held = None if state is None else state.get(f"{CONTROL_SLOT}/{name}")
    acc = accumulator_dtype(dtype)
    return np.zeros(shape, acc) if held is None else np.array(held, dtype=acc, copy=True)


def control_step(name: str, c: np.ndarray, mean_delta: np.ndarray | None, fraction: float) -> np.ndarray:
    """c + (|S|/N) * mean of the sites' delta c_i (Karimireddy et al. 2020, Algorithm 1, line 17), |S|/N =
    `fraction`; c unchanged when no site sent one."""
    if mean_delta is None:
        return c
    c += fraction * mean_delta
    if c.size and not (np.isfinite(c.max()) and np.isfinite(c.min())):
        raise AggregateError(f"SCAFFOLD control variate of {name!r} is not finite")
    return c


def control_tensors(
    states: StateFiles, round_number: int, model: ModelIndex, excluded: frozenset[str] = frozenset()
) -> Iterator[tuple[str, np.ndarray]]:
    """The server's c to send with the global model of `round_number`, in each variable's dtype and named for the
    wire (SCAFFOLD_CONTROL_PREFIX + name), one variable at a time; zeros before the first round."""
    with states.open(round_number) as state:
        for entry in model.entries:
            if is_float(entry.dtype) and entry.name not in excluded:
                c = old_control(state, entry.name, entry.dtype, entry.shape)
                yield SCAFFOLD_CONTROL_PREFIX + entry.name, c.astype(entry.dtype, copy=False)


def scaffold_control_update(
    c: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]], num_sites: int | None = None
) -> dict[str, np.ndarray]:
    """The server's new c from the sites' delta c_i, as the server computes it (see control_step); N = num_sites
    (all sites of the federation), |S| = len(deltas); N None: every site took part (|S|/N = 1)."""
    specs = {n: VarSpec(v.dtype, v.shape) for n, v in c.items()}
    control = control_accumulator(specs)
    for delta in deltas:
        control.add({n: _read_only(a) for n, a in delta.items()}, 1.0)
    fraction = 1.0 if num_sites is None else len(deltas) / num_sites
    return {
        n: control_step(
            n, np.array(v, dtype=accumulator_dtype(v.dtype), copy=True), control.take_mean(n), fraction
        ).astype(v.dtype)
        for n, v in c.items()
    }

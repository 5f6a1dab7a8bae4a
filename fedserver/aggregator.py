"""Streamed weighted aggregation of model updates: w[v] += sum(a_i n_i d_i[v]) / sum(a_i n_i) (DESIGN §7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from fedcommon.dtypes import accumulator_dtype, is_float
from fedcommon.model_file import ModelFileWriter, ModelIndex, read_tensor
from fedcommon.tensor_codec import TensorAssembler, TensorSpec, spec_from_header
from fedcommon.wire import training_pb2 as pb

# The weighted sum of one round can never overflow its accumulator (DESIGN §7): a site's claimed weight is at
# most the run's max_contribution_weight and enters the sum divided by it (a factor <= 1), every value of an
# update is at most value_bound() in magnitude, and a round sums at most MAX_CONTRIBUTORS updates; so every
# partial sum stays below the accumulator dtype's largest finite value.
MAX_CONTRIBUTORS = 1 << 20


def value_bound(dtype: np.dtype) -> float:
    """The largest magnitude a value of an update of this dtype may have."""
    return float(np.finfo(accumulator_dtype(dtype)).max) / MAX_CONTRIBUTORS


class ContributionError(ValueError):
    """A contribution that is refused; the message says why."""


def check_weight(weight: float, max_weight: float) -> None:
    """Refuse an aggregation weight that is not a positive number of at most `max_weight`."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
        raise ContributionError(f"aggregation weight must be a positive number, got {weight}")
    if weight > max_weight:
        raise ContributionError(
            f"aggregation weight {weight:g} is more than max_contribution_weight "
            f"{max_weight:g} (config_fed_server.json)"
        )


class AggregateError(ValueError):
    """A round's aggregate that is not finite: nothing is written, the last good model stays."""


@dataclass(frozen=True)
class VarSpec:
    """A variable of the global model."""

    dtype: np.dtype
    shape: tuple[int, ...]


class UpdateAccumulator:
    """Running weighted sums of updates per variable; memory O(model), never O(clients x model)."""

    def __init__(self, specs: dict[str, VarSpec], excluded: frozenset[str] = frozenset(), max_weight: float = 1e9):
        self.specs = specs
        self.excluded = excluded
        self.max_weight = max_weight
        self._sums: dict[str, np.ndarray] = {}
        self._weights: dict[str, float] = {}
        self._count = 0

    def check_tensor(self, spec: TensorSpec) -> bool:
        """Refuse an unknown variable or a wrong shape or dtype; False when the variable is excluded."""
        expected = self.specs.get(spec.name)
        if expected is None:
            raise ContributionError(f"unknown variable {spec.name!r} (not in the global model)")
        if spec.dtype != expected.dtype:
            raise ContributionError(
                f"variable {spec.name!r}: dtype {spec.dtype.name}, the global model has {expected.dtype.name}"
            )
        if spec.shape != expected.shape:
            raise ContributionError(
                f"variable {spec.name!r}: shape {list(spec.shape)}, the global model has {list(expected.shape)}"
            )
        return spec.name not in self.excluded

    @staticmethod
    def check_finite(name: str, arr: np.ndarray) -> None:
        """Refuse NaN and Inf, and values beyond value_bound() (two reductions, no temporary array)."""
        if not is_float(arr.dtype) or not arr.size:
            return
        high, low = float(arr.max()), float(arr.min())
        if not (np.isfinite(high) and np.isfinite(low)):
            raise ContributionError(f"variable {name!r} holds NaN or Inf")
        bound = value_bound(arr.dtype)
        if max(high, -low) > bound:
            raise ContributionError(
                f"variable {name!r} holds {max(high, -low):.3g}, beyond the {bound:.3g} an update's value may have"
            )

    def add(self, update: dict[str, np.ndarray], weight: float) -> None:
        """Add weight * update to the sums; empties `update` (its arrays may be reused in place).

        The update's values must have passed check_finite; the weight is checked here.
        """
        check_weight(weight, self.max_weight)
        if self._count >= MAX_CONTRIBUTORS:
            raise ContributionError(f"the round already sums {MAX_CONTRIBUTORS} contributions")
        self._count += 1
        weight = weight / self.max_weight  # <= 1: see MAX_CONTRIBUTORS
        for name in list(update):
            arr = update.pop(name)  # released as soon as it is summed, not when the upload ends
            if name in self.excluded:
                continue
            if arr.dtype.kind == "u":
                # an unsigned update that went down wrapped around on the site: read it as signed
                arr = arr.view(arr.dtype.str.replace("u", "i"))
            acc_dtype = accumulator_dtype(arr.dtype)
            if arr.dtype == acc_dtype and arr.flags.writeable:
                x = arr
            else:
                x = arr.astype(acc_dtype)
            total = self._sums.get(name)
            np.multiply(x, weight, out=x)
            if total is None:
                # The first contribution's buffer becomes the sum: no extra copy of the model.
                self._sums[name] = x
                self._weights[name] = weight
            else:
                np.add(total, x, out=total)
                self._weights[name] += weight

    @property
    def empty(self) -> bool:
        return not self._sums

    def save(self, f, meta: dict) -> None:
        """Write the sums and their weights into an open file, as a model file (a snapshot of the open round)."""
        names = sorted(self._sums)
        meta = {**meta, "weights": {n: self._weights[n] for n in names}}
        writer = ModelFileWriter(f, [(n, self._sums[n].dtype, self._sums[n].shape) for n in names], meta)
        for name in names:
            writer.write(name, self._sums[name])
        writer.check_complete()

    def load(self, f, index: ModelIndex) -> None:
        """Take back sums that `save` wrote; ValueError when they do not fit this model."""
        weights = index.meta.get("weights")
        if not isinstance(weights, dict):
            raise ValueError("no weights recorded beside the sums")
        sums: dict[str, np.ndarray] = {}
        for entry in index.entries:
            spec = self.specs.get(entry.name)
            if spec is None or entry.name in self.excluded:
                raise ValueError(f"variable {entry.name!r} is not aggregated in this model")
            if entry.shape != spec.shape or entry.dtype != accumulator_dtype(spec.dtype):
                raise ValueError(
                    f"variable {entry.name!r}: the sum does not fit the model's {spec.dtype.name} {list(spec.shape)}"
                )
            w = weights.get(entry.name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not np.isfinite(w):
                raise ValueError(f"variable {entry.name!r}: weight {w!r}")
            sums[entry.name] = read_tensor(f, entry)
        self._sums = sums
        self._weights = {n: float(weights[n]) for n in sums}

    def take_mean(self, name: str) -> np.ndarray | None:
        """The weighted mean of variable `name`'s updates (its sum, divided in place), or None; once per name."""
        total = self._sums.pop(name, None)
        return None if total is None else np.divide(total, self._weights[name], out=total)

    def apply_to(self, current: ModelIndex, source, writer: ModelFileWriter) -> None:
        """Write current + sums / weights for each variable into `writer`, one tensor at a time.

        AggregateError when a variable of the new model would not be finite; `writer` is then incomplete.
        """
        for entry in current.entries:
            w = read_tensor(source, entry)
            step = self.take_mean(entry.name)
            if step is not None:
                if w.dtype == step.dtype:
                    np.add(w, step, out=w)
                elif is_float(entry.dtype):
                    w = np.add(w.astype(step.dtype), step, out=step).astype(entry.dtype)
                else:
                    w = np.rint(np.add(w.astype(np.float64), step, out=step)).astype(entry.dtype)
                if is_float(entry.dtype) and w.size and not (np.isfinite(w.max()) and np.isfinite(w.min())):
                    raise AggregateError(f"variable {entry.name!r} of the aggregate is not finite")
            writer.write(entry.name, w)
        writer.check_complete()


def receive_tensors(
    chunks: Iterable[pb.ModelChunk], check: Callable[[TensorSpec], None], what: str
) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors of an upload, one at a time: `check` sees each header first, NaN/Inf are refused.

    Raises ContributionError for a variable sent twice, a second header, or an upload that ends mid-tensor.
    """
    seen: set[str] = set()
    asm = TensorAssembler()
    for chunk in chunks:
        part = chunk.WhichOneof("part")
        if part == "tensor":
            spec = spec_from_header(chunk.tensor)
            if spec.name in seen:
                raise ContributionError(f"variable {spec.name!r} appears twice")
            seen.add(spec.name)
            check(spec)
            done = asm.start(chunk.tensor, spec)
        elif part == "data":
            done = asm.feed(chunk.data)
        else:
            raise ContributionError(f"a second header inside {what}")
        if done is not None:
            UpdateAccumulator.check_finite(*done)
            yield done
    if asm.in_tensor:
        raise ContributionError(f"{what} ended early: {asm.pending_description()}")

"""ClientModelManager: the site's view of the global model, its local model, updates and the best model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedclient.components.model_reader_writer import ModelProcessor
from fedclient.components.model_validator import ModelValidator
from fedclient.global_model_file import GlobalModelFile
from fedcommon.dtypes import accumulator_dtype, is_float
from fedcommon.metrics import metric_score
from fedcommon.mmar import excluded
from fedcommon.model_file import TensorEntry, load_model, read_index, save_model
from fedcommon.model_meta import FLContext, FLContextKey
from fedcommon.tensor_codec import TensorSink, TensorSpec, fits

log = logging.getLogger(__name__)


class ClientModelManager:
    """Client-side model manager living on the site's machine; the global model it received is kept on disk, not in
    memory (global_model_dir), and loaded into the local model (straight from the download where it can be)."""

    def __init__(
        self,
        task_names=None,
        exclude_vars=None,
        privacy=None,
        model_reader_writer: ModelProcessor | None = None,
        model_validator: ModelValidator | None = None,
        visualizer=None,
    ):
        if visualizer is not None:
            raise ValueError(
                "ClientModelManager: visualizer is not supported: the seed documents no visualizer "
                "interface; a site's per-round metrics are in run_N/logs/worker.log and `fedadmin "
                "status`"
            )
        self.task_names = list(task_names or [])
        self.exclude_vars: tuple[str, ...] | str = exclude_vars or ()
        self.privacy = privacy
        self.model_reader_writer = model_reader_writer or ModelProcessor()
        self.model_validator = model_validator or ModelValidator()
        self.visualizer = None
        self._fitter = None
        # Where received global models are kept, in unnamed files (None: the system's temp folder).
        self.global_model_dir: Path | None = None
        self._global: dict[str, GlobalModelFile] = {}
        self._lent: dict[str, str] = {}  # variable -> the task whose download wrote into it, until it is assigned
        self._meta: dict[str, dict[str, Any]] = {}
        self._best: dict[str, np.ndarray] | None = None
        self._best_path: Path | None = None
        self._best_score: float | None = None
        self.best_metrics: dict[str, float] | None = None

    # ---- fitter ---------------------------------------------------------------------------------

    def set_fitter(self, fitter) -> None:
        self._fitter = fitter

    def get_fitter(self):
        return self._fitter

    def _require_fitter(self):
        if self._fitter is None:
            raise RuntimeError("no fitter set: call set_fitter() first")
        return self._fitter

    def num_local_iterations(self) -> int:
        """Number of local training iterations per federated round (1 if no fitter is set)."""
        if self._fitter is None:
            return 1
        return int(self._fitter.num_local_iterations())

    def train(self, progress: Callable[[int, float], None] | None = None) -> dict:
        """Run the fitter's local training phase."""
        return self._require_fitter().train(progress)

    def validate(self) -> dict[str, float]:
        """Metrics of the fitter's current model on local held-out data."""
        return self.model_validator.validate(self._require_fitter())

    # ---- global model ---------------------------------------------------------------------------

    def assign_current_model(
        self, remote_models: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping[str, Mapping[str, Any]] | None = None
    ) -> bool:
        """Keep each task's global model (on disk) and load it into the local model; True if the local model changed.

        A variable that was decoded straight into the local model (global_model_sink) counts as changed.
        """
        fitter = self._require_fitter()
        changed = False
        for task, tensors in remote_models.items():
            kept = {k: v for k, v in tensors.items() if not excluded(k, self.exclude_vars)}
            self._keep_global(task, kept)
            self._meta[task] = dict((meta or {}).get(task, {}))
            changed |= self.model_reader_writer.apply_model(fitter, kept)
            for name in kept:
                self._lent.pop(name, None)
        return changed

    def _keep_global(self, task: str, tensors: Mapping[str, np.ndarray]) -> None:
        old = self._global.pop(task, None)
        if old is not None:  # before the new one is written: the disk holds one global model per task, not two
            old.close()
        try:
            self._global[task] = GlobalModelFile(tensors, self.global_model_dir)
        except OSError as e:
            raise OSError(
                f"cannot keep task {task!r}'s global model on disk in "
                f"{self.global_model_dir or 'the temp folder'} (the update is computed from it): {e}"
            ) from e

    def global_model_sink(self, task_name: str) -> TensorSink | None:
        """Where a download of the task's global model may decode each variable: straight into the local model's own
        array (same name, dtype and shape, contiguous, writable, on the CPU; not excluded), else None (a fresh
        buffer). None when the model reader-writer offers no arrays (it has no writable_model(fitter)).

        A download that fails after writing into the local model leaves it partly overwritten: local_model_partial
        says so until a global model is assigned again.
        """
        offer = getattr(self.model_reader_writer, "writable_model", None)
        if offer is None or self._fitter is None:
            return None
        arrays = offer(self._fitter)
        # An in-memory best model may share the working weights' arrays (a reader-writer that hands them out).
        kept = {id(arr) for arr in (self._best or {}).values()}

        def sink(spec: TensorSpec) -> np.ndarray | None:
            arr = arrays.get(spec.name)
            if (
                not fits(arr, spec)
                or id(arr) in kept
                or excluded(spec.name, self.exclude_vars)
                or self._lent.get(spec.name, task_name) != task_name  # another task's download wrote it first
            ):
                return None
            self._lent[spec.name] = task_name
            return arr

        return sink

    @property
    def local_model_partial(self) -> bool:
        """True when a download decoded into the local model and did not end in assign_current_model (it broke off
        or failed a check): the local model then mixes the old local and the new global model; pull again."""
        return bool(self._lent)

    def _require_whole(self) -> None:
        if self._lent:
            first = next(iter(self._lent))
            raise RuntimeError(
                f"the local model is incomplete: a download of task {self._lent[first]!r}'s global model wrote into "
                f"{len(self._lent)} variable(s) (e.g. {first!r}) and did not complete; pull the global model again"
            )

    def model_vars(self, task_name: str) -> list[str]:
        """Variables of the task's global model, as last received."""
        return list(self._global.get(task_name, {}))

    def model_meta(self, task_name: str) -> dict[str, Any]:
        """Metadata of the task's last received global model (run, round)."""
        return dict(self._meta.get(task_name, {}))

    # ---- local model ----------------------------------------------------------------------------

    def get_current_model_data(self, local_model_params: Mapping[str, np.ndarray] | None = None) -> dict:
        """The local model's variables (or `local_model_params` if given), excluded ones left out."""
        params = (
            local_model_params
            if local_model_params is not None
            else (self.model_reader_writer.extract_model(self._require_fitter()))
        )
        return {k: v for k, v in params.items() if not excluded(k, self.exclude_vars)}

    def update_current_model(self, local_model_params: Mapping[str, np.ndarray]) -> bool:
        """Load `local_model_params` into the local model."""
        return self.model_reader_writer.apply_model(self._require_fitter(), local_model_params, self.exclude_vars)

    def read_current_model(self, task_name: str, type_str: str = "delta_w", train_ctx=None) -> Mapping:
        """What to send the server: the update (local minus global) or, with type_str "model", the weights.

        train_ctx (an FLContext, a Mapping, or a training-context object) goes to the privacy filter.

        Without a privacy filter the update is computed a variable at a time as it is read (a Mapping, not a
        dict), against the global model read back from disk: keep the local model unchanged until it is sent.
        Raises RuntimeError while local_model_partial.
        """
        self._require_whole()
        local = self.get_current_model_data()
        if type_str == "model":
            return local
        if type_str != "delta_w":
            raise ValueError(f"type_str must be 'delta_w' or 'model', got {type_str!r}")
        base = self._global.get(task_name)
        if base is None:
            raise RuntimeError(f"no global model received yet for task {task_name!r}")
        # Purely local variables and flags (no meaningful difference) are never sent.
        names = [name for name, w in local.items() if name in base and w.dtype != np.bool_]
        for name in names:
            _check_same(local[name], base.entry(name))
        if self.privacy is None:
            return _LazyDelta(local, base, names)
        delta = {name: _difference(local[name], base[name]) for name in names}
        ctx = _fl_context(train_ctx)
        # The filter's train_ctx: the site's own training context when there is one (its step count is its own).
        filter_ctx = ctx.get_prop(FLContextKey.TRAIN_CONTEXT)
        if filter_ctx is None:
            if ctx.get_prop(FLContextKey.LOCAL_STEPS) is None:
                ctx.set_prop(FLContextKey.LOCAL_STEPS, self.num_local_iterations())
            filter_ctx = ctx
        delta = self.privacy.apply(delta, filter_ctx)
        # What was applied travels with the update, so the server can account for it.
        ctx.set_prop(FLContextKey.PRIVACY_PROTOCOL, type(self.privacy).__name__)
        ctx.set_prop(FLContextKey.PRIVACY_EPSILON, getattr(self.privacy, "last_epsilon", None) or 0.0)
        return delta

    # ---- best model -----------------------------------------------------------------------------

    def update_best_model(self, metrics: Mapping[str, float], path: Path | None = None) -> bool:
        """Keep the local model as the best one if `metrics` beat the best so far; save it to `path`."""
        score = metric_score(metrics)
        if self._best_score is not None and score <= self._best_score:
            return False
        self._best_score = score
        best = self.model_reader_writer.extract_model(self._require_fitter())
        self.best_metrics = dict(metrics)
        if path is None:
            self._best, self._best_path = best, None
        else:
            # On disk only: a site does not hold one more copy of the model for the rest of the run.
            save_model(path, best, {"metrics": self.best_metrics})
            self._best, self._best_path = None, path
        return True

    def get_best_model(self) -> dict[str, np.ndarray] | None:
        """The best model so far (read back from its file when it was saved to one); None before any."""
        if self._best is None and self._best_path is not None:
            return load_model(self._best_path)[0]
        return self._best

    def load_best_model(self, path: Path) -> bool:
        """Take the best model saved by an earlier training of this run; False when there is none."""
        if not path.exists():
            return False
        with open(path, "rb") as f:
            meta = read_index(f, path).meta
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        self._best, self._best_path, self.best_metrics = None, path, dict(metrics)
        self._best_score = metric_score(metrics) if metrics else None
        return True

    def release_global_models(self) -> None:
        """Drop the received global models and their files (after the run's end: nothing is computed from them)."""
        for stored in self._global.values():
            stored.close()
        self._global.clear()

    def validate_model(
        self, cross_site_val_configer=None, checkpoint: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, float]:
        """Metrics of the model `checkpoint` (name -> array) on local data; the local model is left as it was.

        cross_site_val_configer validates instead of the manager's model_validator: an object with
        validate(fitter) -> metrics (a ModelValidator), or None.
        Raises ValueError naming the variable when `checkpoint` does not fit the local model.
        """
        validator = self.model_validator
        if cross_site_val_configer is not None:
            if not callable(getattr(cross_site_val_configer, "validate", None)):
                raise TypeError(
                    f"cross_site_val_configer must have validate(fitter) -> metrics (a ModelValidator), "
                    f"got {type(cross_site_val_configer).__name__}"
                )
            validator = cross_site_val_configer
        if checkpoint is None:
            return validator.validate(self._require_fitter())
        fitter = self._require_fitter()
        saved = self.model_reader_writer.extract_model(fitter)
        missing = sorted(set(saved) - set(checkpoint))
        if missing:
            raise ValueError(f"the model lacks {len(missing)} variable(s) of the local model, e.g. {missing[0]!r}")
        try:
            self.model_reader_writer.apply_model(fitter, checkpoint)
            return validator.validate(fitter)
        finally:
            self.model_reader_writer.apply_model(fitter, saved)

    def close(self) -> None:
        """Drop every model held."""
        self.release_global_models()
        self._best = self._best_path = None
        self._fitter = None


def _fl_context(train_ctx) -> FLContext:
    """train_ctx as an FLContext; a training-context object of the site's own rides in it as TRAIN_CONTEXT."""
    if isinstance(train_ctx, FLContext):
        return train_ctx
    if train_ctx is None or isinstance(train_ctx, Mapping):
        return FLContext(dict(train_ctx or {}))
    return FLContext({FLContextKey.TRAIN_CONTEXT: train_ctx})


class _LazyDelta(Mapping[str, np.ndarray]):
    """local - global for each variable, computed when it is read: streaming an update then holds one tensor's
    difference at a time, not a whole model's (benchmarks/README.md: a site's peak memory); the global variable is
    read from its file then, and the difference takes its place."""

    def __init__(self, local: Mapping[str, np.ndarray], base: GlobalModelFile, names: list[str]):
        self._local, self._base, self._names = local, base, names
        self._known = frozenset(names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return _difference(self._local[name], self._base[name])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _check_same(local: np.ndarray, base: TensorEntry) -> None:
    if local.shape != base.shape or local.dtype != base.dtype:
        raise ValueError(
            f"local variable {local.dtype}{list(local.shape)} does not match the global {base.dtype}{list(base.shape)}"
        )


def _difference(local: np.ndarray, base: np.ndarray) -> np.ndarray:
    """local - base, for arrays that passed _check_same; base (a fresh array read from disk) may be overwritten."""
    if is_float(local.dtype) and local.dtype != accumulator_dtype(local.dtype):
        # half precision: subtract in float32, round once
        return (local.astype(np.float32) - base.astype(np.float32)).astype(local.dtype)
    return np.subtract(local, base, out=base)

"""ClientModelManager: the site's view of the global model, its local model, updates and the best model."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedclient.components.model_reader_writer import ModelProcessor
from fedclient.components.model_validator import ModelValidator
from fedclient.global_model_file import GlobalModelFile, GlobalModelWriter
from fedcommon.algorithms import SCAFFOLD_CONTROL_PREFIX
from fedcommon.direct_io import aligned_empty, round_up
from fedcommon.dtypes import accumulator_dtype, is_float
from fedcommon.metrics import metric_score
from fedcommon.mmar import excluded
from fedcommon.model_file import TensorEntry, load_model, read_index, save_model
from fedcommon.model_meta import FLContext, FLContextKey
from fedcommon.tensor_codec import TensorSink, TensorSpec, fits

log = logging.getLogger(__name__)

# A download decodes a variable of at least this size into a block-aligned buffer of its own when the local model
# offers none: its global copy then goes to disk straight from it (direct I/O), without a bounce copy.
ALIGNED_MIN_BYTES = 256 * 1024
# An update's encode reads the global copy ahead (at most 2 variables, buffers of at most this many bytes in all).
READ_AHEAD_BYTES = 128 * 1024 * 1024
READ_AHEAD_VARIABLES = 2


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
        self._downloads: dict[str, GlobalModelDownload] = {}  # task -> its last download, until it is assigned
        # Tasks whose global copy a download replaced and did not complete: no update until a pull completes.
        self._incomplete: set[str] = set()
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

        A variable that was decoded straight into the local model (global_model_sink) counts as changed. The global
        copy a download wrote while it streamed (global_model_download) is taken when it holds exactly these arrays;
        this waits for its last writes.
        """
        fitter = self._require_fitter()
        changed = False
        for task, tensors in remote_models.items():
            kept = {k: v for k, v in tensors.items() if not excluded(k, self.exclude_vars)}
            download = self._downloads.pop(task, None)
            streamed = download.take(kept) if download is not None else None
            if streamed is None:
                self._keep_global(task, kept)
            else:
                self._global[task] = streamed
            self._incomplete.discard(task)
            self._meta[task] = dict((meta or {}).get(task, {}))
            changed |= self.model_reader_writer.apply_model(fitter, kept)
            for name in kept:
                self._lent.pop(name, None)
        return changed

    def _keep_global(self, task: str, tensors: Mapping[str, np.ndarray]) -> None:
        self._drop_global(task)  # before the new one is written: the disk holds one global model per task, not two
        try:
            self._global[task] = GlobalModelFile(tensors, self.global_model_dir)
        except OSError as e:
            raise self._disk_error(task, e) from e

    def _drop_global(self, task: str) -> None:
        old = self._global.pop(task, None)
        if old is not None:
            old.close()

    def _disk_error(self, task: str, e: OSError) -> OSError:
        return OSError(
            f"cannot keep task {task!r}'s global model on disk in "
            f"{self.global_model_dir or 'the temp folder'} (the update is computed from it): {e}"
        )

    def global_model_download(self, task_name: str) -> GlobalModelDownload:
        """A new download of the task's global model (an earlier one not yet assigned is dropped): where to decode
        each variable, and its global copy written to disk as each variable completes. End it with complete() or
        abort(); assign_current_model takes what it wrote."""
        earlier = self._downloads.pop(task_name, None)
        if earlier is not None:
            earlier.abort()
        download = GlobalModelDownload(self, task_name, self.global_model_sink(task_name))
        self._downloads[task_name] = download
        return download

    def _keeps_global(self, name: str) -> bool:
        """Whether variable `name` of a download goes into the task's global copy (pull_models splits off SCAFFOLD's
        control variate; excluded variables are not kept)."""
        return not name.startswith(SCAFFOLD_CONTROL_PREFIX) and not excluded(name, self.exclude_vars)

    def _start_global_copy(self, task: str) -> GlobalModelWriter:
        """The writer of a download's global copy; the task's old copy goes first (one per task on disk), and the
        update waits for a pull that completes."""
        self._drop_global(task)
        self._incomplete.add(task)
        try:
            return GlobalModelWriter(self.global_model_dir)
        except OSError as e:
            raise self._disk_error(task, e) from e

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
        """True when a download decoded into the local model, or replaced a task's global copy, and did not end in
        assign_current_model (it broke off or failed a check): the local model then mixes the old local and the new
        global model, or the global copy the update is computed from is incomplete; pull again."""
        return bool(self._lent or self._incomplete)

    def _require_whole(self, task_name: str) -> None:
        if self._lent:
            first = next(iter(self._lent))
            raise RuntimeError(
                f"the local model is incomplete: a download of task {self._lent[first]!r}'s global model wrote into "
                f"{len(self._lent)} variable(s) (e.g. {first!r}) and did not complete; pull the global model again"
            )
        if task_name in self._incomplete:
            raise RuntimeError(
                f"the global model of task {task_name!r} is incomplete: a download replaced it and did not complete; "
                f"pull the global model again"
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
        dict), against the global model read back from disk: keep the local model unchanged until it is sent. Its
        stream() reads ahead. Raises RuntimeError while local_model_partial.
        """
        self._require_whole(task_name)
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
        for download in list(self._downloads.values()):
            download.abort()
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


class GlobalModelDownload:
    """One download of a task's global model (ClientModelManager.global_model_download): `sink` offers each variable
    an array to be decoded into, and `on_tensor` hands each variable that arrived whole to the thread that writes the
    task's global copy, so the copy is on disk soon after the download ends."""

    def __init__(self, manager: ClientModelManager, task: str, local: TensorSink | None):
        self._manager, self._task, self._local = manager, task, local
        self._offered: set[str] = set()
        self._writer: GlobalModelWriter | None = None
        self._state = "open"  # then "complete" (all arrived and checked) or "over" (aborted or taken)

    def sink(self, spec: TensorSpec) -> np.ndarray | None:
        """The local model's array for the variable (global_model_sink), else, for a large one, a block-aligned
        buffer; None (a fresh buffer) for a name offered before: a stream that repeats a name is refused anyway."""
        if spec.name in self._offered:
            return None
        self._offered.add(spec.name)
        arr = self._local(spec) if self._local is not None else None
        if arr is None and spec.nbytes >= ALIGNED_MIN_BYTES:
            arr = aligned_empty(spec.nbytes).view(spec.dtype).reshape(spec.shape)
        return arr

    def on_tensor(self, name: str, arr: np.ndarray) -> None:
        """A variable that arrived whole and passed the decoder's checks: its global copy is written (kept unchanged
        until assign_current_model); OSError naming it when that fails."""
        if self._state != "open" or not self._manager._keeps_global(name):
            return
        if self._writer is None:
            self._writer = self._manager._start_global_copy(self._task)
        try:
            self._writer.add(name, arr)
        except OSError as e:
            raise self._manager._disk_error(self._task, e) from e

    def complete(self) -> None:
        """Every variable arrived and passed its checks; the writes may go on until assign_current_model."""
        if self._state == "open":
            self._state = "complete"
            if self._writer is not None:
                self._writer.close_input()

    def abort(self) -> None:
        """The download broke off or failed a check: stop writing and drop what was written (the task's update waits
        for a pull that completes)."""
        self._state = "over"
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self._manager._downloads.get(self._task) is self:
            del self._manager._downloads[self._task]

    def take(self, kept: Mapping[str, np.ndarray]) -> GlobalModelFile | None:
        """The global copy, once written, when the download completed and wrote exactly `kept` (the same arrays);
        None otherwise (it is dropped: the caller writes `kept` itself). OSError naming a variable whose write
        failed."""
        writer, complete = self._writer, self._state == "complete"
        self._state, self._writer = "over", None
        if writer is None:
            return None
        same = complete and set(writer) == set(kept) and all(writer.source(n) is a for n, a in kept.items())
        if not same:
            writer.abort()
            return None
        try:
            return writer.finish()
        except OSError as e:
            raise self._manager._disk_error(self._task, e) from e


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

    def stream(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, difference) in order, each valid only until the next is taken: a thread reads the next variables'
        global copies and subtracts (at most READ_AHEAD_VARIABLES ahead, READ_AHEAD_BYTES of buffers) while the
        caller sends the current one, and the buffers are reused."""
        return _ReadAhead(self._local, self._base, self._names).differences()


class _ReadAhead:
    """The thread behind _LazyDelta.stream(): differences computed ahead into a few reused, block-aligned buffers."""

    def __init__(self, local: Mapping[str, np.ndarray], base: GlobalModelFile, names: list[str]):
        self._local, self._base, self._names = local, base, names
        self._ready: queue.SimpleQueue[tuple[str, np.ndarray, np.ndarray | None] | BaseException] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._in_use = 0  # bytes of buffers in the caller's hands or read ahead
        self._ahead = 0  # differences computed and not yet taken
        self._free: list[np.ndarray] = []
        self._stop = False

    def differences(self) -> Iterator[tuple[str, np.ndarray]]:
        """The generator: its thread starts with the first item taken and ends when it ends or is closed (a transfer
        that broke off drops it)."""
        thread = threading.Thread(target=self._run, name="update-read-ahead", daemon=True)
        thread.start()
        lent: np.ndarray | None = None
        try:
            for _ in self._names:
                self._give_back(lent)  # the caller took the next one: it is done with the last
                lent = None
                item = self._ready.get()
                if isinstance(item, BaseException):
                    raise item
                name, diff, lent = item
                with self._room:
                    self._ahead -= 1
                    self._room.notify()
                yield name, diff
        finally:
            with self._room:
                self._stop = True
                self._room.notify()
            thread.join()

    def _give_back(self, buf: np.ndarray | None) -> None:
        if buf is not None:
            with self._room:
                self._in_use -= buf.nbytes
                self._free.append(buf)
                self._room.notify()

    def _buffer(self, nbytes: int) -> np.ndarray | None:
        """A free buffer of at least `nbytes` (else a new one) once the read-ahead has room; None when stopped."""
        need = round_up(nbytes)
        with self._room:
            while not self._stop:
                # By position, never by value: list.remove would compare arrays element by element.
                fitting = [i for i, b in enumerate(self._free) if b.nbytes >= need]
                if self._ahead >= READ_AHEAD_VARIABLES:
                    pass
                elif fitting:
                    buf = self._free.pop(min(fitting, key=lambda i: self._free[i].nbytes))
                    self._in_use += buf.nbytes
                    return buf
                # One variable at a time (what reading without read-ahead holds) always has room.
                elif self._in_use == 0 or self._in_use + need <= READ_AHEAD_BYTES:
                    self._free.clear()  # smaller ones give way: memory stays what the variables in flight need
                    self._in_use += need
                    break
                self._room.wait()
            else:
                return None
        return aligned_empty(need)

    def _run(self) -> None:
        try:
            for name in self._names:
                buf = self._buffer(self._base.entry(name).nbytes)
                if buf is None:
                    return
                try:
                    read = self._base.read_into(name, buf)
                except OSError as e:
                    raise OSError(f"reading the global copy of variable {name!r} for the update: {e}") from e
                diff = _difference(self._local[name], read)
                with self._room:
                    self._ahead += 1
                if diff is read:
                    self._ready.put((name, diff, buf))
                else:  # a half-precision difference is a new array: the buffer is free at once
                    self._give_back(buf)
                    self._ready.put((name, diff, None))
        except BaseException as e:  # the caller's stream raises it
            self._ready.put(e)


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

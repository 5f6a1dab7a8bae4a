"""Experiment tracking: a run's per-round global metrics and each site's training curve, written by the server as
TensorBoard event files in run_N/tensorboard/ (global/ and one folder per site) and, when the server's
local/tracking.json names a tracking URI, to MLflow (one MLflow run per fedlearn run, a nested run per site).

Everything is written on one background thread. A backend that fails is logged once and left off for the rest of
the run: tracking never breaks training. Neither torch nor TensorFlow is imported (the tensorboard package's own
event writer frames the records)."""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcommon.atomic import atomic_write_json
from fedcommon.bounded_json import JsonBoundsError, loads_object
from fedcommon.metrics import mean_metrics
from fedcommon.run_folder import make_folders

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # in the server's local/
TENSORBOARD_DIR = "tensorboard"  # in run_N/
GLOBAL_RUN = "global"
DEFAULT_EXPERIMENT = "fedlearn"
TRAIN_LOSS = "train/loss"
CURVES_FILE = "curve_steps.json"  # in run_N/tensorboard/
MLFLOW_RUN_FILE = "mlflow_run.json"  # in run_N/tensorboard/: the MLflow run this run logs to
GLOBAL_MODEL_PREFIX = "global_model/"  # a site's metrics of the global model it received
MAX_CONFIG_BYTES = 16 * 1024
MAX_QUEUE = 10_000
MAX_POINTS = 1000  # epoch points taken from one progress report
MAX_ROUND = 1 << 31
_SITE_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
_ENDED = ("completed", "aborted")


class TrackingConfigError(ValueError):
    """local/tracking.json cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class TrackingConfig:
    """What the server tracks: event files (on by default, when tensorboard is installed) and an MLflow URI."""

    tensorboard: bool = True
    mlflow_uri: str | None = None
    mlflow_experiment: str = DEFAULT_EXPERIMENT


def load_config(local: Path) -> TrackingConfig:
    """local/tracking.json, checked: {"tensorboard": bool, "mlflow": {"tracking_uri": str, "experiment": str}}."""
    path = local / TRACKING_FILE
    if not path.exists():
        return TrackingConfig()
    try:
        data = loads_object(path.read_bytes()[: MAX_CONFIG_BYTES + 1], str(path), MAX_CONFIG_BYTES)
    except (OSError, JsonBoundsError) as e:
        raise TrackingConfigError(f"{path}: {e}") from None
    unknown = sorted(set(data) - {"tensorboard", "mlflow"})
    if unknown:
        raise TrackingConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: tensorboard, mlflow)")
    tensorboard = data.get("tensorboard", True)
    if not isinstance(tensorboard, bool):
        raise TrackingConfigError(f"{path}: tensorboard must be true or false, got {tensorboard!r}")
    mlflow = data.get("mlflow")
    if mlflow is None:
        return TrackingConfig(tensorboard)
    if not isinstance(mlflow, dict) or set(mlflow) - {"tracking_uri", "experiment"}:
        raise TrackingConfigError(f'{path}: mlflow must be {{"tracking_uri": "...", "experiment": "..."}}')
    uri, experiment = mlflow.get("tracking_uri"), mlflow.get("experiment", DEFAULT_EXPERIMENT)
    if not isinstance(uri, str) or not 0 < len(uri) <= 2048:
        raise TrackingConfigError(f"{path}: mlflow.tracking_uri must be a URI (file:..., http://...), got {uri!r}")
    if not isinstance(experiment, str) or not 0 < len(experiment) <= 256:
        raise TrackingConfigError(f"{path}: mlflow.experiment must be a name, got {experiment!r}")
    return TrackingConfig(tensorboard, uri, experiment)


class ExperimentTracker:
    """Takes the server's run summaries and sites' progress reports (never blocking, never raising) and writes them
    on its own thread."""

    def __init__(self, config: TrackingConfig, workspace: Path) -> None:
        self.config = config
        self.workspace = workspace
        self._queue: queue.Queue[tuple | None] = queue.Queue(MAX_QUEUE)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._run: _RunTracking | None = None  # only the tracking thread touches it
        self._dropped = False
        self._closed = False

    @classmethod
    def for_server(cls, workspace: Path) -> ExperimentTracker:
        """The tracker the server's local/tracking.json asks for (TrackingConfigError when it is bad)."""
        return cls(load_config(workspace / "local"), workspace)

    def attach(self, run: Any) -> None:
        """Track `run` (a fedserver.run.FederatedRun) from now on: its summaries come to this tracker."""
        number, run_dir = run.run_number, Path(run.run_dir)
        # Rounds closed before now count as written (a resumed run); any closed later come with a later summary.
        self._put(("attach", number, run_dir, run.record.read() or {}))
        # The run's list of rounds grows on its own thread: hand over a copy of it.
        run.record.on_write = lambda s: self._put(
            ("summary", number, run_dir, {**s, "rounds": list(s.get("rounds") or [])})
        )

    def forget(self, run_number: int, timeout: float = 10.0) -> bool:
        """Stop tracking run `run_number` (it is being deleted): write what is queued, close its files, and track
        nothing that comes for it later. Waits until done, so its folder can go; False on timeout."""
        done = threading.Event()
        self._put(("forget", run_number, done))
        return done.wait(timeout)

    def site_result(self, site: str, topic: str, data: dict[str, Any]) -> None:
        """A site's progress report as the mailbox took it (other topics are ignored)."""
        if topic == "progress":
            self._put(("progress", site, data))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was handed in so far is written; False on timeout."""
        done = threading.Event()
        self._put(("flush", done))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, close the files and stop the thread; what comes later is not tracked."""
        with self._lock:
            thread, self._thread, self._closed = self._thread, None, True
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _put(self, item: tuple) -> None:
        with self._lock:
            if self._closed:
                if item[0] in ("flush", "forget"):
                    item[-1].set()
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="experiment-tracking", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if not self._dropped:
                self._dropped = True
                log.warning("experiment tracking falls behind: %d records queued; newer ones are dropped", MAX_QUEUE)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._handle(item)
            except Exception:  # a bug here must cost tracking, never the server
                log.exception("experiment tracking failed on %s", item[0])
        if self._run is not None:
            self._run.close()
            self._run = None

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "flush":
            if self._run is not None:
                self._run.flush()
            item[1].set()
        elif kind == "attach":
            _, number, run_dir, summary = item
            if self._run is not None:
                self._run.close()
            self._run = _RunTracking(self.config, self.workspace, number, run_dir, summary)
        elif kind == "forget":
            if self._run is not None and self._run.number == item[1]:
                self._run.close()
                self._run = None
            item[2].set()
        elif kind == "summary" and self._run is not None and item[1] == self._run.number:
            self._run.summary(item[3])
        elif kind == "progress" and self._run is not None:
            self._run.progress(item[1], item[2])


class _RunTracking:
    """One run's writers: event files per site and global, and its MLflow runs; used by the tracking thread only."""

    def __init__(self, config: TrackingConfig, workspace: Path, number: int, run_dir: Path, summary: dict) -> None:
        self.number = number
        self.folder = run_dir / TENSORBOARD_DIR
        # A resumed run: the rounds it had closed were written by the process before.
        self._rounds_done = {r.get("round") for r in summary.get("rounds") or [] if isinstance(r, dict)}
        self._finals_done: set[str] = set(summary.get("final_metrics") or {})
        self._final_mean_done = _final_mean_due(summary)
        # Per site: the next step of its curve and the last (round, epoch) written; kept across server restarts.
        self._curves = _read_curves(self.folder / CURVES_FILE)
        self._curves_changed = False
        self._ended = False
        self.tb = _TensorBoard.open(self.folder) if config.tensorboard else None
        self.mlflow = _MLflow.open(config, workspace, number, self.folder) if config.mlflow_uri else None

    def summary(self, summary: dict[str, Any]) -> None:
        """Write the rounds closed and final metrics reported since the last summary."""
        for record in summary.get("rounds") or []:
            if isinstance(record, dict) and record.get("round") not in self._rounds_done:
                self._rounds_done.add(record.get("round"))
                self._round(record)
        end_step = _whole(summary.get("start_round"), 0) + _whole(summary.get("num_rounds"), 0)
        finals = summary.get("final_metrics") or {}
        for site in sorted(set(filter(_site_ok, finals)) - self._finals_done):
            self._finals_done.add(site)
            self._scalars(site, end_step, _prefixed(finals[site]))
        if not self._final_mean_done and _final_mean_due(summary):
            self._final_mean_done = True
            self._scalars(GLOBAL_RUN, end_step, mean_metrics(finals))
        if summary.get("status") in _ENDED and not self._ended:
            self._ended = True
            if self.mlflow is not None:
                self.mlflow.ended(summary["status"])
        self.flush()

    def _round(self, record: dict[str, Any]) -> None:
        step = _whole(record.get("round"), 0)
        per_site = {s: m for s, m in (record.get("metrics") or {}).items() if _site_ok(s) and isinstance(m, dict)}
        shown = dict(mean_metrics(per_site))
        shown["contributors"] = float(len(record.get("contributors") or []))
        if isinstance(record.get("duration_s"), (int, float)):
            shown["round_duration_s"] = float(record["duration_s"])
        self._scalars(GLOBAL_RUN, step, shown)
        for site, metrics in sorted(per_site.items()):
            self._scalars(site, step, _prefixed(metrics))

    def progress(self, site: str, data: dict[str, Any]) -> None:
        """A site's training curve: each epoch point [round, epoch, loss] of the report not seen before, in order."""
        if data.get("run_number") != self.number or not _site_ok(site):
            return
        # Only the points themselves: a report's own round/epoch/loss mix a new round with the last epoch's loss.
        points = data.get("epochs")
        if not isinstance(points, list):
            return
        for point in points[:MAX_POINTS]:
            if not (isinstance(point, list) and len(point) == 3):
                continue
            rnd, epoch, loss = point
            if not (_is_whole(rnd) and _is_whole(epoch) and _is_number(loss)):
                continue
            step, last_round, last_epoch = self._curves.get(site, (0, -1, -1))
            if (rnd, epoch) <= (last_round, last_epoch):
                continue
            self._curves[site] = (step + 1, rnd, epoch)
            self._curves_changed = True
            self._scalars(site, step, {TRAIN_LOSS: float(loss)})
        self.flush()

    def _scalars(self, who: str, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(k, str) and _is_number(v)}
        if not values:
            return
        if self.tb is not None and not self.tb.write(who, step, values):
            self.tb = None
        if self.mlflow is not None and not self.mlflow.write(who, step, values):
            self.mlflow = None

    def flush(self) -> None:
        if self.tb is not None and not self.tb.flush():
            self.tb = None
        if self._curves_changed:
            self._curves_changed = False
            try:
                make_folders(self.folder, 0o700)
                atomic_write_json(self.folder / CURVES_FILE, {k: list(v) for k, v in sorted(self._curves.items())})
            except OSError as e:
                log.debug("cannot keep the curves' steps in %s: %s", self.folder, e)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self.tb = self.mlflow = None


class _TensorBoard:
    """Event files, one folder (one TensorBoard run) per site and one for the global model."""

    def __init__(self, folder: Path, event_writer: Callable[..., Any], event: Any, summary: Any) -> None:
        self.folder = folder
        self._make_writer, self._event, self._summary = event_writer, event, summary
        self._writers: dict[str, Any] = {}

    @classmethod
    def open(cls, folder: Path) -> _TensorBoard | None:
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            log.info("no TensorBoard event files: the tensorboard package is not installed (fedlearn[tracking])")
            return None
        return cls(folder, EventFileWriter, Event, Summary)

    def write(self, who: str, step: int, values: dict[str, float]) -> bool:
        try:
            writer = self._writers.get(who)
            if writer is None:
                path = self.folder / who
                make_folders(path, 0o700)
                writer = self._writers[who] = self._make_writer(str(path))
            summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()])
            writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))
            return True
        except Exception as e:
            self._failed(e)
            return False

    def flush(self) -> bool:
        try:
            for writer in self._writers.values():
                writer.flush()
            return True
        except Exception as e:
            self._failed(e)
            return False

    def _failed(self, e: Exception) -> None:
        log.warning("TensorBoard event files in %s cannot be written (%s); none more for this run", self.folder, e)
        self.close()

    def close(self) -> None:
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception as e:
                log.debug("closing an event file: %s", e)
        self._writers.clear()


class _MLflow:
    """One MLflow run per fedlearn run (global metrics), a nested run per site; found again when the run resumes."""

    def __init__(self, client: Any, metric: Callable[..., Any], parent: str, experiment: str, key: str) -> None:
        self.client, self._metric, self.parent, self.experiment, self.key = client, metric, parent, experiment, key
        self._children: dict[str, str] = {}

    @classmethod
    def open(cls, config: TrackingConfig, workspace: Path, number: int, folder: Path) -> _MLflow | None:
        uri = config.mlflow_uri
        try:
            if uri.startswith("file:"):
                # MLflow 3 keeps its file store only on request; naming a file: URI in tracking.json is that request.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError:
            log.warning("%s names an MLflow URI but mlflow is not installed (fedlearn[tracking])", TRACKING_FILE)
            return None
        key = f"{workspace.resolve()}#run_{number}"
        kept = folder / MLFLOW_RUN_FILE  # goes with the run's folder: a run deleted and made again starts afresh
        try:
            client = MlflowClient(tracking_uri=uri)
            parent = _kept_run(client, kept, uri)
            if parent is not None:
                experiment = parent.info.experiment_id
                found = f"tags.`mlflow.parentRunId` = '{_quoted(parent.info.run_id)}'"
                children = {
                    r.data.tags["fedlearn.site"]: r.info.run_id
                    for r in client.search_runs([experiment], filter_string=found)
                    if "fedlearn.site" in r.data.tags
                }
                parent_id = parent.info.run_id
            else:
                named = client.get_experiment_by_name(config.mlflow_experiment)
                experiment = named.experiment_id if named else client.create_experiment(config.mlflow_experiment)
                tags = {"fedlearn.run": key, "fedlearn.run_number": str(number)}
                parent_id = client.create_run(experiment, tags=tags, run_name=f"run {number}").info.run_id
                make_folders(folder, 0o700)
                atomic_write_json(kept, {"tracking_uri": uri, "run_id": parent_id})
                children = {}
            tracker = cls(client, Metric, parent_id, experiment, key)
            tracker._children.update(children)
            return tracker
        except Exception as e:
            log.warning("MLflow tracking at %s is off for run %d: %s", uri, number, e)
            return None

    def write(self, who: str, step: int, values: dict[str, float]) -> bool:
        try:
            run_id = self.parent if who == GLOBAL_RUN else self._child(who)
            now = int(time.time() * 1000)
            metrics = [self._metric(_MLFLOW_KEY.sub("_", k)[:250], v, now, step) for k, v in values.items()]
            self.client.log_batch(run_id, metrics=metrics)
            return True
        except Exception as e:
            log.warning("MLflow tracking stops for this run: %s", e)
            return False

    def _child(self, site: str) -> str:
        if site not in self._children:
            tags = {"mlflow.parentRunId": self.parent, "fedlearn.run": self.key, "fedlearn.site": site}
            self._children[site] = self.client.create_run(self.experiment, tags=tags, run_name=site).info.run_id
        return self._children[site]

    def ended(self, status: str) -> None:
        final = "FINISHED" if status == "completed" else "KILLED"
        try:
            for run_id in [*self._children.values(), self.parent]:
                self.client.set_terminated(run_id, final)
        except Exception as e:
            log.warning("MLflow: cannot mark run %s %s: %s", self.key, final, e)


def _kept_run(client: Any, path: Path, uri: str) -> Any:
    """The MLflow run MLFLOW_RUN_FILE names for this URI, if it is still there and not deleted; else None."""
    try:
        kept = loads_object(path.read_bytes()[:MAX_CONFIG_BYTES], str(path), MAX_CONFIG_BYTES)
    except (OSError, JsonBoundsError):
        return None
    if kept.get("tracking_uri") != uri or not isinstance(kept.get("run_id"), str):
        return None
    try:
        run = client.get_run(kept["run_id"])
    except Exception:  # gone from the store, or the store moved
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _final_mean_due(summary: dict[str, Any]) -> bool:
    """Whether every site of the last round has reported its metrics of the final model."""
    finals = summary.get("final_metrics") or {}
    last = next((r for r in reversed(summary.get("rounds") or []) if isinstance(r, dict)), {})
    return bool(finals) and set(last.get("contributors") or []) <= set(finals)


def _read_curves(path: Path) -> dict[str, tuple[int, int, int]]:
    """CURVES_FILE as {site: (next step, last round, last epoch)}; empty when missing or not as written."""
    try:
        data = loads_object(path.read_bytes()[: MAX_CONFIG_BYTES * 64 + 1], str(path), MAX_CONFIG_BYTES * 64)
    except (OSError, JsonBoundsError):
        return {}
    return {
        site: (v[0], v[1], v[2])
        for site, v in data.items()
        if _site_ok(site)
        and isinstance(v, list)
        and len(v) == 3
        and _is_whole(v[0])
        and all(isinstance(x, int) and not isinstance(x, bool) and -1 <= x < MAX_ROUND for x in v[1:])
    }


def _site_ok(site: Any) -> bool:
    """Whether a site's name can be its folder (names come from certificates; a name that would not is skipped)."""
    return isinstance(site, str) and site != GLOBAL_RUN and _SITE_FOLDER.match(site) is not None


def _prefixed(metrics: Any) -> dict[str, float]:
    return {GLOBAL_MODEL_PREFIX + k: v for k, v in metrics.items()} if isinstance(metrics, dict) else {}


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_ROUND


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any, default: int) -> int:
    return value if _is_whole(value) else default

"""Experiment tracking at the server: event files read back with TensorBoard's reader, the MLflow file store with
MLflow's client; bad configuration named, failing backends never raising."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, python_env

# The `tracking` extra, which `make test` installs: a missing one fails these tests, it does not skip them.
from tensorboard.backend.event_processing import event_accumulator

from fedserver.run_record import RunRecord
from fedserver.tracking import ExperimentTracker, TrackingConfig, TrackingConfigError, load_config


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files in one TensorBoard run folder."""
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_client(uri: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


class _Run:
    """What the tracker reads of a fedserver.run.FederatedRun: its number, folder and record."""

    def __init__(self, run_dir: Path, number: int = 1) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_number, self.run_dir, self.record = number, run_dir, RunRecord(run_dir, number)


def _round(number: int, metrics: dict[str, dict[str, float]]) -> dict:
    return {"round": number, "contributors": sorted(metrics), "metrics": metrics, "duration_s": 1.5}


def _summary(rounds: list[dict], status: str = "training", finals: dict | None = None) -> dict:
    return {"run_number": 1, "status": status, "start_round": 0, "num_rounds": 2, "rounds": rounds,
            "final_metrics": finals or {}}  # fmt: skip


def _train(tracker: ExperimentTracker, site: str, *points: list) -> None:
    tracker.site_result(
        site, "progress", {"run_number": 1, "round": points[-1][0], "epochs": [list(p) for p in points]}
    )


def test_rounds_curves_and_final_metrics_reach_tensorboard_and_one_mlflow_run_with_a_nested_run_per_site(
    tmp_path, monkeypatch
):
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow_client(uri, monkeypatch)
    run = _Run(tmp_path / "ws" / "run_1")
    tracker = ExperimentTracker(TrackingConfig(mlflow_uri=uri), tmp_path / "ws")
    try:
        tracker.attach(run)
        _train(tracker, "site-1", (0, 1, 2.0), (0, 2, 1.5))
        _train(tracker, "site-1", (0, 2, 1.5), (1, 1, 1.0))  # a point sent twice is written once
        _train(tracker, "site-2", (0, 1, 3.0))
        tracker.site_result("site-2", "progress", {"run_number": 7, "epochs": [[0, 2, 9.0]]})  # another run's
        tracker.site_result("site-2", "progress", {"run_number": 1, "epochs": [[0, 3, float("nan")], "junk"]})
        first = _round(0, {"site-1": {"accuracy": 0.5}, "site-2": {"accuracy": 0.7}})
        run.record.write(_summary([first]), {})
        second = _round(1, {"site-1": {"accuracy": 0.8}, "site-2": {"accuracy": 0.9}})
        run.record.write(_summary([first, second], "completed"), {})
        finals = {"site-1": {"accuracy": 0.9}, "site-2": {"accuracy": 1.0}}
        run.record.write(_summary([first, second], "completed", finals), {})
        assert tracker.flush()
    finally:
        tracker.close()

    board = run.run_dir / "tensorboard"
    assert sorted(p.name for p in board.iterdir() if p.is_dir()) == ["global", "site-1", "site-2"]
    glob = scalars(board / "global")
    assert glob["accuracy"] == [(0, 0.6), (1, 0.85), (2, 0.95)]  # the mean per round, then of the final model
    assert glob["contributors"] == [(0, 2.0), (1, 2.0)]
    site1 = scalars(board / "site-1")
    assert site1["train/loss"] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert site1["global_model/accuracy"] == [(0, 0.5), (1, 0.8), (2, 0.9)]
    assert scalars(board / "site-2")["train/loss"] == [(0, 3.0)]

    experiment = client.get_experiment_by_name("fedlearn")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["fedlearn.run_number"] == "1"
    parent = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    history = client.get_metric_history(parent, "accuracy")
    assert sorted((m.step, round(m.value, 5)) for m in history) == [(0, 0.6), (1, 0.85), (2, 0.95)]
    children = {r.data.tags["fedlearn.site"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(children) == ["site-1", "site-2"]
    curve = client.get_metric_history(children["site-1"].info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [(0, 2.0), (1, 1.5), (2, 1.0)]


def test_a_resumed_run_goes_on_in_its_mlflow_run_and_curves_without_writing_anything_twice_a_new_one_does_not(
    tmp_path, monkeypatch
):
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow_client(uri, monkeypatch)
    run = _Run(tmp_path / "ws" / "run_1")
    first = _round(0, {"site-1": {"accuracy": 0.5}})
    second = [first, _round(1, {"site-1": {"accuracy": 0.6}})]
    for rounds, points in (([first], [(0, 1, 2.0), (0, 2, 1.5)]), (second, [(0, 2, 1.5), (1, 1, 1.0)])):
        tracker = ExperimentTracker(TrackingConfig(mlflow_uri=uri), tmp_path / "ws")  # a server process each
        try:
            tracker.attach(run)
            _train(tracker, "site-1", *points)
            run.record.write(_summary(rounds), {})
            assert tracker.flush()
        finally:
            tracker.close()
    assert scalars(run.run_dir / "tensorboard" / "site-1")["train/loss"] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    runs = client.search_runs([client.get_experiment_by_name("fedlearn").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "accuracy")] == [0, 1]

    shutil.rmtree(run.run_dir)  # delete-run, then a new run 1
    run = _Run(tmp_path / "ws" / "run_1")
    tracker = ExperimentTracker(TrackingConfig(mlflow_uri=uri), tmp_path / "ws")
    try:
        tracker.attach(run)
        run.record.write(_summary([first]), {})
        assert tracker.flush()
    finally:
        tracker.close()
    runs = client.search_runs([client.get_experiment_by_name("fedlearn").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 2


def test_an_unusable_mlflow_uri_is_logged_once_and_the_event_files_are_still_written(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    run = _Run(tmp_path / "ws" / "run_1")
    tracker = ExperimentTracker(TrackingConfig(mlflow_uri=(blocker / "mlruns").as_uri()), tmp_path / "ws")
    with caplog.at_level(logging.WARNING, logger="fedserver.tracking"):
        try:
            tracker.attach(run)
            for n in range(3):
                run.record.write(_summary([_round(r, {"site-1": {"accuracy": 0.1 * r}}) for r in range(n + 1)]), {})
            assert tracker.flush()
        finally:
            tracker.close()
    assert len([r for r in caplog.records if "MLflow" in r.getMessage()]) == 1
    assert scalars(run.run_dir / "tensorboard" / "global")["accuracy"] == [(0, 0.0), (1, 0.1), (2, 0.2)]


def test_a_deleted_run_is_forgotten_and_its_late_reports_never_bring_its_folder_back(tmp_path):
    run = _Run(tmp_path / "ws" / "run_1")
    tracker = ExperimentTracker(TrackingConfig(), tmp_path / "ws")
    try:
        tracker.attach(run)
        _train(tracker, "site-1", (0, 1, 2.0))
        assert tracker.forget(1)  # returns once what was queued is written and the files are closed
        assert scalars(run.run_dir / "tensorboard" / "site-1")["train/loss"] == [(0, 2.0)]
        shutil.rmtree(run.run_dir)
        _train(tracker, "site-1", (0, 2, 1.5))  # a site that still reports
        _train(tracker, "site-2", (0, 1, 3.0))
        assert tracker.flush()
        assert not run.run_dir.exists()
        run.run_dir.mkdir()  # deployed afresh: the deleted run's reports are not its
        _train(tracker, "site-1", (0, 3, 1.0))
        assert tracker.flush()
        assert list(run.run_dir.iterdir()) == []
    finally:
        tracker.close()


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"tensorbord": true}', "unknown key.*tensorbord"),
        ('{"tensorboard": "yes"}', "tensorboard must be true or false"),
        ('{"mlflow": {"tracking_uri": ""}}', "mlflow.tracking_uri must be a URI"),
        ('{"mlflow": {"uri": "file:/x"}}', "mlflow must be"),
        ("[1, 2]", "tracking.json"),
    ],
)
def test_a_bad_tracking_json_is_refused_naming_the_file_and_the_key(tmp_path, content, match):
    (tmp_path / "tracking.json").write_text(content)
    with pytest.raises(TrackingConfigError, match=match) as info:
        load_config(tmp_path)
    assert str(tmp_path / "tracking.json") in str(info.value)


def test_tracking_json_names_the_mlflow_uri_and_can_turn_event_files_off(tmp_path):
    assert load_config(tmp_path) == TrackingConfig()
    config = {"tensorboard": False, "mlflow": {"tracking_uri": "http://mlflow:5000", "experiment": "digits"}}
    (tmp_path / "tracking.json").write_text(json.dumps(config))
    assert load_config(tmp_path) == TrackingConfig(False, "http://mlflow:5000", "digits")


_TRACK_WITHOUT_TORCH = """
import sys
from pathlib import Path
from fedserver.run_record import RunRecord
from fedserver.tracking import ExperimentTracker, TrackingConfig

class Run:
    run_number, run_dir = 1, Path(sys.argv[1]) / "run_1"
    run_dir.mkdir(parents=True)
    record = RunRecord(run_dir, 1)

tracker = ExperimentTracker(TrackingConfig(mlflow_uri=(Path(sys.argv[1]) / "mlruns").as_uri()), Path(sys.argv[1]))
tracker.attach(Run)
tracker.site_result("site-1", "progress", {"run_number": 1, "epochs": [[0, 1, 0.5]]})
Run.record.write({"rounds": [{"round": 0, "contributors": ["site-1"], "metrics": {"site-1": {"loss": 1.0}}}]}, {})
assert tracker.flush()
tracker.close()
print(sorted(m for m in ("torch", "tensorflow") if m in sys.modules))
"""


def test_the_server_tracks_without_importing_torch_or_tensorflow(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _TRACK_WITHOUT_TORCH, str(tmp_path)],
        env=python_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", done.stdout
    assert scalars(tmp_path / "run_1" / "tensorboard" / "site-1")["train/loss"] == [(0, 0.5)]

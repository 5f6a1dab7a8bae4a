"""One real POC run under the operator's settings: the server's tracking (TensorBoard event files and an MLflow file
store, read back with their own readers) and every role's logs at debug as JSON lines, or as local/logging.json
says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_mmar, prepare_workspace, run_fedadmin

pytestmark = pytest.mark.e2e

JSON_LOGS = {"FEDLEARN_LOG_LEVEL": "debug", "FEDLEARN_LOG_FORMAT": "json"}
# site-2's own choice: a dictConfig writing text records to a file of its own (relative to its workspace).
SITE_LOGGING = {
    "version": 1,
    "formatters": {"bars": {"format": "%(levelname)s|%(name)s|%(message)s"}},
    "handlers": {"mine": {"class": "logging.FileHandler", "filename": "logs/mine.log", "formatter": "bars"}},
    "root": {"level": "INFO", "handlers": ["mine"]},
}


def json_records(path: Path, only_json: bool = True) -> list[dict]:
    """The lines of a log file as JSON objects: every line (a line that is not one fails the test), or with
    only_json=False those that open like one (a worker's log also holds what its agent notes, and prints)."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and (only_json or line.startswith("{"))]
    assert lines, f"{path} holds no records"
    return [json.loads(line) for line in lines]


def test_a_poc_run_is_tracked_and_each_role_logs_as_the_operator_configured(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = prepare_workspace(tmp_path / "ws", clients=2)
    mmar = copy_mmar(tmp_path / "mmar", server={"num_rounds": 2}, train_args={"epochs_per_round": 2})
    uri = (tmp_path / "mlruns").as_uri()
    for name in ("server", "site-2"):
        (ws / name / "local").mkdir(exist_ok=True)
    (ws / "server" / "local" / "tracking.json").write_text(json.dumps({"mlflow": {"tracking_uri": uri}}))
    (ws / "site-2" / "local" / "logging.json").write_text(json.dumps(SITE_LOGGING))

    def fedadmin(*args: str):
        result = run_fedadmin(*args, kit=ws / "admin", env=JSON_LOGS)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    started = run_fedadmin("poc", "start", "--workspace", str(ws), env=JSON_LOGS)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        fedadmin("set-run", "1")
        fedadmin("deploy", str(mmar), "all")
        fedadmin("start", "all")
        waited = fedadmin("wait", "--timeout", "180")
        info = json.loads(fedadmin("--json", "logs", "server", "--level", "info", "--lines", "500").stdout)
    finally:
        stopped = run_fedadmin("poc", "stop", "--workspace", str(ws))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    # Tracking: rounds 0 and 1 and the final model (step 2) globally; each site's epochs, two a round.
    board = ws / "server" / "run_1" / "tensorboard"
    assert sorted(p.name for p in board.iterdir() if p.is_dir()) == ["global", "site-1", "site-2"]
    glob = EventAccumulator(str(board / "global"))
    glob.Reload()
    assert [e.step for e in glob.Scalars("accuracy")] == [0, 1, 2]
    assert all(0.0 <= e.value <= 1.0 for e in glob.Scalars("accuracy"))
    for site in ("site-1", "site-2"):
        acc = EventAccumulator(str(board / site))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3], site
        assert [e.step for e in acc.Scalars("global_model/accuracy")] == [0, 1, 2], site
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedlearn").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "accuracy")] == [0, 1, 2]
    sites = {r.data.tags["fedlearn.site"]: r.info.run_id for r in runs if "fedlearn.site" in r.data.tags}
    assert sorted(sites) == ["site-1", "site-2"]
    assert len(client.get_metric_history(sites["site-2"], "train/loss")) == 4

    # Logs: the server, site-1's agent and its worker, and the console, at debug, one JSON object a line.
    for path, role in (
        (ws / "server" / "log.txt", "server"),
        (ws / "site-1" / "log.txt", "site"),
        (ws / "site-1" / "run_1" / "logs" / "worker.log", "worker"),
    ):
        records = [r for r in json_records(path, role != "worker") if r.get("role") == role]
        assert {"ts", "level", "logger", "message", "role"} <= set(records[0]), path
        assert any(r["level"] == "DEBUG" for r in records), path
    console = [json.loads(line) for line in waited.stderr.splitlines() if line.startswith("{")]
    assert any(r["level"] == "DEBUG" and r["role"] == "admin" for r in console), waited.stderr
    # site-2's agent wrote where and as its logging.json says (the variable still sets the level), not log.txt.
    mine = (ws / "site-2" / "logs" / "mine.log").read_text().splitlines()
    assert any(line.startswith("DEBUG|") for line in mine) and any(line.startswith("INFO|") for line in mine)
    assert not (ws / "site-2" / "log.txt").exists()
    # `fedadmin logs --level` reads the level of a JSON-lines record.
    levels = {json.loads(line)["level"] for line in info["lines"]}
    assert "INFO" in levels and "DEBUG" not in levels, info

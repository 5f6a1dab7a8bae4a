"""fedserver.run_record: a run's summary on the server: loading it, writing it, its status and the metrics answer."""

from __future__ import annotations

import json

import pytest

from fedserver.run_record import (
    RecordMissing,
    RunRecord,
    RunRecordError,
    last_recorded_metrics,
    metrics_answer,
)

ROUND0 = {
    "round": 0,
    "contributors": ["site-1", "site-2"],
    "weights": {"site-1": 1.0, "site-2": 3.0},
    "metrics": {"site-1": {"accuracy": 0.5}, "site-2": {"accuracy": 0.7, "note": "text"}},
    "privacy": {},
    "rejected": [{"site": "site-3", "reason": "stale"}],
    "dropped": [],
    "duration_s": 1.5,
}
SUMMARY = {
    "run_number": 1,
    "status": "completed",
    "rounds": [ROUND0],
    "final_metrics": {"site-1": {"accuracy": 0.8}, "site-2": {"accuracy": 0.9}},
    "best_global": {"round": 0, "score": 0.6},
}


@pytest.fixture
def record(tmp_path):
    (tmp_path / "run_1").mkdir()
    return RunRecord.of(tmp_path, 1)


def test_write_then_load_gives_back_the_summary_and_writes_the_state(record):
    record.write(SUMMARY, {"run_number": 1, "status": "completed", "next_round": 1})
    assert record.load() == SUMMARY == record.read()
    assert json.loads(record.folder.state.read_text())["next_round"] == 1
    assert record.folder.summary.name == "summary.json"


def test_a_missing_summary_is_told_apart_from_an_unreadable_one(record):
    with pytest.raises(RecordMissing, match="^run 1 has no summary.json$"):
        record.load()
    assert record.read() is None
    record.folder.summary.write_text("{torn")
    with pytest.raises(RunRecordError, match="summary.json cannot be read") as raised:
        record.load()
    assert not isinstance(raised.value, RecordMissing)
    record.folder.summary.write_text("[1, 2]")
    with pytest.raises(RunRecordError, match="is not a run summary"):
        record.load()
    assert record.read() is None


@pytest.mark.parametrize(
    ("recorded", "deployed", "status"),
    [
        (None, False, "none"),
        (None, True, "deployed"),
        ("completed", True, "completed"),
        ("aborted", True, "aborted"),
        ("training", True, "aborted"),  # it was training when an earlier server process stopped
    ],
)
def test_status_of_a_run_no_live_run_holds(record, recorded, deployed, status):
    if deployed:
        record.folder.mmar.mkdir(parents=True)
    if recorded is not None:
        record.write({**SUMMARY, "status": recorded}, {})
    assert record.status() == status
    assert record.was_training() is (recorded == "training")


def test_status_uses_a_summary_the_caller_has_read_already(record):
    assert record.status({"status": "completed"}) == "completed"
    assert record.status(None) == "none"


def test_the_metrics_answer_gives_each_round_its_facts_site_metrics_and_mean(record):
    answer = metrics_answer(1, "completed", SUMMARY)
    (r,) = answer["rounds"]
    assert r["round"] == 0 and r["contributors"] == ["site-1", "site-2"] and r["duration_s"] == 1.5
    assert r["weights"] == {"site-1": 1.0, "site-2": 3.0} and r["rejected"] == [{"site": "site-3", "reason": "stale"}]
    assert r["sites"] == {"site-1": {"accuracy": 0.5}, "site-2": {"accuracy": 0.7}}  # numbers only
    assert r["mean"]["accuracy"] == pytest.approx(0.6)
    assert answer["final"]["mean"]["accuracy"] == pytest.approx(0.85)
    assert (answer["run_number"], answer["run_status"], answer["best_global"]) == (
        1,
        "completed",
        SUMMARY["best_global"],
    )


def test_the_metrics_answer_skips_records_that_are_not_rounds():
    answer = metrics_answer(1, "training", {"rounds": ["x", {"round": "1"}, {"round": 2}], "final_metrics": None})
    assert [r["round"] for r in answer["rounds"]] == [2] and answer["final"] is None


def test_last_recorded_metrics_prefers_the_final_model_then_the_newest_scored_round():
    assert last_recorded_metrics(SUMMARY) == {"round": "final", "mean": {"accuracy": pytest.approx(0.85)}}
    unfinished = {"rounds": [ROUND0, {"round": 1, "metrics": {}}]}
    assert last_recorded_metrics(unfinished) == {"round": 0, "mean": {"accuracy": pytest.approx(0.6)}}
    assert last_recorded_metrics({"rounds": []}) is None

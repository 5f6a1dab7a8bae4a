"""FederatedRun driven directly: when rounds close, what they aggregate, what they persist, and the long-poll."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedcommon.mmar import ServerConfig
from fedcommon.model_file import load_model, save_model
from fedcommon.tensor_codec import TensorSpec
from fedserver.aggregator import ContributionError
from fedserver.run import GLOBAL_MODEL, FederatedRun, Phase, RunStateError

W0 = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
    "b": np.array([1.0, -1.0, 0.5], np.float32),
    "steps": np.array(10, np.int64),
}
ONES = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32), "steps": np.array(4, np.int64)}


def _config(**changes) -> ServerConfig:
    base = ServerConfig(
        task_name="t",
        min_num_clients=2,
        max_num_clients=8,
        wait_after_min_clients=30.0,
        start_round=0,
        num_rounds=2,
        heart_beat_timeout=30.0,
        exclude_vars=(),
        aggregation_weights={},
        initial_model=None,
        initial_model_file=None,
    )
    return dataclasses.replace(base, **changes)


def _run(tmp_path: Path, **changes) -> FederatedRun:
    run_dir = tmp_path / "run_1"
    (run_dir / "models").mkdir(parents=True, exist_ok=True)  # as deploying makes it
    save_model(run_dir / "models" / GLOBAL_MODEL, W0)
    return FederatedRun(1, run_dir, _config(**changes))


def _scaled(k: float) -> dict[str, np.ndarray]:
    return {
        "w": ONES["w"] * np.float32(k),
        "b": ONES["b"] * np.float32(k),
        "steps": np.array(ONES["steps"] * int(k), np.int64),
    }


def _contribute(
    run: FederatedRun,
    site: str,
    update: dict[str, np.ndarray],
    active: set[str],
    weight: float = 1.0,
    metrics: dict | None = None,
    privacy: tuple[str, float] = ("", 0.0),
) -> None:
    """What the training service does for one accepted upload (the run consumes the arrays: pass copies)."""
    r = run.current_round
    run.begin_contribution(site, r)
    run.commit_contribution(
        site,
        r,
        {k: np.array(v, copy=True) for k, v in update.items()},
        weight,
        metrics or {},
        lambda: set(active),
        *privacy,
    )


def _model(run: FederatedRun) -> dict[str, np.ndarray]:
    return load_model(run.model_path)[0]


def _summary(run: FederatedRun) -> dict:
    return json.loads(run.summary_path.read_text())


def _state(run: FederatedRun) -> dict:
    return json.loads(run.state_path.read_text())


def _offer(run: FederatedRun, site: str, wait: float) -> tuple[str, int]:
    offer = run.offer(site, wait)
    if offer.model is not None:
        offer.model.close()
    return offer.phase, offer.round


ACTIVE2 = {"site-1", "site-2"}
ACTIVE3 = {"site-1", "site-2", "site-3"}


def test_round_closes_as_soon_as_every_active_site_contributed(tmp_path):
    run = _run(tmp_path)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    assert run.current_round == 0
    _contribute(run, "site-2", _scaled(3), ACTIVE2)
    assert run.current_round == 1
    model = _model(run)
    np.testing.assert_array_equal(model["w"], W0["w"] + 2)
    np.testing.assert_array_equal(model["b"], W0["b"] + 2)
    assert model["steps"].dtype == np.int64 and int(model["steps"]) == 10 + 8


def test_weights_n_scale_each_contribution(tmp_path):
    run = _run(tmp_path)
    _contribute(run, "site-1", _scaled(1), ACTIVE2, weight=1.0)
    _contribute(run, "site-2", _scaled(3), ACTIVE2, weight=3.0)
    np.testing.assert_array_equal(_model(run)["w"], W0["w"] + (1 * 1 + 3 * 3) / 4)


def test_round_stays_open_below_min_even_after_the_wait(tmp_path):
    run = _run(tmp_path, min_num_clients=2, wait_after_min_clients=0.05)
    _contribute(run, "site-1", _scaled(1), {"site-1"})
    time.sleep(0.1)
    run.tick({"site-1"})
    assert run.current_round == 0
    assert _summary(run)["rounds"] == []


def test_with_min_reached_and_an_active_site_missing_tick_closes_after_the_wait(tmp_path):
    # A wait far longer than two contributions take, even with their fsyncs on a loaded machine.
    wait = 3.0
    run = _run(tmp_path, min_num_clients=2, wait_after_min_clients=wait)
    _contribute(run, "site-1", _scaled(1), ACTIVE3)
    before_min = time.monotonic()
    _contribute(run, "site-2", _scaled(3), ACTIVE3)
    assert run.current_round == 0, "site-3 is active: the round waits for it"
    run.tick(ACTIVE3)
    assert run.current_round == 0, "the wait has not run out yet"
    deadline = time.monotonic() + 60
    while run.current_round == 0:
        assert time.monotonic() < deadline, "the round never closed after the wait"
        time.sleep(0.05)
        run.tick(ACTIVE3)
    assert time.monotonic() - before_min >= wait, "the round closed before the wait ran out"
    assert run.current_round == 1
    assert _summary(run)["rounds"][0]["contributors"] == ["site-1", "site-2"]
    np.testing.assert_array_equal(_model(run)["w"], W0["w"] + 2)


def test_round_closes_at_max_num_clients_without_waiting(tmp_path):
    run = _run(tmp_path, min_num_clients=1, max_num_clients=2, wait_after_min_clients=30)
    active = {"site-1", "site-2", "site-3", "site-4"}
    _contribute(run, "site-1", _scaled(1), active)
    assert run.current_round == 0
    _contribute(run, "site-2", _scaled(3), active)
    assert run.current_round == 1
    assert _summary(run)["rounds"][0]["contributors"] == ["site-1", "site-2"]


def test_dropped_site_no_longer_holds_the_round(tmp_path):
    run = _run(tmp_path)
    _contribute(run, "site-1", _scaled(1), ACTIVE3)
    _contribute(run, "site-2", _scaled(3), ACTIVE3)
    run.tick(ACTIVE3)
    assert run.current_round == 0
    run.tick(ACTIVE2, ["site-3"])  # site-3 missed its heartbeats and left the registry
    assert run.current_round == 1
    record = _summary(run)["rounds"][0]
    assert record["contributors"] == ["site-1", "site-2"] and record["dropped"] == ["site-3"]


def test_site_mid_upload_holds_the_round(tmp_path):
    run = _run(tmp_path)
    run.begin_contribution("site-3", 0)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    _contribute(run, "site-2", _scaled(3), ACTIVE2)
    assert run.current_round == 0, "site-3's upload is in flight"
    run.abandon_contribution("site-3", 0, "upload broke off")
    run.tick(ACTIVE2)
    assert run.current_round == 1


def test_aggregation_weights_scale_contributions(tmp_path):
    run = _run(tmp_path, aggregation_weights={"site-1": 3.0})
    _contribute(run, "site-1", _scaled(1), ACTIVE2, weight=1.0)
    _contribute(run, "site-2", _scaled(3), ACTIVE2, weight=3.0)
    # (3*1*1 + 1*3*3) / (3*1 + 1*3) = 2; without a_i it would be 2.5
    model = _model(run)
    np.testing.assert_array_equal(model["w"], W0["w"] + 2)
    np.testing.assert_array_equal(model["b"], W0["b"] + 2)
    assert _summary(run)["rounds"][0]["weights"] == {"site-1": 3.0, "site-2": 3.0}


@pytest.mark.parametrize("exclude_vars", [("b",), "^b$"], ids=["list", "regex"])
def test_excluded_variables_are_refused_by_check_tensor_and_stay_unchanged(tmp_path, exclude_vars):
    run = _run(tmp_path, exclude_vars=exclude_vars)
    assert run.check_tensor(TensorSpec("b", np.dtype(np.float32), (3,))) is False
    assert run.check_tensor(TensorSpec("w", np.dtype(np.float32), (2, 3))) is True
    for site, k in (("site-1", 1), ("site-2", 3)):
        # the service keeps only what check_tensor says to aggregate
        update = {n: v for n, v in _scaled(k).items() if n != "b"}
        _contribute(run, site, update, ACTIVE2)
    model = _model(run)
    np.testing.assert_array_equal(model["b"], W0["b"])
    np.testing.assert_array_equal(model["w"], W0["w"] + 2)


def test_excluded_variable_in_a_committed_update_is_not_averaged(tmp_path):
    run = _run(tmp_path, exclude_vars=("b",))
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    _contribute(run, "site-2", _scaled(3), ACTIVE2)
    np.testing.assert_array_equal(_model(run)["b"], W0["b"])


def test_check_tensor_refuses_unknown_variables_and_wrong_shape_or_dtype(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ContributionError, match="unknown variable 'x'"):
        run.check_tensor(TensorSpec("x", np.dtype(np.float32), (3,)))
    with pytest.raises(ContributionError, match=r"variable 'w': shape \[3, 2\]"):
        run.check_tensor(TensorSpec("w", np.dtype(np.float32), (3, 2)))
    with pytest.raises(ContributionError, match="variable 'w': dtype float64"):
        run.check_tensor(TensorSpec("w", np.dtype(np.float64), (2, 3)))


def test_summary_and_state_record_each_round_until_completed(tmp_path):
    run = _run(tmp_path, start_round=3, num_rounds=2, aggregation_weights={"site-2": 0.5})
    assert _summary(run) == {
        "run_number": 1,
        "task_name": "t",
        "aggregator": {"name": "FedAvg", "args": {}},
        "site_algorithms": [],
        "status": "training",
        "start_round": 3,
        "num_rounds": 2,
        "current_round": 3,
        "rounds": [],
        "final_metrics": {},
        "best_global": None,
        "privacy_epsilon_total": {},
    }
    assert _state(run) == {"run_number": 1, "status": "training", "next_round": 3}

    run.begin_contribution("site-3", 3)
    run.abandon_contribution("site-3", 3, "variable 'w' holds NaN or Inf")
    _contribute(run, "site-2", _scaled(1), ACTIVE2, weight=4.0, metrics={"accuracy": 0.5})
    _contribute(run, "site-1", _scaled(1), ACTIVE2, weight=2.0, metrics={"accuracy": 0.25, "loss": 1.5})
    summary = _summary(run)
    assert summary["status"] == "training" and summary["current_round"] == 4
    (record,) = summary["rounds"]
    assert record["round"] == 3
    assert record["contributors"] == ["site-1", "site-2"]
    assert record["weights"] == {"site-1": 2.0, "site-2": 2.0}
    assert record["metrics"] == {"site-1": {"accuracy": 0.25, "loss": 1.5}, "site-2": {"accuracy": 0.5}}
    assert record["rejected"] == [{"site": "site-3", "reason": "variable 'w' holds NaN or Inf"}]
    assert record["duration_s"] >= 0
    assert _state(run) == {"run_number": 1, "status": "training", "next_round": 4}
    assert load_model(run.model_path)[1] == {"run_number": 1, "round": 4}
    assert summary["best_global"] == {"round": 3, "score": 0.375}

    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    _contribute(run, "site-2", _scaled(1), ACTIVE2)
    summary = _summary(run)
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [3, 4]
    assert summary["rounds"][1]["rejected"] == []
    assert _state(run) == {"run_number": 1, "status": "completed", "next_round": 5}
    assert run.status()["status"] == "completed"
    np.testing.assert_array_equal(_model(run)["w"], W0["w"] + 2)


def test_the_global_model_the_sites_scored_best_is_kept_beside_the_latest(tmp_path):
    run = _run(tmp_path, num_rounds=3)
    _contribute(run, "site-1", _scaled(1), ACTIVE2, metrics={"accuracy": 0.5})
    _contribute(run, "site-2", _scaled(1), ACTIVE2, metrics={"accuracy": 0.7})
    round1_model = _model(run)
    _contribute(run, "site-1", _scaled(1), ACTIVE2, metrics={"accuracy": 0.9})
    _contribute(run, "site-2", _scaled(1), ACTIVE2, metrics={"accuracy": 0.8})
    _contribute(run, "site-1", _scaled(1), ACTIVE2, metrics={"accuracy": 0.4})
    _contribute(run, "site-2", _scaled(1), ACTIVE2, metrics={"accuracy": 0.4})
    summary = _summary(run)
    assert summary["best_global"]["round"] == 1 and summary["best_global"]["score"] == pytest.approx(0.85)
    best, _ = load_model(run.best_model_path)
    np.testing.assert_array_equal(best["w"], round1_model["w"])
    assert not np.array_equal(best["w"], _model(run)["w"])


def test_the_privacy_each_contribution_reports_is_recorded_per_round_and_totalled_per_site(tmp_path):
    run = _run(tmp_path, num_rounds=2)
    for _ in range(2):
        _contribute(run, "site-1", _scaled(1), ACTIVE2, privacy=("SVTProtocol", 0.1))
        _contribute(run, "site-2", _scaled(1), ACTIVE2, privacy=("PercentileProtocol", 0.0))
    summary = _summary(run)
    assert summary["rounds"][0]["privacy"] == {
        "site-1": {"protocol": "SVTProtocol", "epsilon": 0.1},
        "site-2": {"protocol": "PercentileProtocol", "epsilon": 0.0},
    }
    assert summary["privacy_epsilon_total"] == {"site-1": pytest.approx(0.2), "site-2": 0.0}


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), -1.0])
def test_a_contribution_reporting_an_impossible_epsilon_is_refused(tmp_path, epsilon):
    run = _run(tmp_path)
    with pytest.raises(ContributionError, match="privacy_epsilon must be a finite number >= 0"):
        _contribute(run, "site-1", _scaled(1), ACTIVE2, privacy=("SVTProtocol", epsilon))


def test_status_carries_the_mean_metrics_of_the_newest_scored_global_model(tmp_path):
    run = _run(tmp_path, num_rounds=3)
    assert run.status()["last_global_metrics"] is None
    _contribute(run, "site-1", ONES, ACTIVE2, metrics={"accuracy": 0.5, "loss": 2.0})
    _contribute(run, "site-2", ONES, ACTIVE2, metrics={"accuracy": 0.7})
    assert run.status()["last_global_metrics"] == {"round": 0, "mean": {"accuracy": 0.6, "loss": 2.0}}
    _contribute(run, "site-1", ONES, ACTIVE2)
    _contribute(run, "site-2", ONES, ACTIVE2)  # round 1 reported no metrics: round 0's stay the newest
    assert run.status()["last_global_metrics"]["round"] == 0


def test_final_metrics_are_kept_per_site(tmp_path):
    run = _run(tmp_path)
    run.report_final_metrics("site-2", {"accuracy": 0.75})
    run.report_final_metrics("site-1", {"accuracy": 0.5})
    assert _summary(run)["final_metrics"] == {"site-1": {"accuracy": 0.5}, "site-2": {"accuracy": 0.75}}


def test_offer_gives_a_new_site_the_current_model_at_once(tmp_path):
    run = _run(tmp_path)
    started = time.monotonic()
    offer = run.offer("site-1", 5.0)
    try:
        assert time.monotonic() - started < 1.0
        assert offer.phase == "train" and offer.round == 0
        assert [e.name for e in offer.index.entries] == ["w", "b", "steps"]
        offer.model.seek(0)
        assert offer.model.read(8) == b"FLMODEL1"
    finally:
        offer.model.close()


def test_offer_returns_wait_after_the_timeout_to_a_site_that_already_contributed(tmp_path):
    run = _run(tmp_path)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    started = time.monotonic()
    offer = run.offer("site-1", 0.3)
    elapsed = time.monotonic() - started
    assert offer.phase == "wait" and offer.round == 0 and offer.model is None
    assert 0.3 <= elapsed < 2.0


def test_offer_wakes_up_when_another_threads_contribution_closes_the_round(tmp_path):
    run = _run(tmp_path)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    other = threading.Timer(0.2, _contribute, args=(run, "site-2", _scaled(3), ACTIVE2))
    other.start()
    try:
        started = time.monotonic()
        phase, round_number = _offer(run, "site-1", 10.0)
        elapsed = time.monotonic() - started
    finally:
        other.join(5)
    assert (phase, round_number) == ("train", 1)
    assert 0.15 <= elapsed < 2.0, f"the long-poll returned after {elapsed:.2f}s"


def test_offer_wakes_up_when_tick_closes_the_round(tmp_path):
    run = _run(tmp_path)
    _contribute(run, "site-1", _scaled(1), ACTIVE3)
    _contribute(run, "site-2", _scaled(3), ACTIVE3)
    other = threading.Timer(0.2, run.tick, args=(ACTIVE2,))
    other.start()
    try:
        started = time.monotonic()
        phase, round_number = _offer(run, "site-2", 10.0)
        elapsed = time.monotonic() - started
    finally:
        other.join(5)
    assert (phase, round_number) == ("train", 1)
    assert elapsed < 2.0


def test_offer_returns_end_with_the_final_model_after_completion(tmp_path):
    run = _run(tmp_path, num_rounds=1)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    _contribute(run, "site-2", _scaled(3), ACTIVE2)
    for site in ("site-1", "site-2", "site-9"):
        started = time.monotonic()
        offer = run.offer(site, 5.0)
        try:
            assert offer.phase == "end", site
            assert time.monotonic() - started < 1.0
            assert offer.model is not None and [e.name for e in offer.index.entries] == ["w", "b", "steps"]
        finally:
            offer.model.close()


def test_stale_contribution_is_refused(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ContributionError, match="stale contribution: it is for round 1, the open round is 0"):
        run.begin_contribution("site-1", 1)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    _contribute(run, "site-2", _scaled(1), ACTIVE2)
    with pytest.raises(ContributionError, match="stale contribution: it is for round 0, the open round is 1"):
        run.begin_contribution("site-1", 0)


def test_duplicate_contribution_is_refused_while_uploading_and_after_commit(tmp_path):
    run = _run(tmp_path)
    run.begin_contribution("site-1", 0)
    with pytest.raises(ContributionError, match="duplicate contribution: site-1"):
        run.begin_contribution("site-1", 0)
    run.commit_contribution("site-1", 0, _scaled(1), 1.0, {}, lambda: ACTIVE2)
    with pytest.raises(ContributionError, match="duplicate contribution: site-1 already contributed to round 0"):
        run.begin_contribution("site-1", 0)
    assert run.current_round == 0


def test_abandon_contribution_frees_the_site_to_contribute_again(tmp_path):
    run = _run(tmp_path)
    run.begin_contribution("site-1", 0)
    assert _offer(run, "site-1", 0.05) == ("wait", 0), "a site mid-upload is not offered the round again"
    run.abandon_contribution("site-1", 0, "upload broke off")
    assert _offer(run, "site-1", 0.05) == ("train", 0)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    _contribute(run, "site-2", _scaled(3), ACTIVE2)
    record = _summary(run)["rounds"][0]
    assert record["contributors"] == ["site-1", "site-2"]
    assert record["rejected"] == [{"site": "site-1", "reason": "upload broke off"}]


def test_empty_contribution_is_refused(tmp_path):
    run = _run(tmp_path)
    run.begin_contribution("site-1", 0)
    with pytest.raises(ContributionError, match="no variables"):
        run.commit_contribution("site-1", 0, {}, 1.0, {}, lambda: ACTIVE2)


def test_stale_commit_does_not_release_the_sites_claim_on_the_open_round(tmp_path):
    run = _run(tmp_path, min_num_clients=1, max_num_clients=2)
    run.begin_contribution("site-1", 0)  # a slow upload for round 0
    _contribute(run, "site-2", _scaled(1), ACTIVE3)
    _contribute(run, "site-3", _scaled(1), ACTIVE3)  # max reached: round 0 closes without site-1
    run.begin_contribution("site-1", 1)  # site-1 starts its round-1 upload
    with pytest.raises(ContributionError, match="stale"):
        run.commit_contribution("site-1", 0, _scaled(1), 1.0, {}, lambda: ACTIVE3)
    with pytest.raises(ContributionError, match="duplicate"):
        run.begin_contribution("site-1", 1)


def test_abort_ends_offers_and_refuses_contributions(tmp_path):
    run = _run(tmp_path)
    _contribute(run, "site-1", _scaled(1), ACTIVE2)
    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(_offer(run, "site-1", 10.0)))
    waiter.start()
    time.sleep(0.1)
    started = time.monotonic()
    run.abort()
    waiter.join(5)
    assert waiter_result and waiter_result[0][0] == "end"
    assert time.monotonic() - started < 2.0
    assert _offer(run, "site-2", 5.0)[0] == "end"
    with pytest.raises(ContributionError, match="run 1 is aborted"):
        run.begin_contribution("site-2", 0)
    assert _summary(run)["status"] == "aborted"
    assert _state(run)["status"] == "aborted"
    run.tick(ACTIVE2)
    assert _summary(run)["rounds"] == [], "an aborted run closes no round"


def test_unsigned_variable_averages_updates_that_went_down(tmp_path):
    run_dir = tmp_path / "run_1"
    (run_dir / "models").mkdir(parents=True, exist_ok=True)  # as deploying makes it
    save_model(run_dir / "models" / GLOBAL_MODEL, {"level": np.array([5], np.uint8)})
    run = FederatedRun(1, run_dir, _config())
    down = np.array([4], np.uint8) - np.array([5], np.uint8)  # what the site's local - global gives: 255
    for site, delta in (("site-1", down), ("site-2", np.array([1], np.uint8))):
        run.begin_contribution(site, 0)
        run.commit_contribution(site, 0, {"level": delta}, 1.0, {}, lambda: ACTIVE2)
    assert _model(run)["level"].tolist() == [5]  # (-1 + 1) / 2 = 0


# ---- resuming after the server stopped ---------------------------------------------------------------


def test_a_resumed_run_opens_the_round_that_was_open_and_keeps_the_closed_ones(tmp_path):
    run = _run(tmp_path, num_rounds=3, persist_open_round=False)
    _contribute(run, "site-1", ONES, ACTIVE2)
    _contribute(run, "site-2", ONES, ACTIVE2)
    _contribute(run, "site-1", _scaled(5), ACTIVE2)  # accepted in round 1, then lost with the server
    after_round_0 = _model(run)
    assert not run.open_round_path.exists()

    resumed = FederatedRun(1, run.run_dir, _config(num_rounds=3, persist_open_round=False), resume=True)
    assert (resumed.current_round, resumed.phase) == (1, Phase.TRAINING)
    assert [r["round"] for r in _summary(resumed)["rounds"]] == [0]
    assert _summary(resumed)["rounds"][0]["contributors"] == ["site-1", "site-2"]
    assert _offer(resumed, "site-1", 0) == ("train", 1)
    for name, arr in after_round_0.items():
        np.testing.assert_array_equal(_model(resumed)[name], arr)
    _contribute(resumed, "site-1", ONES, ACTIVE2)
    _contribute(resumed, "site-2", ONES, ACTIVE2)
    assert [r["round"] for r in _summary(resumed)["rounds"]] == [0, 1]
    assert resumed.current_round == 2


def test_a_resumed_run_keeps_the_contributions_the_open_round_had_accepted(tmp_path):
    uninterrupted = _run(tmp_path / "a", num_rounds=2)
    run = _run(tmp_path / "b", num_rounds=2)
    for r in (uninterrupted, run):
        _contribute(r, "site-1", ONES, ACTIVE2)
        _contribute(r, "site-2", ONES, ACTIVE2)
        _contribute(
            r, "site-1", _scaled(3), ACTIVE2, weight=2.0, metrics={"accuracy": 0.5}, privacy=("SVTProtocol", 0.25)
        )
    assert run.open_round_path.exists()

    resumed = FederatedRun(1, run.run_dir, _config(num_rounds=2), resume=True)
    assert resumed.current_round == 1 and resumed.status()["contributors"] == ["site-1"]
    assert _offer(resumed, "site-1", 0) == ("wait", 1)  # not asked to train round 1 again
    assert _offer(resumed, "site-2", 0) == ("train", 1)
    with pytest.raises(ContributionError, match="duplicate contribution: site-1"):
        resumed.begin_contribution("site-1", 1)
    for r in (uninterrupted, resumed):
        _contribute(r, "site-2", _scaled(7), ACTIVE2)
    assert resumed.phase is Phase.COMPLETED and not resumed.open_round_path.exists()
    for name, arr in _model(uninterrupted).items():
        np.testing.assert_array_equal(_model(resumed)[name], arr)
    last = _summary(resumed)["rounds"][-1]
    assert last["weights"] == {"site-1": 2.0, "site-2": 1.0} and last["metrics"]["site-1"] == {"accuracy": 0.5}
    assert _summary(resumed)["privacy_epsilon_total"] == {"site-1": 0.25}


def test_a_torn_open_round_file_is_set_aside_and_the_round_starts_empty(tmp_path):
    run = _run(tmp_path, num_rounds=2)
    _contribute(run, "site-1", ONES, ACTIVE2)
    data = run.open_round_path.read_bytes()
    run.open_round_path.write_bytes(data[: len(data) // 2])

    resumed = FederatedRun(1, run.run_dir, _config(num_rounds=2), resume=True)
    assert resumed.current_round == 0 and resumed.status()["contributors"] == []
    assert _offer(resumed, "site-1", 0) == ("train", 0)
    assert not resumed.open_round_path.exists()


def test_a_round_closed_as_the_server_stopped_is_not_run_again(tmp_path):
    run = _run(tmp_path, num_rounds=3)
    _contribute(run, "site-1", ONES, ACTIVE2)
    _contribute(run, "site-2", ONES, ACTIVE2)
    # The server stopped after replacing the global model but before writing summary.json.
    summary = _summary(run)
    summary.update(rounds=[], current_round=0)
    run.summary_path.write_text(json.dumps(summary))

    resumed = FederatedRun(1, run.run_dir, _config(num_rounds=3), resume=True)
    assert resumed.current_round == 1
    assert [(r["round"], r.get("recovered")) for r in _summary(resumed)["rounds"]] == [(0, True)]


def test_a_run_whose_last_round_closed_as_the_server_stopped_resumes_completed(tmp_path):
    run = _run(tmp_path, num_rounds=1)
    summary = _summary(run)
    _contribute(run, "site-1", ONES, ACTIVE2)
    _contribute(run, "site-2", ONES, ACTIVE2)
    run.summary_path.write_text(json.dumps(summary))  # still "training", round 0 open

    resumed = FederatedRun(1, run.run_dir, _config(num_rounds=1), resume=True)
    assert resumed.phase is Phase.COMPLETED and _summary(resumed)["status"] == "completed"
    assert _offer(resumed, "site-1", 0)[0] == "end"


def test_resuming_without_the_runs_summary_names_the_file(tmp_path):
    run = _run(tmp_path)
    run.summary_path.unlink()
    with pytest.raises(RunStateError, match=r"summary.json: cannot resume run 1"):
        FederatedRun(1, run.run_dir, _config(), resume=True)


def test_a_round_whose_aggregate_is_not_finite_is_refused_by_name_and_the_model_kept(tmp_path):
    """Hardening item 3: no non-finite global model is ever written; the round's contributions are refused by
    name, the last good model stays, and the round opens again for new contributions."""
    run_dir = tmp_path / "run_1"
    near_max = {
        "w": np.full((2, 3), np.finfo(np.float32).max, np.float32),
        "b": np.zeros(3, np.float32),
        "steps": np.array(1, np.int64),
    }
    (run_dir / "models").mkdir(parents=True, exist_ok=True)  # as deploying makes it
    save_model(run_dir / "models" / GLOBAL_MODEL, near_max)
    run = FederatedRun(1, run_dir, _config())
    big = {"w": np.full((2, 3), 3e32, np.float32), "b": np.ones(3, np.float32), "steps": np.array(1, np.int64)}
    _contribute(run, "site-1", big, ACTIVE2)
    _contribute(run, "site-2", big, ACTIVE2)
    assert run.current_round == 0 and run.phase is Phase.TRAINING
    np.testing.assert_array_equal(_model(run)["w"], near_max["w"])
    assert _summary(run)["rounds"] == []
    _contribute(run, "site-1", _scaled(-1), ACTIVE2)  # the round is open again: honest updates are taken
    _contribute(run, "site-2", _scaled(-1), ACTIVE2)
    assert run.current_round == 1
    refused = {r["site"]: r["reason"] for r in _summary(run)["rounds"][0]["rejected"]}
    assert set(refused) == {"site-1", "site-2"}
    assert all("variable 'w' of the aggregate is not finite" in why for why in refused.values())
    assert np.isfinite(_model(run)["w"]).all()


@pytest.mark.parametrize("weight", [1e39, 1e30, float("inf"), float("nan"), 0.0, True])
def test_a_claimed_weight_beyond_the_cap_is_refused(tmp_path, weight):
    """Hardening item 3: the server config caps a site's claimed weight (max_contribution_weight)."""
    run = _run(tmp_path, max_contribution_weight=1e6)
    with pytest.raises(ContributionError, match="max_contribution_weight 1e\\+06"):
        _contribute(run, "site-1", ONES, ACTIVE2, weight=weight)
    run.abandon_contribution("site-1", 0, "refused")
    _contribute(run, "site-1", ONES, ACTIVE2, weight=1e6)

"""Cross-site validation (DESIGN §9): the store on a really completed run, the server's gate, and the RPCs over mTLS."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_mmar, prepare_workspace
from test_run_rounds import _config

from fedclient.communicator import CommunicationError, Communicator
from fedclient.model_manager import ClientModelManager
from fedclient.worker import kit_ssl_args
from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import load_kit
from fedcommon.model_file import load_model, save_model
from fedcommon.tensor_codec import encode_tensors
from fedcommon.wire import training_pb2 as pb
from fedserver.aggregator import ContributionError
from fedserver.cross_site import CrossSiteError, CrossSiteValidation
from fedserver.run import BEST_GLOBAL_MODEL, GLOBAL_MODEL, FederatedRun, Phase
from fedserver.server import FederationServer

SITES = ("site-1", "site-2")
W0 = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
    "b": np.array([1.0, -1.0, 0.5], np.float32),
    "steps": np.array(10, np.int64),
}
GOOD = {"accuracy": 0.75, "loss": 0.5}


def _plus(k: float) -> dict[str, np.ndarray]:
    """W0 shifted by k: the global model after updates summing to k, or a site's local model."""
    return {"w": W0["w"] + np.float32(k), "b": W0["b"] + np.float32(k), "steps": np.array(10 + int(k), np.int64)}


def _update(k: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), k, np.float32), "b": np.full(3, k, np.float32), "steps": np.array(int(k), np.int64)}


def _train(run: FederatedRun, round_scores: tuple[float, ...]) -> None:
    """Both sites contribute update k+1 to round k, scoring the round's starting model round_scores[k]."""
    for k, score in enumerate(round_scores):
        for site in SITES:
            r = run.current_round
            run.begin_contribution(site, r)
            run.commit_contribution(site, r, _update(k + 1), 1.0, {"accuracy": score}, lambda: set(SITES))


def _completed_run(
    run_dir: Path,
    round_scores: tuple[float, ...] = (0.5, 0.6),
    final: dict[str, float] | None = None,
    run_number: int = 1,
) -> Path:
    """A run of SITES driven through FederatedRun's API to completion; `final`: site -> final accuracy."""
    (run_dir / "models").mkdir(parents=True, exist_ok=True)  # as deploying makes it
    save_model(run_dir / "models" / GLOBAL_MODEL, W0)
    run = FederatedRun(run_number, run_dir, _config(num_rounds=len(round_scores)))
    _train(run, round_scores)
    assert run.phase is Phase.COMPLETED
    for site, accuracy in (final if final is not None else dict.fromkeys(SITES, 0.9)).items():
        run.report_final_metrics(site, {"accuracy": accuracy})
    return run_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Run 1: rounds scored 0.5 and 0.6, final model scored 0.9 by both sites; global model ends at W0 + 3."""
    return _completed_run(tmp_path / "run_1")


def _store(run_dir: Path, **kwargs) -> CrossSiteValidation:
    return CrossSiteValidation(1, run_dir, **kwargs)


def _share(
    store: CrossSiteValidation, site: str, tensors: dict[str, np.ndarray], metrics: dict[str, float] = GOOD
) -> str:
    return store.submit_best_model(site, metrics, encode_tensors(tensors), len(tensors))


def _owners_on_disk(store: CrossSiteValidation) -> dict:
    return json.loads(store.path.read_text())["owners"] if store.path.exists() else {}


def _offer(store: CrossSiteValidation, site: str, validated=(), wait: float = 0.0) -> tuple[str, str]:
    offer = store.next_model(site, set(validated), wait)
    return offer.status, offer.owner


def _assert_same_model(path: Path, expected: dict[str, np.ndarray]) -> None:
    tensors, _ = load_model(path)
    assert set(tensors) == set(expected)
    for name, arr in expected.items():
        assert tensors[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(tensors[name], arr, err_msg=name)


# ---- a site's best model: refused exactly, and nothing left behind ------------------------------------------


def _chunks(*tensors: tuple[str, np.ndarray]) -> list[pb.ModelChunk]:
    return list(encode_tensors(list(tensors)))


def _cut_mid_tensor() -> list[pb.ModelChunk]:
    header, data = _chunks(("w", W0["w"]))
    return [header, pb.ModelChunk(data=bytes(data.data[:12]))]


_NAN_B = np.array([0.0, np.nan, 1.0], np.float32)
_INF_W = np.full((2, 3), np.inf, np.float32)

BAD_MODELS = {
    # id: (chunks, announced variables, what the refusal must say)
    "wrong-name": (
        _chunks(("w", W0["w"]), ("b", W0["b"]), ("evil", W0["steps"])),
        3,
        "variable 'evil' is not in the global model",
    ),
    "wrong-shape": (
        _chunks(("w", W0["w"].reshape(3, 2)), ("b", W0["b"]), ("steps", W0["steps"])),
        3,
        "variable 'w' is float32[3, 2]; the global model has float32[2, 3]",
    ),
    "wrong-dtype": (
        _chunks(("w", W0["w"]), ("b", W0["b"].astype(np.float64)), ("steps", W0["steps"])),
        3,
        "variable 'b' is float64[3]; the global model has float32[3]",
    ),
    "unsupported-dtype": (
        [pb.ModelChunk(tensor=pb.TensorHeader(name="w", dtype="object", shape=[2, 3], nbytes=48))],
        3,
        "unsupported dtype 'object'",
    ),
    "missing-variable": (_chunks(("w", W0["w"]), ("b", W0["b"])), 3, "1 of 3 tensors missing ('steps')"),
    "fewer-variables-announced": (
        _chunks(("w", W0["w"]), ("b", W0["b"])),
        2,
        "announces 2 variables; the global model has 3",
    ),
    "duplicate-variable": (_chunks(("w", W0["w"]), ("w", W0["w"]), ("b", W0["b"])), 3, "variable 'w' appears twice"),
    "nan-values": (_chunks(("w", W0["w"]), ("b", _NAN_B), ("steps", W0["steps"])), 3, "variable 'b' holds NaN or Inf"),
    "inf-values": (_chunks(("w", _INF_W), ("b", W0["b"]), ("steps", W0["steps"])), 3, "variable 'w' holds NaN or Inf"),
    "ends-mid-tensor": (_cut_mid_tensor(), 3, "best model ended early: tensor 'w' has 12 of 24 bytes"),
    "second-header": (
        [*_chunks(("w", W0["w"])), pb.ModelChunk(header=pb.ModelHeader())],
        3,
        "a second header inside a best model",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_broken_best_model_is_refused_naming_the_problem_and_leaves_nothing(run_dir, case):
    chunks, announced, problem = BAD_MODELS[case]
    store = _store(run_dir)
    with pytest.raises(CrossSiteError) as err:
        store.submit_best_model("site-1", GOOD, iter(chunks), announced)
    assert problem in str(err.value)
    assert not (store.models / "site-1.fl").exists()
    assert not store.models.exists() or list(store.models.iterdir()) == [], "temp files left behind"
    assert "site-1" not in _owners_on_disk(store)

    # The refusal cost the site nothing: its correct model (tensors in any order) is accepted afterwards.
    good = _plus(1)
    reordered = [(n, good[n]) for n in ("steps", "b", "w")]
    message = store.submit_best_model("site-1", GOOD, encode_tensors(reordered), 3)
    assert message == "site-1's best model is offered for validation"
    _assert_same_model(store.models / "site-1.fl", good)
    assert _owners_on_disk(store)["site-1"] == {"metrics": GOOD}


def test_an_upload_whose_stream_breaks_off_leaves_nothing(run_dir):
    store = _store(run_dir)

    def broken() -> Iterator[pb.ModelChunk]:
        yield from _chunks(("w", W0["w"]), ("b", W0["b"]))
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        store.submit_best_model("site-1", GOOD, broken(), 3)
    assert list(store.models.iterdir()) == []
    assert "site-1" not in _owners_on_disk(store)
    _share(store, "site-1", _plus(1))
    _assert_same_model(store.models / "site-1.fl", _plus(1))


@pytest.mark.parametrize(
    "metrics, problem",
    [
        ({"accuracy": math.nan}, "metric 'accuracy' must be a finite number"),
        ({"accuracy": math.inf}, "metric 'accuracy' must be a finite number"),
        ({"accuracy": "high"}, "metric 'accuracy' must be a finite number"),
    ],
)
def test_a_best_model_with_non_finite_metrics_is_refused(run_dir, metrics, problem):
    store = _store(run_dir)
    with pytest.raises(CrossSiteError, match=problem):
        _share(store, "site-1", _plus(1), metrics)
    assert not (store.models / "site-1.fl").exists()
    assert "site-1" not in _owners_on_disk(store)


def test_the_first_shared_model_is_kept_and_a_later_share_replaces_a_decline(run_dir):
    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    assert "the first one is kept" in _share(store, "site-1", _plus(7))
    _assert_same_model(store.models / "site-1.fl", _plus(1))
    assert "it stays offered" in store.decline("site-1")
    assert store.matrix()["declined"] == []

    store.decline("site-2")
    assert store.matrix()["declined"] == ["site-2"]
    _share(store, "site-2", _plus(2))
    matrix = store.matrix()
    assert matrix["declined"] == [] and "site-2" in matrix["owners"]
    _assert_same_model(store.models / "site-2.fl", _plus(2))


def test_a_refused_share_is_not_waited_for_and_a_good_one_later_is_offered(run_dir):
    store = _store(run_dir, active_sites=lambda: {"site-1", "site-2"})
    _share(store, "site-2", _plus(2))
    with pytest.raises(CrossSiteError, match="best model refused"):
        _share(store, "site-1", {"w": W0["w"], "b": W0["b"], "oops": W0["steps"]})
    assert "not in the global model" in store.matrix()["refused"]["site-1"]
    assert _offer(store, "site-2", validated={"site-2"}) == ("model", "server")
    assert _offer(store, "site-2", validated={"site-2", "server"}) == ("end", "")
    _share(store, "site-1", _plus(1))
    assert store.matrix()["refused"] == {}
    assert _offer(store, "site-2", validated={"site-2", "server"}) == ("model", "site-1")


def test_a_site_never_waits_for_its_own_model(run_dir):
    store = _store(run_dir, active_sites=lambda: {"site-1", "site-2"})
    _share(store, "site-2", _plus(2))
    # site-1 has not shared (nor declined) yet: site-2 waits for it, site-1 does not wait for itself.
    assert _offer(store, "site-2", validated={"site-2", "server"}) == ("wait", "")
    assert _offer(store, "site-1", validated={"site-2", "server"}) == ("end", "")


def test_a_deleted_run_refuses_every_call_and_is_not_written_back(run_dir):
    import shutil

    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    store.close()
    shutil.rmtree(run_dir)
    for call in (
        lambda: store.next_model("site-1", set(), 0),
        lambda: _share(store, "site-2", _plus(2)),
        lambda: store.decline("site-2"),
    ):
        with pytest.raises(CrossSiteError, match="run 1 was deleted"):
            call()
    assert not run_dir.exists()


def test_looking_at_the_matrix_writes_nothing(run_dir):
    store = _store(run_dir, grace_s=0)
    matrix = store.matrix()
    assert matrix["server_model"] is None and "server" in matrix["pending_owners"]
    assert not (run_dir / "cross_site").exists()


# ---- results: only for models offered, all or nothing ------------------------------------------------------


def test_results_for_a_model_never_offered_are_refused_naming_the_owner(run_dir):
    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    _share(store, "site-2", _plus(2))
    assert _offer(store, "site-1") == ("model", "site-1")
    with pytest.raises(CrossSiteError, match="results for 'site-2''s model, which was never offered to site-1"):
        store.record_results("site-1", {"site-2": GOOD})
    with pytest.raises(CrossSiteError, match="'server''s model, which was never offered to site-1"):
        store.record_results("site-1", {"server": GOOD})
    assert store.matrix()["results"] == {}


def test_a_batch_with_one_bad_result_records_nothing_and_loses_nothing(run_dir):
    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    _share(store, "site-2", _plus(2))
    assert _offer(store, "site-1") == ("model", "site-1")
    assert store.record_results("site-1", {"site-1": {"accuracy": 0.8}}) == 1
    assert _offer(store, "site-1", {"site-1"}) == ("model", "site-2")
    assert _offer(store, "site-1", {"site-1", "site-2"}) == ("model", "server")

    with pytest.raises(CrossSiteError, match="'site-9''s model, which was never offered"):
        store.record_results("site-1", {"site-2": {"accuracy": 0.7}, "site-9": {"accuracy": 0.1}})
    with pytest.raises(CrossSiteError, match="site-1's result for server: metric 'accuracy' must be a finite"):
        store.record_results("site-1", {"site-2": {"accuracy": 0.7}, "server": {"accuracy": math.nan}})
    with pytest.raises(CrossSiteError, match="no results given"):
        store.record_results("site-1", {})

    expected = {"site-1": {"site-1": {"accuracy": 0.8}}}
    assert store.matrix()["results"] == expected
    assert json.loads(store.path.read_text())["results"] == expected
    assert store.record_results("site-1", {"site-2": {"accuracy": 0.7}, "server": {"accuracy": 0.9}}) == 2
    assert store.matrix()["results"] == {
        "site-1": {"server": {"accuracy": 0.9}, "site-1": {"accuracy": 0.8}, "site-2": {"accuracy": 0.7}}
    }


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "0.9"])
def test_non_finite_or_non_numeric_result_metrics_are_refused(run_dir, value):
    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    assert _offer(store, "site-2") == ("model", "site-1")
    with pytest.raises(CrossSiteError, match="site-2's result for site-1: metric 'accuracy' must be a finite number"):
        store.record_results("site-2", {"site-1": {"accuracy": value}})
    with pytest.raises(CrossSiteError, match="metrics must be a non-empty mapping"):
        store.record_results("site-2", {"site-1": {}})
    assert store.matrix()["results"] == {}


# ---- who may take part ------------------------------------------------------------------------------------


def test_a_site_that_did_not_take_part_in_the_run_is_refused_naming_the_participants(run_dir):
    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    refusal = "site-3 did not take part in run 1; its participants are site-1, site-2"
    with pytest.raises(CrossSiteError, match=refusal):
        _share(store, "site-3", _plus(3))
    with pytest.raises(CrossSiteError, match=refusal):
        store.decline("site-3")
    with pytest.raises(CrossSiteError, match=refusal):
        store.next_model("site-3", set(), 0)
    with pytest.raises(CrossSiteError, match=refusal):
        store.record_results("site-3", {"site-1": GOOD})
    assert not (store.models / "site-3.fl").exists()
    matrix = store.matrix()
    assert matrix["validating_sites"] == ["site-1", "site-2"]
    assert "site-3" not in matrix["owners"] and matrix["results"] == {}


# ---- what next_model offers --------------------------------------------------------------------------------


def test_each_site_is_offered_every_shared_model_then_the_servers_then_the_end(run_dir):
    store = _store(run_dir, active_sites=lambda: set(SITES))
    _share(store, "site-1", _plus(1))
    _share(store, "site-2", _plus(2))
    for site in SITES:
        offer = store.next_model(site, set(), 0)
        assert (offer.status, offer.owner, offer.more) == ("model", "site-1", True)
        _assert_same_model(offer.path, _plus(1))
        offer = store.next_model(site, {"site-1"}, 0)
        assert (offer.status, offer.owner, offer.more) == ("model", "site-2", True)
        _assert_same_model(offer.path, _plus(2))
        offer = store.next_model(site, {"site-1", "site-2"}, 0)
        assert (offer.status, offer.owner, offer.more) == ("model", "server", False)
        offer = store.next_model(site, {"site-1", "site-2", "server"}, 0)
        assert offer.status == "end" and offer.message == f"{site} has validated every model of run 1"


def test_models_a_site_already_has_results_for_are_not_offered_again(run_dir):
    store = _store(run_dir, active_sites=lambda: set(SITES))
    _share(store, "site-1", _plus(1))
    _share(store, "site-2", _plus(2))
    assert _offer(store, "site-2") == ("model", "site-1")
    assert _offer(store, "site-2", {"site-1"}) == ("model", "site-2")
    store.record_results("site-2", {"site-1": GOOD, "site-2": GOOD})
    assert _offer(store, "site-2") == ("model", "server")
    store.record_results("site-2", {"server": GOOD})
    assert _offer(store, "site-2")[0] == "end"
    assert _offer(store, "site-1") == ("model", "site-1"), "site-2's results do not count for site-1"


def test_a_site_waits_for_a_participant_that_neither_shared_nor_declined(run_dir):
    store = _store(run_dir, active_sites=lambda: set(SITES))
    _share(store, "site-1", _plus(1))
    offer = store.next_model("site-1", {"site-1", "server"}, 0)
    assert offer.status == "wait" and offer.more
    assert offer.message == "waiting for the best models of site-2"
    assert store.matrix()["pending_owners"] == ["site-2"]

    started = time.monotonic()
    offer = store.next_model("site-1", {"site-1", "server"}, 0.3)
    assert offer.status == "wait" and time.monotonic() - started >= 0.3, "a long-poll holds for wait_seconds"


def test_a_waiting_long_poll_returns_as_soon_as_the_awaited_model_is_shared(run_dir):
    store = _store(run_dir, active_sites=lambda: set(SITES))
    _share(store, "site-1", _plus(1))
    got = {}

    def poll() -> None:
        started = time.monotonic()
        got["offer"] = store.next_model("site-1", {"site-1", "server"}, 10)
        got["held"] = time.monotonic() - started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    _share(store, "site-2", _plus(2))
    poller.join(5)
    assert not poller.is_alive()
    assert got["offer"].owner == "site-2" and got["held"] < 2


def test_a_declined_site_is_not_waited_for_never_offered_and_still_validates_the_others(run_dir):
    store = _store(run_dir, active_sites=lambda: set(SITES))
    _share(store, "site-1", _plus(1))
    assert store.decline("site-2") == "site-2 does not share its model for run 1"
    assert _offer(store, "site-1", {"site-1", "server"})[0] == "end", "site-2 is not waited for"

    offered = []
    validated: set[str] = set()
    while (offer := store.next_model("site-2", validated, 0)).status == "model":
        offered.append(offer.owner)
        validated.add(offer.owner)
    assert offered == ["site-1", "server"]
    assert offer.status == "end"
    store.record_results("site-2", {"site-1": GOOD, "server": GOOD})
    matrix = store.matrix()
    assert matrix["owners"] == ["site-1", "server"] and matrix["declined"] == ["site-2"]
    assert matrix["pending_owners"] == []
    assert matrix["results"] == {"site-2": {"server": GOOD, "site-1": GOOD}}
    assert not (store.models / "site-2.fl").exists()


def test_a_pending_site_that_is_not_connected_is_given_up_after_the_grace(run_dir):
    store = _store(run_dir, active_sites=set, grace_s=0.2)
    _share(store, "site-1", _plus(1))
    assert _offer(store, "site-1", {"site-1", "server"})[0] == "wait"
    time.sleep(0.25)
    offer = store.next_model("site-1", {"site-1", "server"}, 0)
    assert offer.status == "end"
    assert "site-2 did not share a model and is not connected" in offer.message


# ---- the server's own model ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "round_scores, final, expected, chosen",
    [
        ((0.5, 0.6), 0.9, _plus(3), {"model": "final", "score": 0.9}),
        ((0.9, 0.5), 0.6, W0, {"model": "round 0", "score": 0.9}),
        ((0.5, 0.9), 0.6, _plus(1), {"model": "round 1", "score": 0.9}),
    ],
    ids=["final-scored-best", "initial-model-scored-best", "round-1-start-scored-best"],
)
def test_the_server_offers_the_global_model_its_sites_scored_best(tmp_path, round_scores, final, expected, chosen):
    run_dir = _completed_run(tmp_path / "run_1", round_scores, dict.fromkeys(SITES, final))
    store = _store(run_dir)
    offer = store.next_model("site-1", set(), 0)
    assert offer.owner == "server"
    _assert_same_model(offer.path, expected)
    assert store.matrix()["server_model"] == chosen
    if chosen["model"] != "final":
        _assert_same_model(run_dir / "models" / BEST_GLOBAL_MODEL, expected)


def test_the_servers_model_waits_for_final_metrics_of_connected_sites_until_the_grace(tmp_path):
    # An earlier round scored 0.9; the final model is scored only by site-1 so far (0.95).
    run_dir = _completed_run(tmp_path / "run_1", (0.9, 0.5), {"site-1": 0.95})
    # A grace far longer than two declines take, even with their fsyncs on a loaded machine.
    store = _store(run_dir, active_sites=lambda: set(SITES), grace_s=3.0)
    store.decline("site-1")
    store.decline("site-2")
    offer = store.next_model("site-1", set(), 0)
    assert offer.status == "wait" and offer.message == "waiting for the best models of server"
    assert store.matrix()["server_model"] is None
    assert not (store.models / "server.fl").exists()

    offer = store.next_model("site-1", set(), 60.0)  # returns once the grace has passed
    assert offer.status == "model" and offer.owner == "server"
    _assert_same_model(offer.path, _plus(3))  # once the grace passed: site-1's final score is all there is
    assert store.matrix()["server_model"] == {"model": "final", "score": 0.95}


def test_the_servers_model_waits_only_for_connected_sites_that_have_not_reported(tmp_path):
    # Nobody scored the final model; round 0 (the initial model) scored 0.9.
    run_dir = _completed_run(tmp_path / "run_1", (0.9, 0.5), {})
    connected = {"site-1"}
    store = _store(run_dir, active_sites=lambda: set(connected), grace_s=30)
    store.decline("site-2")
    assert _offer(store, "site-2") == ("wait", ""), "site-1 is connected and may still report"
    connected.clear()  # site-1 left: nobody is left to report, so the choice is made at once
    assert _offer(store, "site-2") == ("model", "server")
    _assert_same_model(store.models / "server.fl", W0)
    assert store.matrix()["server_model"] == {"model": "round 0", "score": 0.9}


# ---- persistence -------------------------------------------------------------------------------------------


def test_a_restarted_store_has_the_same_matrix_offers_and_shared_models(run_dir):
    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    store.decline("site-2")
    assert _offer(store, "site-1") == ("model", "site-1")
    store.record_results("site-1", {"site-1": {"accuracy": 0.8}})
    assert _offer(store, "site-1", {"site-1"}) == ("model", "server")
    assert _offer(store, "site-2") == ("model", "site-1")
    before = store.matrix()
    server_model = load_model(store.models / "server.fl")[0]

    # Later final metrics do not change the model sites may already have validated as "server".
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["final_metrics"] = {s: {"accuracy": 0.1} for s in SITES}
    (run_dir / "summary.json").write_text(json.dumps(summary))

    again = _store(run_dir)
    assert again.matrix() == before
    _assert_same_model(again.models / "server.fl", server_model)
    # What was offered before the restart can be reported on after it, and nothing else.
    assert again.record_results("site-1", {"server": {"accuracy": 0.9}}) == 1
    assert again.record_results("site-2", {"site-1": {"accuracy": 0.7}}) == 1
    with pytest.raises(CrossSiteError, match="'server''s model, which was never offered to site-2"):
        again.record_results("site-2", {"server": {"accuracy": 0.7}})
    offer = again.next_model("site-2", {"site-1"}, 0)
    assert offer.owner == "server"
    offer = again.next_model("site-1", set(), 0)
    assert offer.status == "end", "site-1 has results for every model"
    _assert_same_model(again.models / "site-1.fl", _plus(1))
    assert _store(run_dir).matrix()["results"] == {
        "site-1": {"server": {"accuracy": 0.9}, "site-1": {"accuracy": 0.8}},
        "site-2": {"site-1": {"accuracy": 0.7}},
    }


def test_an_unreadable_results_file_is_refused_with_what_to_do(run_dir):
    store = _store(run_dir)
    _share(store, "site-1", _plus(1))
    store.path.write_text("{not json")
    with pytest.raises(CrossSiteError, match=r"results.json: unreadable .*; fix or remove it"):
        _store(run_dir)
    store.path.write_text("[]")
    with pytest.raises(CrossSiteError, match="not a cross-site validation record; fix or remove it"):
        _store(run_dir)


# ---- which runs can be validated ---------------------------------------------------------------------------


def test_the_store_refuses_a_run_that_never_trained_or_is_still_training(tmp_path):
    with pytest.raises(CrossSiteError, match="run 1 has no summary.json: it was never trained"):
        CrossSiteValidation(1, tmp_path / "run_1")
    (tmp_path / "run_2" / "models").mkdir(parents=True)  # as deploying makes it
    save_model(tmp_path / "run_2" / "models" / GLOBAL_MODEL, W0)
    run = FederatedRun(2, tmp_path / "run_2", _config())
    _train(run, (0.5,))
    with pytest.raises(CrossSiteError, match="run 2 has not completed; cross-site validation needs a completed run"):
        CrossSiteValidation(2, tmp_path / "run_2")
    run.abort()
    with pytest.raises(CrossSiteError, match="run 2 has not completed"):
        CrossSiteValidation(2, tmp_path / "run_2")


@pytest.fixture
def workspace(tmp_path) -> Path:
    return prepare_workspace(tmp_path / "ws", clients=3)


def _mmar(tmp_path: Path, **server) -> Path:
    config = {
        "initial_model": {"file": "models/initial.fl"},
        "min_num_clients": 2,
        "num_rounds": 1,
        "wait_after_min_clients": 30,
        "heart_beat_timeout": 30,
        **server,
    }
    mmar = copy_mmar(tmp_path / "mmar", server=config)
    save_model(mmar / "models" / "initial.fl", W0)
    return mmar


@pytest.fixture
def idle_server(workspace) -> Iterator[FederationServer]:
    """A FederationServer on a POC workspace, not serving: enough to ask it about runs."""
    server = FederationServer(workspace / "server", load_kit(workspace / "server"), fl_port=0, admin_port=0)
    try:
        yield server
    finally:
        server.stop(0)


def test_the_server_refuses_cross_site_validation_of_runs_that_did_not_complete(idle_server, tmp_path):
    server = idle_server
    mmar = _mmar(tmp_path)
    with pytest.raises(CrossSiteError, match="^run 9 does not exist$"):
        server.cross_site(9)
    server.start_run(mmar, run_number=1)
    with pytest.raises(CrossSiteError, match="^run 1 is still training; cross-site validation needs a completed run$"):
        server.cross_site(1)
    server.abort_training()
    with pytest.raises(CrossSiteError, match="^run 1 was aborted; cross-site validation needs a completed run$"):
        server.cross_site(1)
    server.set_run_number(2)
    server.deploy(mmar)
    with pytest.raises(CrossSiteError, match="^run 2 has not been trained yet; cross-site validation needs a"):
        server.cross_site(2)
    assert not (server.run_dir(1) / "cross_site").exists() and not (server.run_dir(2) / "cross_site").exists()


def test_the_server_serves_a_completed_run_until_it_is_deleted(idle_server):
    server = idle_server
    _completed_run(server.run_dir(3), run_number=3)
    store = server.cross_site(3)
    assert store.run_number == 3 and store.participants == list(SITES)
    assert server.cross_site(3) is store, "one store per run, so its lock covers every caller"
    server.delete_run(3)
    with pytest.raises(CrossSiteError, match="^run 3 does not exist$"):
        server.cross_site(3)


# ---- a production bug found while writing these tests ---------------------------------------------------------


def test_a_contribution_with_nan_metrics_never_makes_its_round_the_best_global_model(tmp_path):
    (tmp_path / "run_1" / "models").mkdir(parents=True)  # as deploying makes it
    save_model(tmp_path / "run_1" / "models" / GLOBAL_MODEL, W0)
    run = FederatedRun(1, tmp_path / "run_1", _config())
    _train(run, (0.9,))
    try:
        _train(run, (math.nan,))
    except ContributionError:
        return  # refusing the contribution outright is as good
    summary = json.loads((tmp_path / "run_1" / "summary.json").read_text())
    assert summary["best_global"] == {"round": 0, "score": 0.9}
    _assert_same_model(tmp_path / "run_1" / "models" / BEST_GLOBAL_MODEL, W0)


def test_a_decline_that_arrives_during_the_sites_upload_does_not_leave_it_both_declined_and_sharing(run_dir):
    store = _store(run_dir)
    midway, resume = threading.Event(), threading.Event()
    outcome = {}

    def slow_upload() -> Iterator[pb.ModelChunk]:
        chunks = list(encode_tensors(_plus(1)))
        yield from chunks[:2]
        midway.set()
        resume.wait(5)
        yield from chunks[2:]

    def upload() -> None:
        try:
            outcome["shared"] = store.submit_best_model("site-1", GOOD, slow_upload(), 3)
        except CrossSiteError as e:
            outcome["refused"] = str(e)

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        assert midway.wait(5)
        with pytest.raises(CrossSiteError, match="site-1 is uploading its best model for run 1"):
            store.decline("site-1")
    finally:
        resume.set()
        uploader.join(5)
    matrix = store.matrix()
    assert "shared" in outcome, outcome
    assert "site-1" in matrix["owners"] and "site-1" not in matrix["declined"]


# ---- over the wire: real server, real Communicator, mutual TLS on 127.0.0.1 -----------------------------------

TASK = "digits"


@pytest.fixture
def trained_federation(workspace, tmp_path) -> Iterator[tuple[FederationServer, Path, dict, list[Communicator]]]:
    """A serving FederationServer whose run 1 (one round) is open; communicators a test makes are closed."""
    server = FederationServer(workspace / "server", load_kit(workspace / "server"), fl_port=0, admin_port=0)
    comms: list[Communicator] = []
    try:
        server.start_run(_mmar(tmp_path), run_number=1)
        port = server.start()
        yield server, workspace, {TASK: {"target": f"127.0.0.1:{port}"}}, comms
    finally:
        for comm in comms:
            comm.close()
        server.stop(0)


def _join(
    workspace: Path, servers: dict, site: str, comms: list[Communicator]
) -> tuple[Communicator, ClientModelManager, str]:
    mm = ClientModelManager()
    comm = Communicator(mm, ssl_args=kit_ssl_args(load_kit(workspace / site)), secure_train=True, retry_timeout=5)
    comms.append(comm)
    return comm, mm, comm.client_registration(site, servers, TASK).token


def _contribute_over_grpc(
    comm: Communicator, servers: dict, token: str, update: dict[str, np.ndarray], metrics: dict[str, float]
) -> None:
    header = pb.ModelHeader(run_number=1, round=0, kind="delta_w", weight=1.0, metrics=metrics, num_tensors=len(update))
    stub = TrainingStub(comm.set_up_channel(servers[TASK]))
    reply = stub.SubmitUpdate(
        iter([pb.ModelChunk(header=header), *encode_tensors(update)]), metadata=(("fl-token", token),), timeout=10
    )
    assert reply.accepted, reply.reason


def test_sites_share_fetch_and_score_models_over_mutual_tls_and_the_server_keeps_the_matrix(
    trained_federation, tmp_path
):
    server, ws, servers, comms = trained_federation
    comm1, mm1, token1 = _join(ws, servers, "site-1", comms)
    comm2, _, token2 = _join(ws, servers, "site-2", comms)

    with pytest.raises(CommunicationError, match="run 1 is still training; cross-site validation needs a completed"):
        comm1.get_validation_models("site-1", servers, TASK, token1, run_number=1, wait_seconds=0)
    for comm, token in ((comm1, token1), (comm2, token2)):
        _contribute_over_grpc(comm, servers, token, _update(2), {"accuracy": 0.5})
    assert server.run.phase is Phase.COMPLETED
    for comm, token in ((comm1, token1), (comm2, token2)):
        assert comm.report_metrics(servers, TASK, token, 1, {"accuracy": 0.8}).ok

    with pytest.raises(CommunicationError, match="run 7 does not exist"):
        comm1.get_validation_models("site-1", servers, TASK, token1, run_number=7, wait_seconds=0)
    comm3, _, token3 = _join(ws, servers, "site-3", comms)  # after the run: a registered site would hold the round
    with pytest.raises(CommunicationError, match="site-3 did not take part in run 1; its participants are site-1, "):
        comm3.get_validation_models("site-3", servers, TASK, token3, run_number=1, wait_seconds=0)

    best = _plus(1)
    save_model(tmp_path / "best.fl", best, {"metrics": {"accuracy": 0.75}})
    assert mm1.load_best_model(tmp_path / "best.fl")
    reply = comm1.submit_best_local_model("site-1", servers, TASK, token1, run_number=1)
    assert reply.accepted and reply.reason == "site-1's best model is offered for validation"
    reply = comm2.submit_best_local_model("site-2", servers, TASK, token2, disable=True, run_number=1)
    assert reply.accepted and reply.reason == "site-2 does not share its model for run 1"

    first = comm1.get_validation_models("site-1", servers, TASK, token1, run_number=1, wait_seconds=0)
    assert (first.status, first.owner, first.more, first.metrics) == ("validate", "site-1", True, {"accuracy": 0.75})
    for name, arr in best.items():
        np.testing.assert_array_equal(first.tensors[name], arr, err_msg=name)
    second = comm1.get_validation_models(
        "site-1", servers, TASK, token1, run_number=1, validated={"site-1"}, wait_seconds=0
    )
    assert (second.status, second.owner, second.more) == ("validate", "server", False)
    final = load_model(server.run_dir(1) / "models" / GLOBAL_MODEL)[0]
    for name, arr in final.items():
        np.testing.assert_array_equal(second.tensors[name], arr, err_msg=name)
    done = comm1.get_validation_models(
        "site-1", servers, TASK, token1, run_number=1, validated={"site-1", "server"}, wait_seconds=0
    )
    assert done.status == "end"

    ack = comm1.submit_cross_site_validation_results(
        "site-1", servers, TASK, token1, ["site-1", "server"], [{"accuracy": 0.7}, {"accuracy": 0.85}], run_number=1
    )
    assert ack.ok and ack.message == "2 result(s) recorded"
    ack = comm2.submit_cross_site_validation_results(
        "site-2", servers, TASK, token2, ["site-1"], [{"accuracy": 0.6}], run_number=1
    )
    assert not ack.ok
    assert ack.message == "results for 'site-1''s model, which was never offered to site-2 in run 1"

    matrix = server.cross_site(1).matrix()
    assert matrix["results"] == {"site-1": {"server": {"accuracy": 0.85}, "site-1": {"accuracy": 0.7}}}
    assert matrix["owners"] == ["site-1", "server"] and matrix["declined"] == ["site-2"]
    assert matrix["server_model"] == {"model": "final", "score": 0.8}

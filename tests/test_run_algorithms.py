"""FederatedRun with issue 20's aggregators and SCAFFOLD: the rounds compute what fedserver.aggregation computes,
and a restarted server carries on bit-exactly with the optimizer state, the updates on disk and the control sums."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_mmar, prepare_workspace
from test_aggregate_round import CUSTOM, EXAMPLE, _policy

from fedclient.worker import SiteTraining, WorkerSetupError
from fedcommon.algorithms import SCAFFOLD_CONTROL_PREFIX, SCAFFOLD_DELTA_PREFIX
from fedcommon.kit import load_kit
from fedcommon.mmar import ClientConfig, ServerConfig
from fedcommon.model_file import load_model, save_model
from fedcommon.run_folder import RunFolder
from fedserver.aggregation import aggregate, check_spec
from fedserver.aggregator import ContributionError
from fedserver.run import GLOBAL_MODEL, FederatedRun, Phase
from fedserver.server import FederationServer

W0 = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 4, "b": np.array([1.0, -1.0, 0.5], np.float32)}


def _config(aggregator: dict, **changes) -> ServerConfig:
    base = ServerConfig(
        task_name="t",
        min_num_clients=3,
        max_num_clients=3,
        wait_after_min_clients=30.0,
        start_round=0,
        num_rounds=3,
        heart_beat_timeout=30.0,
        exclude_vars=(),
        aggregation_weights={},
        initial_model=None,
        initial_model_file=None,
        aggregator=check_spec(aggregator),
    )
    return dataclasses.replace(base, **changes)


def _start(run_dir: Path, config: ServerConfig, resume: bool = False, scaffold: bool = False) -> FederatedRun:
    if not resume:
        (run_dir / "models").mkdir(parents=True, exist_ok=True)  # as deploying makes it
        save_model(run_dir / "models" / GLOBAL_MODEL, W0)
    client = (
        ClientConfig(
            task_name="t",
            exclude_vars=(),
            weight_by="iterations",
            retry_timeout=30.0,
            heartbeat_interval=None,
            privacy=None,
            cross_site_validate=False,
            scaffold=True,
        )
        if scaffold
        else None
    )
    return FederatedRun(1, run_dir, config, resume=resume, client=client)


def _update(round_number: int, k: int, scaffold: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 * round_number + k)
    out = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in W0.items()}
    if scaffold:
        out.update({SCAFFOLD_DELTA_PREFIX + n: rng.normal(size=v.shape).astype(np.float32) for n, v in W0.items()})
    return out


def _contribute(run: FederatedRun, site: str, update: dict[str, np.ndarray], weight: float = 1.0) -> None:
    r = run.current_round
    run.begin_contribution(site, r)
    run.commit_contribution(
        site, r, {k: np.array(v, copy=True) for k, v in update.items()}, weight, {}, lambda: {"s1", "s2", "s3"}
    )


def _rounds(
    run_dir: Path, config: ServerConfig, restart_after: set[tuple[int, int]], scaffold: bool = False
) -> FederatedRun:
    """Three rounds of three sites; a fresh FederatedRun (resume=True) after each (round, contribution) listed."""
    run = _start(run_dir, config, scaffold=scaffold)
    for rnd in range(3):
        for k, site in enumerate(("s1", "s2", "s3")):
            _contribute(run, site, _update(rnd, k, scaffold), weight=float(k + 1))
            if (rnd, k) in restart_after:
                run = _start(run_dir, config, resume=True, scaffold=scaffold)
    return run


def _expected(spec: dict, scaffold: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    model, state = dict(W0), None
    for rnd in range(3):
        contributions = [(_update(rnd, k, scaffold), float(k + 1)) for k in range(3)]
        model, state = aggregate(spec, model, contributions, state, max_weight=1e9, scaffold=scaffold)
    return model, state


@pytest.mark.parametrize(
    "spec", [{"name": "FedAdam", "args": {"eta": 0.1}}, {"name": "FedMedian"}, {"name": "FedAvgM"}]
)
def test_a_restarted_run_gives_the_model_of_an_uninterrupted_one_with_the_aggregator_state(tmp_path, spec):
    config = _config(spec, persist_open_round=True)
    choice = config.aggregator
    whole = _rounds(tmp_path / "a", config, set())
    # Restarted between rounds and inside one (the open round's sums or updates on disk come back).
    restarted = _rounds(tmp_path / "b", config, {(0, 2), (1, 0), (2, 1)})
    a, b = load_model(whole.model_path)[0], load_model(restarted.model_path)[0]
    for name in W0:
        np.testing.assert_array_equal(a[name], b[name])
    expected, _ = _expected(spec)
    for name in W0:
        np.testing.assert_allclose(a[name], expected[name], rtol=1e-6, atol=1e-6)
    summary = json.loads(restarted.summary_path.read_text())
    assert summary["aggregator"] == choice.spec() and summary["status"] == "completed"
    assert restarted.status()["aggregator"] == spec["name"]
    assert not any((tmp_path / "b" / "models" / "round_updates").glob("*.fl"))


def test_scaffold_rounds_update_the_server_control_variate_and_send_it_with_the_model(tmp_path):
    config = _config({"name": "FedAvg"}, persist_open_round=True)
    whole = _rounds(tmp_path / "a", dataclasses.replace(config, num_rounds=4), set(), scaffold=True)
    restarted = _rounds(tmp_path / "b", dataclasses.replace(config, num_rounds=4), {(0, 1), (1, 2)}, scaffold=True)
    expected, state = _expected({"name": "FedAvg"}, scaffold=True)
    for run in (whole, restarted):
        model = load_model(run.model_path)[0]
        for name in W0:
            np.testing.assert_allclose(model[name], expected[name], rtol=1e-6, atol=1e-6)
        offer = run.offer("s1", 0)
        offer.model.close()
        control = dict(offer.control)
        assert set(control) == {SCAFFOLD_CONTROL_PREFIX + n for n in W0}
        for name in W0:
            np.testing.assert_allclose(
                control[SCAFFOLD_CONTROL_PREFIX + name], state[f"scaffold_c/{name}"], rtol=1e-6, atol=1e-6
            )
    assert json.loads(whole.summary_path.read_text())["site_algorithms"] == ["SCAFFOLD"]


def test_a_scaffold_contribution_without_its_control_delta_is_refused_alone(tmp_path):
    run = _start(tmp_path / "r", _config({"name": "FedAvg"}), scaffold=True)
    run.begin_contribution("s1", 0)
    with pytest.raises(ContributionError, match="SCAFFOLD delta c missing"):
        run.commit_contribution("s1", 0, _update(0, 0), 1.0, {}, lambda: {"s1", "s2", "s3"})
    run.abandon_contribution("s1", 0, "refused")
    _contribute(run, "s2", _update(0, 1, scaffold=True))
    assert run.status()["contributors"] == ["s2"]


def test_a_krum_round_with_too_few_contributions_is_refused_and_the_model_kept(tmp_path):
    run = _start(tmp_path / "r", _config({"name": "Krum", "args": {"num_malicious": 1}}))
    for k, site in enumerate(("s1", "s2", "s3")):
        _contribute(run, site, _update(0, k))
    assert run.current_round == 0 and run.status()["contributors"] == []
    assert not any((tmp_path / "r" / "models" / "round_updates").glob("*.fl"))
    np.testing.assert_array_equal(load_model(run.model_path)[0]["w"], W0["w"])


@pytest.mark.parametrize("name", ["Momentum", "Largest", "Poison"])
def test_a_custom_aggregator_aggregates_the_rounds_in_the_sandboxed_child(tmp_path, name):
    run_dir = tmp_path / "r"
    mmar = RunFolder(run_dir).mmar
    shutil.copytree(EXAMPLE, mmar)
    (mmar / "custom" / "my_aggregators.py").write_text(CUSTOM)
    spec = {"path": f"my_aggregators.{name}", "args": {}}
    config = _config(spec, num_rounds=2)
    (run_dir / "models").mkdir(parents=True, exist_ok=True)  # as deploying makes it
    save_model(run_dir / "models" / GLOBAL_MODEL, W0)
    run = FederatedRun(1, run_dir, config, code_policy=_policy())
    for rnd in range(2):
        for k, site in enumerate(("s1", "s2", "s3")):
            _contribute(run, site, _update(rnd, k), weight=float(k + 1))
    model = load_model(run.model_path)[0]
    if name == "Poison":  # a non-finite aggregate: the round is refused, the model kept
        assert run.current_round == 0 and run.phase is Phase.TRAINING
        np.testing.assert_array_equal(model["w"], W0["w"])
        return
    expected, state = W0, None
    for rnd in range(2):
        contributions = [(_update(rnd, k), float(k + 1)) for k in range(3)]
        expected, state = aggregate(spec, expected, contributions, state, search_paths=[mmar / "custom"])
    assert run.phase is Phase.COMPLETED
    for n in W0:
        np.testing.assert_allclose(model[n], expected[n], rtol=1e-6, atol=1e-6)
    assert json.loads(run.summary_path.read_text())["aggregator"] == spec


@pytest.mark.parametrize(
    ("server", "client", "why"),
    [
        ({"aggregator": {"path": "my_aggregators.Momentum"}}, {"scaffold": True}, "SCAFFOLD with a custom aggregator"),
        (None, {"scaffold": True, "privacy": {"name": "LaplacianProtocol"}}, "SCAFFOLD with a privacy filter"),
    ],
)
def test_a_run_combining_algorithms_the_rounds_cannot_run_is_refused_at_start(tmp_path, server, client, why):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    mmar = copy_mmar(tmp_path / "mmar", server=server, client=client)
    (mmar / "custom" / "my_aggregators.py").write_text(CUSTOM)
    fed = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0, admin_port=0)
    try:
        with pytest.raises(Exception, match=why):
            fed.start_run(mmar, 1)
    finally:
        fed.stop(0)


def test_a_site_refuses_scaffold_with_a_privacy_filter(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    mmar = copy_mmar(tmp_path / "mmar", client={"scaffold": True, "privacy": {"name": "LaplacianProtocol"}})
    with pytest.raises(WorkerSetupError, match="delta c_i carries the unfiltered local update"):
        SiteTraining(ws / "site-1", mmar)

"""A custom aggregator runs in a sandboxed child (fedserver.aggregate_round) and gives what aggregate() gives."""

import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedcommon.algorithms import AggregatorChoice
from fedcommon.model_file import load_model, save_model
from fedserver.aggregate_round import aggregate_in_child
from fedserver.aggregation import AggregateError, StateFiles, UpdateStore, aggregate
from fedserver.aggregator import VarSpec
from fedserver.untrusted_code import CodePolicy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"
CUSTOM = textwrap.dedent('''
    import numpy as np
    from fedserver.aggregation import Aggregator

    class Momentum(Aggregator):
        """x <- x + 0.5 * m, m <- m + mean: a streaming aggregator with state."""
        state_slots = ("m",)
        def step(self, name, x, delta, state):
            state["m"] += delta
            return x + 0.5 * state["m"]

    class Largest(Aggregator):
        """x <- x + the update with the largest weight: one that needs every update."""
        needs_all_updates = True
        def combine(self, name, updates):
            return np.array(updates.arrays[int(np.argmax(updates.weights))])

    class Poison(Aggregator):
        def step(self, name, x, delta, state):
            return x * np.nan
''')
MODEL = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([10, 20])}
ROUNDS = [
    [
        ({"w": np.array([1, 0], np.float32), "n": np.array([2, 2])}, 1.0),
        ({"w": np.array([3, 4], np.float32), "n": np.array([4, 4])}, 3.0),
    ],
    [
        ({"w": np.array([0, 2], np.float32), "n": np.array([1, 1])}, 2.0),
        ({"w": np.array([2, -2], np.float32), "n": np.array([1, 1])}, 1.0),
    ],
]


@pytest.fixture
def mmar(tmp_path: Path) -> Path:
    root = Path(shutil.copytree(EXAMPLE, tmp_path / "mmar"))
    (root / "custom" / "my_aggregators.py").write_text(CUSTOM)
    return root


def _policy() -> CodePolicy:
    # As root the child becomes nobody; otherwise the test allows it to run as this user.
    return CodePolicy() if os.geteuid() == 0 else CodePolicy(allow_as_server_user=True)


def _server_rounds(mmar: Path, tmp_path: Path, choice: AggregatorChoice) -> dict:
    run = tmp_path / "run"
    run.mkdir()
    model_path, states = run / "global.fl", StateFiles(run)
    save_model(model_path, MODEL)
    specs = {k: VarSpec(v.dtype, v.shape) for k, v in MODEL.items()}
    for number, contributions in enumerate(ROUNDS):
        store = UpdateStore(run / "updates", specs)
        for update, weight in contributions:
            store.add({k: v.copy() for k, v in update.items()}, weight)
        aggregate_in_child(
            mmar,
            _policy(),
            "run 1",
            choice,
            model_path,
            states,
            number,
            {"round": number + 1},
            frozenset(),
            run / "updates",
            1e9,
            timeout=120,
        )
        store.clear()
    return load_model(model_path)[0]


@pytest.mark.parametrize("name", ["Momentum", "Largest"])
def test_a_custom_aggregator_in_the_child_equals_aggregate(mmar, tmp_path, name):
    choice = AggregatorChoice(name=None, path=f"my_aggregators.{name}", args={})
    x, state = MODEL, None
    for contributions in ROUNDS:
        x, state = aggregate(choice, x, contributions, state, search_paths=[mmar / "custom"])
    on_server = _server_rounds(mmar, tmp_path, choice)
    for k in MODEL:
        np.testing.assert_array_equal(on_server[k], x[k])


def test_a_custom_aggregator_that_writes_nan_fails_the_round_and_keeps_the_model(mmar, tmp_path):
    choice = AggregatorChoice(name=None, path="my_aggregators.Poison", args={})
    with pytest.raises(
        AggregateError,
        match=r"custom aggregator my_aggregators.Poison: AggregateError: variable "
        r"'w' of the aggregate is not finite",
    ):
        _server_rounds(mmar, tmp_path, choice)
    np.testing.assert_array_equal(load_model(tmp_path / "run" / "global.fl")[0]["w"], MODEL["w"])
    assert not list((tmp_path / "run").glob("aggregator_state_*"))

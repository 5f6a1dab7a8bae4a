"""Tests of the digits example's trainer, built the way the site worker builds it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedcommon.components import ComponentError, build_component
from fedcommon.mmar import MMAR, Component, load_mmar

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"
NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def mmar() -> MMAR:
    """The example, loaded and validated."""
    return load_mmar(EXAMPLE)


def make_trainer(mmar: MMAR, site_name: str, run_dir: Path, **args: object) -> object:
    """A DigitsTrainer for `site_name` with the example's args, overridden by `args`."""
    component = Component(mmar.train.trainer.path, {**mmar.train.trainer.args, **args})
    return build_component(component, [mmar.custom_dir], site_name=site_name, run_dir=str(run_dir))


def test_sites_hold_disjoint_stratified_shards_of_all_the_digits(mmar: MMAR, tmp_path: Path) -> None:
    sites = [make_trainer(mmar, f"site-{k}", tmp_path) for k in (1, 2)]
    parts = [set(part.tolist()) for t in sites for part in (t.train_index, t.held_out_index)]

    assert sum(len(p) for p in parts) == len(set().union(*parts)) == NUM_DIGITS
    labels = load_digits().target
    for t in sites:
        per_class = np.bincount(labels[t.train_index], minlength=10)
        assert per_class.min() >= 70 and per_class.max() <= 75
        assert t.num_samples() == len(t.train_index)
        assert abs(len(t.train_index) / (len(t.train_index) + len(t.held_out_index)) - 0.8) < 0.01


def test_every_site_computes_the_same_split_whatever_its_seed(mmar: MMAR, tmp_path: Path) -> None:
    a = make_trainer(mmar, "site-2", tmp_path, seed=0)
    b = make_trainer(mmar, "site-2", tmp_path, seed=7)

    assert np.array_equal(a.train_index, b.train_index)
    assert np.array_equal(a.held_out_index, b.held_out_index)


def test_fresh_model_is_near_chance(mmar: MMAR, tmp_path: Path) -> None:
    metrics = make_trainer(mmar, "site-1", tmp_path).validate()

    assert metrics["accuracy"] < 0.3
    assert metrics["loss"] > 2.0


def test_two_local_phases_reach_over_80_percent(mmar: MMAR, tmp_path: Path) -> None:
    trainer = make_trainer(mmar, "site-1", tmp_path)
    seen: list[tuple[int, float]] = []

    first = trainer.train(progress=lambda epoch, loss: seen.append((epoch, loss)))
    after_one = trainer.validate()
    second = trainer.train()
    after_two = trainer.validate()

    epochs = mmar.train.trainer.args["epochs_per_round"]
    assert [epoch for epoch, _ in seen] == list(range(1, epochs + 1))
    assert seen[-1][1] == pytest.approx(first["loss"])
    assert second["loss"] < first["loss"]
    assert after_one["accuracy"] > 0.8
    assert after_two["accuracy"] > max(0.8, after_one["accuracy"] - 0.02)
    assert after_two["loss"] < after_one["loss"]


def test_iterations_and_samples_are_consistent(mmar: MMAR, tmp_path: Path) -> None:
    trainer = make_trainer(mmar, "site-2", tmp_path)
    args = mmar.train.trainer.args

    assert trainer.num_local_iterations() == 0
    result = trainer.train()

    batches_per_epoch = -(-trainer.num_samples() // args["batch_size"])
    assert trainer.num_samples() == len(trainer.train_index)
    assert trainer.num_local_iterations() == result["steps"] == args["epochs_per_round"] * batches_per_epoch


def test_training_is_deterministic_for_a_seed(mmar: MMAR, tmp_path: Path) -> None:
    a = make_trainer(mmar, "site-1", tmp_path, seed=3)
    b = make_trainer(mmar, "site-1", tmp_path, seed=3)

    a.train()
    b.train()

    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_training_continues_from_a_replaced_global_model(mmar: MMAR, tmp_path: Path) -> None:
    trainer = make_trainer(mmar, "site-1", tmp_path)
    trainer.train()
    global_model = build_component(mmar.server.initial_model, [mmar.custom_dir])

    trainer.model.load_state_dict(global_model.state_dict())
    assert trainer.validate()["accuracy"] < 0.3
    trainer.train()

    assert trainer.validate()["accuracy"] > 0.8


def test_initial_model_matches_the_trainers_model(mmar: MMAR, tmp_path: Path) -> None:
    global_model = build_component(mmar.server.initial_model, [mmar.custom_dir])
    local = make_trainer(mmar, "site-1", tmp_path).model.state_dict()

    assert isinstance(global_model, torch.nn.Module)
    assert {k: v.shape for k, v in global_model.state_dict().items()} == {k: v.shape for k, v in local.items()}


@pytest.mark.parametrize("site_name", ["site-3", "site-0", "hospital-1", "site-1x", "site-"])
def test_site_name_outside_the_shards_is_refused(mmar: MMAR, tmp_path: Path, site_name: str) -> None:
    with pytest.raises(ComponentError) as info:
        make_trainer(mmar, site_name, tmp_path)

    message = str(info.value)
    assert "ValueError" in message
    assert repr(site_name) in message
    assert "num_sites=2" in message


def test_the_example_projects_hospitals_get_the_shards_the_config_maps_them_to(mmar: MMAR, tmp_path: Path) -> None:
    for hospital, site in (("hospital-a", "site-1"), ("hospital-b", "site-2")):
        by_name = make_trainer(mmar, hospital, tmp_path)
        by_number = make_trainer(mmar, site, tmp_path)
        np.testing.assert_array_equal(by_name.train_index, by_number.train_index)
    with pytest.raises(ComponentError, match="hospital-a, hospital-b"):
        make_trainer(mmar, "hospital-c", tmp_path)


def test_the_digits_read_from_scikit_learns_file_are_load_digits_own(mmar: MMAR, tmp_path: Path) -> None:
    trainer = make_trainer(mmar, "site-1", tmp_path)
    module = __import__(type(trainer).__module__)
    pixels, labels = module._digits()

    reference = load_digits()
    assert module._bundled_digits() is not None  # read from the file, not through load_digits
    assert np.array_equal(labels, reference.target)
    assert np.array_equal(pixels, (reference.data / 16.0).astype(np.float32))
    assert pixels.dtype == np.float32 and labels.dtype == np.int64

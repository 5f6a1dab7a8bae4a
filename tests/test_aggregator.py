"""Weighted streamed aggregation: the DESIGN §7 formula, exclusion, and refusal of bad updates."""

import io

import ml_dtypes
import numpy as np
import pytest

from fedcommon.model_file import ModelFileWriter, load_model, read_index, save_model
from fedcommon.tensor_codec import TensorSpec
from fedserver.aggregator import ContributionError, UpdateAccumulator, VarSpec


def _specs(model):
    return {k: VarSpec(v.dtype, v.shape) for k, v in model.items()}


def _apply(tmp_path, model, acc):
    save_model(tmp_path / "g.fl", model)
    out = io.BytesIO()
    with open(tmp_path / "g.fl", "rb") as src:
        index = read_index(src)
        writer = ModelFileWriter(out, [(e.name, e.dtype, e.shape) for e in index.entries], {})
        acc.apply_to(index, src, writer)
    (tmp_path / "new.fl").write_bytes(out.getvalue())
    return load_model(tmp_path / "new.fl")[0]


def test_weighted_average_of_updates_matches_the_formula(tmp_path):
    rng = np.random.default_rng(0)
    w = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(5)}
    d1 = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in w.items()}
    d2 = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in w.items()}
    acc = UpdateAccumulator(_specs(w))
    acc.add({k: v.copy() for k, v in d1.items()}, 3.0)
    acc.add({k: v.copy() for k, v in d2.items()}, 1.0)
    new = _apply(tmp_path, w, acc)
    for k in w:
        expected = w[k] + (3.0 * d1[k] + 1.0 * d2[k]) / 4.0
        np.testing.assert_allclose(new[k], expected, rtol=1e-6, atol=1e-6)
        assert new[k].dtype == w[k].dtype


def test_variable_sent_by_only_some_sites_is_averaged_over_those(tmp_path):
    w = {"shared": np.zeros(2, np.float32), "partial": np.zeros(2, np.float32)}
    acc = UpdateAccumulator(_specs(w))
    acc.add({"shared": np.full(2, 1.0, np.float32), "partial": np.full(2, 4.0, np.float32)}, 1.0)
    acc.add({"shared": np.full(2, 3.0, np.float32)}, 1.0)
    new = _apply(tmp_path, w, acc)
    np.testing.assert_allclose(new["shared"], [2.0, 2.0])
    np.testing.assert_allclose(new["partial"], [4.0, 4.0])


def test_bfloat16_and_integer_variables_keep_their_dtype(tmp_path):
    w = {"h": np.array([1.0, 2.0], dtype=ml_dtypes.bfloat16), "n": np.array([10, 20], np.int64)}
    acc = UpdateAccumulator(_specs(w))
    acc.add({"h": np.array([0.5, 0.5], dtype=ml_dtypes.bfloat16), "n": np.array([2, 3], np.int64)}, 1.0)
    acc.add({"h": np.array([1.5, 1.5], dtype=ml_dtypes.bfloat16), "n": np.array([4, 4], np.int64)}, 1.0)
    new = _apply(tmp_path, w, acc)
    assert new["h"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(new["h"].astype(np.float32), [2.0, 3.0])
    np.testing.assert_array_equal(new["n"], [13, 24])


def test_unchanged_when_nobody_sent_a_variable(tmp_path):
    w = {"a": np.arange(3, dtype=np.float32)}
    new = _apply(tmp_path, w, UpdateAccumulator(_specs(w)))
    np.testing.assert_array_equal(new["a"], w["a"])


@pytest.mark.parametrize(
    "spec, message",
    [
        (TensorSpec("nope", np.dtype(np.float32), (2,)), "unknown variable 'nope'"),
        (TensorSpec("a", np.dtype(np.float64), (2,)), "dtype float64"),
        (TensorSpec("a", np.dtype(np.float32), (3,)), r"shape \[3\]"),
    ],
)
def test_tensor_not_fitting_the_model_is_refused(spec, message):
    acc = UpdateAccumulator({"a": VarSpec(np.dtype(np.float32), (2,))})
    with pytest.raises(ContributionError, match=message):
        acc.check_tensor(spec)


def test_excluded_variable_is_skipped_not_refused():
    acc = UpdateAccumulator({"a": VarSpec(np.dtype(np.float32), (2,))}, frozenset({"a"}))
    assert acc.check_tensor(TensorSpec("a", np.dtype(np.float32), (2,))) is False


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad):
    with pytest.raises(ContributionError, match="NaN or Inf"):
        UpdateAccumulator.check_finite("a", np.array([0.0, bad], np.float32))


def test_non_positive_weight_is_refused():
    acc = UpdateAccumulator({"a": VarSpec(np.dtype(np.float32), (1,))})
    with pytest.raises(ContributionError, match="positive"):
        acc.add({"a": np.ones(1, np.float32)}, 0.0)

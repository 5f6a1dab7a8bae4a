"""The built-in aggregators against hand-computed values for two rounds, the server's file path, and bad input."""

import io
import math
import os
import textwrap

import ml_dtypes
import numpy as np
import pytest

from fedcommon.model_file import DIRECT_MIN_BYTES, ModelFileError, ModelFileWriter, load_model, read_index, save_model
from fedserver.aggregation import (
    AggregateError,
    ContributionError,
    StateFiles,
    UpdateStore,
    aggregate,
    build_aggregator,
    check_spec,
    control_accumulator,
    control_tensors,
    load_state,
    save_state,
    scaffold_control_update,
    split_scaffold,
    store_deltas,
    tensors_ahead,
    write_next_model,
)
from fedserver.aggregator import UpdateAccumulator, VarSpec

# Two sites, two rounds, for the streaming family. Round 1: weights 1 and 3, mean = ([1,0] + 3*[3,4]) / 4 = [2.5, 3].
# Round 2: weights 1 and 1, mean = ([0,2] + [2,-2]) / 2 = [1, 0].
X0 = {"w": np.array([1.0, 2.0])}
ROUND_1 = [({"w": np.array([1.0, 0.0])}, 1.0), ({"w": np.array([3.0, 4.0])}, 3.0)]
ROUND_2 = [({"w": np.array([0.0, 2.0])}, 1.0), ({"w": np.array([2.0, -2.0])}, 1.0)]


def two_rounds(spec, x0=X0, round_1=ROUND_1, round_2=ROUND_2, **kwargs):
    x1, state = aggregate(spec, x0, round_1, None, **kwargs)
    x2, state = aggregate(spec, x1, round_2, state, **kwargs)
    return x1, x2, state


def test_fedavg_adds_the_weighted_mean():
    x1, x2, _ = two_rounds({"name": "FedAvg"})
    np.testing.assert_allclose(x1["w"], [3.5, 5.0])
    np.testing.assert_allclose(x2["w"], [4.5, 5.0])


def test_fedavgm_keeps_server_momentum_across_rounds():
    # m1 = [2.5, 3], x1 = x0 + 0.5*m1; m2 = 0.9*m1 + [1, 0] = [3.25, 2.7], x2 = x1 + 0.5*m2.
    x1, x2, state = two_rounds({"name": "FedAvgM", "args": {"server_lr": 0.5, "server_momentum": 0.9}})
    np.testing.assert_allclose(x1["w"], [2.25, 3.5])
    np.testing.assert_allclose(x2["w"], [3.875, 4.85])
    np.testing.assert_allclose(state["m/w"], [3.25, 2.7])
    assert state["aggregator"] == "FedAvgM" and state["rounds"] == 2


FEDOPT_ARGS = {"eta": 0.1, "beta_1": 0.5, "beta_2": 0.5, "tau": 0.5}


def test_fedadam_two_rounds():
    # v0 = tau^2 = 0.25; m1 = 0.5*[2.5, 3]; v1 = 0.5*0.25 + 0.5*[6.25, 9]; m2 = 0.5*m1 + 0.5*[1, 0];
    # v2 = 0.5*v1 + 0.5*[1, 0]; x <- x + 0.1*m/(sqrt(v)+0.5).
    x1, x2, state = two_rounds({"name": "FedAdam", "args": FEDOPT_ARGS})
    e1 = [1 + 0.1 * 1.25 / (math.sqrt(3.25) + 0.5), 2 + 0.1 * 1.5 / (math.sqrt(4.625) + 0.5)]
    e2 = [e1[0] + 0.1 * 1.125 / (math.sqrt(2.125) + 0.5), e1[1] + 0.1 * 0.75 / (math.sqrt(2.3125) + 0.5)]
    np.testing.assert_allclose(x1["w"], e1, rtol=1e-12)
    np.testing.assert_allclose(x2["w"], e2, rtol=1e-12)
    np.testing.assert_allclose(state["m/w"], [1.125, 0.75])
    np.testing.assert_allclose(state["v/w"], [2.125, 2.3125])


def test_fedyogi_two_rounds_with_both_signs():
    # v1 = 0.25 - 0.5*[6.25, 9]*sign(0.25 - [6.25, 9]) = [3.375, 4.75];
    # v2 = v1 - 0.5*[1, 0]*sign(v1 - [1, 0]) = [2.875, 4.75].
    x1, x2, state = two_rounds({"name": "FedYogi", "args": FEDOPT_ARGS})
    e1 = [1 + 0.1 * 1.25 / (math.sqrt(3.375) + 0.5), 2 + 0.1 * 1.5 / (math.sqrt(4.75) + 0.5)]
    e2 = [e1[0] + 0.1 * 1.125 / (math.sqrt(2.875) + 0.5), e1[1] + 0.1 * 0.75 / (math.sqrt(4.75) + 0.5)]
    np.testing.assert_allclose(x1["w"], e1, rtol=1e-12)
    np.testing.assert_allclose(x2["w"], e2, rtol=1e-12)
    np.testing.assert_allclose(state["v/w"], [2.875, 4.75])


def test_fedadagrad_two_rounds():
    # v1 = 0.25 + [6.25, 9] = [6.5, 9.25]; v2 = v1 + [1, 0] = [7.5, 9.25].
    args = {k: v for k, v in FEDOPT_ARGS.items() if k != "beta_2"}
    x1, x2, state = two_rounds({"name": "FedAdagrad", "args": args})
    e1 = [1 + 0.1 * 1.25 / (math.sqrt(6.5) + 0.5), 2 + 0.1 * 1.5 / (math.sqrt(9.25) + 0.5)]
    e2 = [e1[0] + 0.1 * 1.125 / (math.sqrt(7.5) + 0.5), e1[1] + 0.1 * 0.75 / (math.sqrt(9.25) + 0.5)]
    np.testing.assert_allclose(x1["w"], e1, rtol=1e-12)
    np.testing.assert_allclose(x2["w"], e2, rtol=1e-12)
    np.testing.assert_allclose(state["v/w"], [7.5, 9.25])


def _f32(*rows):
    return [({"w": np.array(r, np.float32)}, w) for r, w in rows]


ZERO3 = {"w": np.zeros(3, np.float32)}
MEDIAN_1 = _f32(([1, 5, -1], 1.0), ([2, -3, 0], 5.0), ([10, 0, 4], 1.0), ([3, 1, 2], 1.0))
MEDIAN_2 = _f32(([1, 1, 1], 1.0), ([0, 7, -2], 1.0), ([-5, 2, 3], 1.0))


def test_fedmedian_two_rounds_ignores_weights():
    # Round 1 (n = 4): medians of [1,2,3,10], [-3,0,1,5], [-1,0,2,4] = [2.5, 0.5, 1]; round 2 (n = 3): [0, 2, 1].
    x1, x2, _ = two_rounds({"name": "FedMedian"}, ZERO3, MEDIAN_1, MEDIAN_2)
    np.testing.assert_array_equal(x1["w"], [2.5, 0.5, 1.0])
    np.testing.assert_array_equal(x2["w"], [2.5, 2.5, 2.0])
    assert x2["w"].dtype == np.float32


def test_fedtrimmedavg_drops_floor_beta_n_from_each_end():
    # Round 1: n = 5, beta 0.2 drops 1 each side: means of [1,2,3], [0,1,2], [0,2,4] = [2, 1, 2].
    # Round 2: n = 3, floor(0.6) = 0: the plain mean [-4/3, 10/3, 2/3].
    round_1 = [*MEDIAN_1, *_f32(([-4, 2, 6], 1.0))]
    x1, x2, _ = two_rounds({"name": "FedTrimmedAvg", "args": {"beta": 0.2}}, ZERO3, round_1, MEDIAN_2)
    np.testing.assert_allclose(x1["w"], [2.0, 1.0, 2.0])
    np.testing.assert_allclose(x2["w"], [2 / 3, 13 / 3, 8 / 3], rtol=1e-6)


def _krum_updates(rows, weights):
    return [
        ({"a": np.array(a, np.float32), "b": np.array(b, np.float32)}, w)
        for (a, b), w in zip(rows, weights, strict=True)
    ]


# Round 1: squared distances over both variables: d12=1, d13=2, d14=300, d23=3, d24=281, d34=302; with f = 0 each
# score sums the n-f-2 = 2 nearest: s1 = 3, s2 = 4, s3 = 5, s4 = 581.
KRUM_1 = [([1, 1], [1]), ([2, 1], [1]), ([1, 2], [2]), ([11, 11], [-9])]
# Round 2 (b equal everywhere): d12=1, d13=9, d14=50, d23=10, d24=41, d34=29: s1 = 10, s2 = 11, s3 = 19, s4 = 70.
KRUM_2 = [([1, 1], [0.5]), ([2, 1], [0.5]), ([1, 4], [0.5]), ([6, 6], [0.5])]
ZERO_AB = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}


def test_krum_takes_the_update_with_the_lowest_score():
    x1, x2, _ = two_rounds(
        {"name": "Krum"}, ZERO_AB, _krum_updates(KRUM_1, [1, 1, 1, 1]), _krum_updates(KRUM_2, [1, 1, 1, 1])
    )
    np.testing.assert_array_equal(x1["a"], [1, 1])
    np.testing.assert_array_equal(x1["b"], [1])
    np.testing.assert_array_equal(x2["a"], [2, 2])
    np.testing.assert_array_equal(x2["b"], [1.5])


def test_multikrum_averages_the_selected_with_their_weights():
    # Round 1 selects s1, s2 (weights 1, 3): a = ([1,1] + 3*[2,1])/4 = [1.75, 1], b = 1.
    # Round 2 selects s1, s2 (weights 1, 1; s3's weight 2 does not count): a = [1.5, 1], b = 0.5.
    spec = {"name": "MultiKrum", "args": {"num_selected": 2}}
    x1, x2, _ = two_rounds(spec, ZERO_AB, _krum_updates(KRUM_1, [1, 3, 1, 1]), _krum_updates(KRUM_2, [1, 1, 2, 1]))
    np.testing.assert_allclose(x1["a"], [1.75, 1])
    np.testing.assert_allclose(x1["b"], [1])
    np.testing.assert_allclose(x2["a"], [3.25, 2])
    np.testing.assert_allclose(x2["b"], [1.5])


def test_krum_refuses_a_round_of_at_most_2f_plus_2_contributions():
    with pytest.raises(AggregateError, match=r"num_malicious=1 needs more than 4 contributions, the round has 4"):
        aggregate({"name": "Krum", "args": {"num_malicious": 1}}, ZERO_AB, _krum_updates(KRUM_1, [1] * 4), None)
    with pytest.raises(AggregateError, match="num_selected=5 is more than the round's 4 contributions"):
        aggregate({"name": "MultiKrum", "args": {"num_selected": 5}}, ZERO_AB, _krum_updates(KRUM_1, [1] * 4), None)


def test_fedavg_equals_the_update_accumulator_exactly(tmp_path):
    rng = np.random.default_rng(3)
    model = {
        "f32": rng.standard_normal((5, 4)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "bf16": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "i64": np.arange(4, dtype=np.int64),
        "f64": rng.standard_normal(6),
    }
    updates = [
        (
            {
                k: rng.standard_normal(v.shape).astype(v.dtype)
                if v.dtype.kind != "i"
                else rng.integers(-5, 5, v.shape).astype(v.dtype)
                for k, v in model.items()
            },
            w,
        )
        for w in (30.0, 7.0, 12.0)
    ]
    new, _ = aggregate({"name": "FedAvg"}, model, updates, None, max_weight=100.0)

    acc = UpdateAccumulator({k: VarSpec(v.dtype, v.shape) for k, v in model.items()}, max_weight=100.0)
    for update, weight in updates:
        acc.add({k: v.copy() for k, v in update.items()}, weight)
    save_model(tmp_path / "g.fl", model)
    out = io.BytesIO()
    with open(tmp_path / "g.fl", "rb") as src:
        index = read_index(src)
        acc.apply_to(index, src, ModelFileWriter(out, [(e.name, e.dtype, e.shape) for e in index.entries], {}))
    (tmp_path / "new.fl").write_bytes(out.getvalue())
    today = load_model(tmp_path / "new.fl")[0]
    for name in model:
        assert new[name].dtype == model[name].dtype
        np.testing.assert_array_equal(new[name], today[name])
    # aggregate() leaves the caller's arrays alone
    assert updates[0][0]["f32"].flags.writeable


def test_state_saved_between_rounds_gives_the_same_model(tmp_path):
    spec = {"name": "FedAdam", "args": FEDOPT_ARGS}
    _, x2, _ = two_rounds(spec)
    x1, state = aggregate(spec, X0, ROUND_1, None)
    save_state(tmp_path / "state.fl", state)
    restarted, _ = aggregate(spec, x1, ROUND_2, load_state(tmp_path / "state.fl"))
    np.testing.assert_array_equal(restarted["w"], x2["w"])


def test_a_state_of_another_aggregator_is_refused():
    _, state = aggregate({"name": "FedAvgM"}, X0, ROUND_1, None)
    with pytest.raises(ValueError, match="state is of 'FedAvgM', the run aggregates with 'FedAdam'"):
        aggregate({"name": "FedAdam"}, X0, ROUND_2, state)


def test_server_files_path_equals_aggregate_and_survives_a_restart(tmp_path):
    spec = {"name": "FedYogi", "args": FEDOPT_ARGS}
    model = {"w": np.array([1.0, 2.0]), "steps": np.array([10, 20], np.int64), "frozen": np.ones(2, np.float32)}
    excluded = frozenset({"frozen"})
    rounds = [
        [
            ({"w": np.array([1.0, 0.0]), "steps": np.array([1, 1], np.int64)}, 1.0),
            ({"w": np.array([3.0, 4.0]), "steps": np.array([3, 2], np.int64)}, 3.0),
        ],
        [
            ({"w": np.array([0.0, 2.0]), "steps": np.array([2, 0], np.int64)}, 1.0),
            ({"w": np.array([2.0, -2.0]), "steps": np.array([0, 0], np.int64)}, 1.0),
        ],
    ]
    x, state = model, None
    for contributions in rounds:
        x, state = aggregate(spec, x, contributions, state, excluded=excluded)

    path = tmp_path / "global.fl"
    save_model(path, model)
    for number, contributions in enumerate(rounds):
        aggregator = build_aggregator(check_spec(spec))  # a fresh one per round: the state comes from disk
        acc = UpdateAccumulator({k: VarSpec(v.dtype, v.shape) for k, v in model.items()}, excluded)
        for update, weight in contributions:
            acc.add({k: v.copy() for k, v in update.items()}, weight)
        write_next_model(
            aggregator, "FedYogi", acc.take_mean, path, StateFiles(tmp_path), number, {"round": number + 1}, excluded
        )
    on_disk, meta = load_model(path)
    assert meta == {"round": 2}
    for name in model:
        np.testing.assert_array_equal(on_disk[name], x[name])
    assert [p.name for p in tmp_path.glob("aggregator_state_*")] == ["aggregator_state_2.fl"]
    saved = StateFiles(tmp_path).load(2)
    np.testing.assert_array_equal(saved["v/w"], state["v/w"])
    assert "m/frozen" not in saved and saved["rounds"] == 2


def test_a_failed_round_replaces_neither_model_nor_state(tmp_path):
    path = tmp_path / "global.fl"
    save_model(path, {"w": np.full(2, 3e38, np.float32)})
    before = path.read_bytes()
    with pytest.raises(AggregateError, match="'w' of the aggregate is not finite"):
        write_next_model(
            build_aggregator(check_spec({"name": "FedAvgM"})),
            "FedAvgM",
            lambda name: np.full(2, 3e38, np.float32),
            path,
            StateFiles(tmp_path),
            0,
            {},
        )
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("aggregator_state_*")) and not list(tmp_path.glob(".*tmp"))


def _uncached_model(path, tensors):
    save_model(path, tensors)
    with open(path, "rb") as f:  # as the server's model, written with direct I/O: not in the page cache
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def test_the_close_reads_each_model_tensor_ahead_into_two_reused_buffers(tmp_path):
    rng = np.random.default_rng(7)
    big = DIRECT_MIN_BYTES // 4 + 3  # float32 elements: a direct read whose length is not whole blocks
    tensors = {
        "a": rng.standard_normal(big).astype(np.float32),
        "small": rng.integers(-9, 9, (3, 5), dtype=np.int64),
        "b": rng.standard_normal((big // 7, 7)).astype(np.float32),
        "half": rng.standard_normal(1001).astype(np.float16),
        "c": rng.standard_normal(big).astype(np.float32),
    }
    path = tmp_path / "global.fl"
    _uncached_model(path, tensors)
    seen = []
    with open(path, "rb") as f:
        for entry, x in tensors_ahead(f, read_index(f, path), path):
            np.testing.assert_array_equal(x, tensors[entry.name])  # the read of the next one has not touched it
            assert x.dtype == tensors[entry.name].dtype and x.flags.writeable
            x[...] = 0  # the caller may overwrite it (the step does)
            seen.append((entry.name, x))
    assert [name for name, _ in seen] == list(tensors)
    assert np.shares_memory(seen[0][1], seen[2][1]) and np.shares_memory(seen[2][1], seen[4][1])
    assert not np.shares_memory(seen[0][1], seen[1][1])


def test_a_model_file_cut_short_fails_the_close_naming_the_tensor(tmp_path):
    path = tmp_path / "global.fl"
    _uncached_model(path, {"a": np.ones(DIRECT_MIN_BYTES, np.float32), "b": np.ones(DIRECT_MIN_BYTES, np.float32)})
    with open(path, "rb") as f:
        index = read_index(f, path)
        os.truncate(path, index.by_name()["b"].offset + 100)
        with pytest.raises(ModelFileError, match="tensor 'b'.*ends early"):
            for _ in tensors_ahead(f, index, path):
                pass


def test_updates_of_the_needs_all_family_are_memory_mapped_from_disk(tmp_path):
    specs = {"w": VarSpec(np.dtype(np.float16), (3,)), "n": VarSpec(np.dtype(np.int64), (2,))}
    store = UpdateStore(tmp_path / "round", specs)
    store.add({"w": np.array([1, 2, 3], np.float16), "n": np.array([1, 2])}, 2.0, "site-1")
    store.add({"w": np.array([3, 2, 1], np.float16), "n": np.array([3, 4])}, 1.0, "site-2")
    updates = store.variable("w")
    assert all(isinstance(a, np.memmap) for a in updates.arrays)
    assert updates.dtype == np.float32  # the accumulator dtype of float16
    np.testing.assert_array_equal(updates.weights, [2.0, 1.0])
    # A server that restarts mid-round finds the round's updates again.
    reopened = UpdateStore(tmp_path / "round", specs)
    assert reopened.sites == ["site-1", "site-2"]
    median = store_deltas(build_aggregator(check_spec({"name": "FedMedian"})), reopened)
    np.testing.assert_array_equal(median("w"), [2, 2, 2])
    np.testing.assert_array_equal(median("n"), [2, 3])
    reopened.clear()
    assert len(UpdateStore(tmp_path / "round", specs)) == 0


def test_the_needs_all_family_reads_large_variables_in_blocks(monkeypatch):
    monkeypatch.setattr("fedserver.aggregation.BLOCK_BYTES", 64)
    rng = np.random.default_rng(1)
    updates = [({"w": rng.standard_normal(1000).astype(np.float32)}, 1.0) for _ in range(5)]
    stacked = np.stack([u["w"] for u, _ in updates])
    new, _ = aggregate({"name": "FedMedian"}, {"w": np.zeros(1000, np.float32)}, updates, None)
    np.testing.assert_array_equal(new["w"], np.median(stacked, axis=0))
    new, _ = aggregate(
        {"name": "FedTrimmedAvg", "args": {"beta": 0.2}}, {"w": np.zeros(1000, np.float32)}, updates, None
    )
    np.testing.assert_allclose(new["w"], np.sort(stacked, axis=0)[1:4].mean(axis=0), rtol=1e-6)


def test_excluded_variables_are_left_as_they_are():
    model = {"w": np.zeros(2), "frozen": np.ones(2)}
    for spec in ({"name": "FedAdam"}, {"name": "FedMedian"}):
        new, state = aggregate(
            spec, model, [({"w": np.ones(2), "frozen": np.full(2, 9.0)}, 1.0)] * 3, None, excluded={"frozen"}
        )
        np.testing.assert_array_equal(new["frozen"], [1, 1])
        assert not any(k.endswith("/frozen") for k in state)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "FedAvgg"}, r"unknown aggregator 'FedAvgg'; valid: FedAvg, FedAvgM, .* \(did you mean 'FedAvg'\?\)"),
        (
            {"name": "FedAdam", "args": {"lr": 1}},
            r"aggregator.args.lr: unknown argument of FedAdam; valid: eta, beta_1, "
            r"beta_2, tau",
        ),
        ({"name": "FedTrimmedAvg", "args": {"beta": 0.5}}, r"args.beta: must be a number >= 0 and < 0.5, got 0.5"),
        ({"name": "MultiKrum"}, r"args.num_selected: required by MultiKrum \(an integer >= 1\)"),
        ({"name": "FedAdam", "args": {"beta_1": 1.0}}, r"args.beta_1: must be a number >= 0 and < 1"),
    ],
)
def test_bad_specs_name_the_key_and_the_valid_values(spec, message):
    with pytest.raises(ValueError, match=message):
        aggregate(spec, X0, ROUND_1, None)


def test_bad_contributions_are_refused_by_number():
    with pytest.raises(ContributionError, match=r"contribution 1: variable 'w' holds NaN or Inf"):
        aggregate({"name": "FedAvg"}, X0, [ROUND_1[0], ({"w": np.array([np.nan, 0.0])}, 1.0)], None)
    with pytest.raises(ContributionError, match=r"contribution 0: variable 'w': shape \[3\]"):
        aggregate({"name": "FedMedian"}, X0, [({"w": np.zeros(3)}, 1.0)], None)


CUSTOM = textwrap.dedent('''
    import numpy as np
    from fedserver.aggregation import Aggregator

    class Halve(Aggregator):
        """x <- x + factor * mean."""
        def __init__(self, factor=0.5):
            self.factor = factor
        def step(self, name, x, delta, state):
            return x + self.factor * delta

    class Broken(Aggregator):
        def __init__(self, how):
            self.how = how
        def step(self, name, x, delta, state):
            if self.how == "raise":
                raise RuntimeError("lost my way")
            if self.how == "nan":
                return np.full_like(x, np.nan)
            if self.how == "shape":
                return np.zeros(x.size + 1, x.dtype)
            return (x + delta).astype(np.float16)
''')


@pytest.fixture
def custom(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "my_aggregators.py").write_text(CUSTOM)
    return [folder]


def test_a_custom_aggregator_runs_with_its_args(custom):
    new, _ = aggregate(
        {"path": "my_aggregators.Halve", "args": {"factor": 2.0}}, X0, ROUND_1, None, search_paths=custom
    )
    np.testing.assert_allclose(new["w"], [6.0, 8.0])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("raise", r"aggregator my_aggregators.Broken failed on variable 'w': RuntimeError: lost my way"),
        ("nan", r"variable 'w' of the aggregate is not finite \(aggregator my_aggregators.Broken\)"),
        ("shape", r"variable 'w': new value is float64\[3\], expected float64\[2\]"),
        ("dtype", r"variable 'w': new value is float16\[2\], expected float64\[2\]"),
    ],
)
def test_a_failing_custom_aggregator_fails_the_round_with_the_reason(custom, tmp_path, how, message):
    spec = {"path": "my_aggregators.Broken", "args": {"how": how}}
    with pytest.raises(AggregateError, match=message):
        aggregate(spec, X0, ROUND_1, None, search_paths=custom)
    path = tmp_path / "global.fl"
    save_model(path, X0)
    with pytest.raises(AggregateError, match=message):
        write_next_model(
            build_aggregator(check_spec(spec), custom),
            "my_aggregators.Broken",
            lambda name: np.ones(2),
            path,
            StateFiles(tmp_path),
            0,
            {},
        )
    np.testing.assert_array_equal(load_model(path)[0]["w"], X0["w"])


def test_a_custom_aggregator_must_subclass_aggregator(custom):
    (custom[0] / "plain.py").write_text("class NotOne:\n    pass\n")
    with pytest.raises(ValueError, match="must subclass fedserver.aggregation.Aggregator"):
        aggregate({"path": "plain.NotOne"}, X0, ROUND_1, None, search_paths=custom)


SPECS = {"w": VarSpec(np.dtype(np.float32), (2,)), "n": VarSpec(np.dtype(np.int64), ())}


def test_scaffold_contribution_splits_into_update_and_delta_c():
    update = {"w": np.ones(2, np.float32), "n": np.array(1), "scaffold.delta_c:w": np.full(2, 0.5, np.float32)}
    model, control = split_scaffold(update, SPECS)
    assert set(model) == {"w", "n"} and set(control) == {"w"}
    np.testing.assert_array_equal(control["w"], [0.5, 0.5])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, r"SCAFFOLD delta c missing for 1 variable\(s\): 'w'"),
        ({"scaffold.delta_c:w": np.ones(3, np.float32)}, r"delta c for 'w': float32\[3\], the model has float32\[2\]"),
        ({"scaffold.delta_c:w": np.array([np.inf, 0], np.float32)}, r"'scaffold.delta_c:w' holds NaN or Inf"),
        (
            {"scaffold.delta_c:w": np.ones(2, np.float32), "scaffold.delta_c:z": np.ones(2, np.float32)},
            r"delta c for 'z', which is not aggregated",
        ),
    ],
)
def test_malformed_scaffold_deltas_refuse_that_contribution(extra, message):
    with pytest.raises(ContributionError, match=message):
        split_scaffold({"w": np.ones(2, np.float32), **extra}, SPECS)


def test_scaffold_server_control_variate_two_rounds():
    # c <- c + (|S|/N) * mean(delta c_i): round 1, all of 2 sites: c = 0 + ([1, 2] + [3, 0])/2 = [2, 1];
    # round 2, one site of 2: c = [2, 1] + 1/2 * [4, -2] = [4, 0].
    c = {"w": np.zeros(2, np.float32)}
    c = scaffold_control_update(c, [{"w": np.array([1, 2], np.float32)}, {"w": np.array([3, 0], np.float32)}], 2)
    np.testing.assert_array_equal(c["w"], [2, 1])
    c = scaffold_control_update(c, [{"w": np.array([4, -2], np.float32)}], 2)
    np.testing.assert_array_equal(c["w"], [4, 0])
    assert c["w"].dtype == np.float32


def _scaffold_rounds():
    # Round 1, both of 2 sites: model mean [2.5, 3] (weights 1, 3), c = 0 + ([1, 2] + [3, 0]) / 2 = [2, 1].
    # Round 2, one site of 2: model mean [0, 2], c = [2, 1] + 1/2 * [4, -2] = [4, 0]. "n" (an integer) has no c.
    def contribution(w, n, dc, weight):
        return (
            {"w": np.array(w, np.float32), "n": np.array(n), "scaffold.delta_c:w": np.array(dc, np.float32)},
            weight,
        )

    return (
        [contribution([1, 0], 2, [1, 2], 1.0), contribution([3, 4], 2, [3, 0], 3.0)],
        [contribution([0, 2], 1, [4, -2], 1.0)],
    )


def test_scaffold_rounds_update_the_server_control_variate_in_the_state():
    model = {"w": np.array([1, 2], np.float32), "n": np.array(10)}
    round_1, round_2 = _scaffold_rounds()
    x1, state = aggregate({"name": "FedAvg"}, model, round_1, None, scaffold=True, num_sites=2)
    np.testing.assert_array_equal(x1["w"], [3.5, 5.0])
    assert x1["n"] == 12
    np.testing.assert_array_equal(state["scaffold_c/w"], [2, 1])
    assert "scaffold_c/n" not in state
    x2, state = aggregate({"name": "FedAvg"}, x1, round_2, state, scaffold=True, num_sites=2)
    np.testing.assert_array_equal(x2["w"], [3.5, 7.0])
    np.testing.assert_array_equal(state["scaffold_c/w"], [4, 0])
    with pytest.raises(ContributionError, match=r"contribution 0: SCAFFOLD delta c missing for 1 variable"):
        aggregate({"name": "FedAvg"}, model, [({"w": np.ones(2, np.float32)}, 1.0)], None, scaffold=True)


def test_scaffold_on_the_server_files_path_equals_aggregate(tmp_path):
    model = {"w": np.array([1, 2], np.float32), "n": np.array(10)}
    specs = {k: VarSpec(v.dtype, v.shape) for k, v in model.items()}
    path, states = tmp_path / "global.fl", StateFiles(tmp_path)
    save_model(path, model)
    with open(path, "rb") as f:
        index = read_index(f)
    sent = dict(control_tensors(states, 0, index))
    assert list(sent) == ["scaffold.c:w"]
    np.testing.assert_array_equal(sent["scaffold.c:w"], [0, 0])
    for number, contributions in enumerate(_scaffold_rounds()):
        acc, control = UpdateAccumulator(specs), control_accumulator(specs)
        for update, weight in contributions:
            update, delta_c = split_scaffold(dict(update), specs)
            acc.add(update, weight)
            control.add(delta_c, 1.0)
        write_next_model(
            build_aggregator(check_spec({"name": "FedAvg"})),
            "FedAvg",
            acc.take_mean,
            path,
            states,
            number,
            {},
            control=control,
            control_fraction=len(contributions) / 2,
        )
    np.testing.assert_array_equal(load_model(path)[0]["w"], [3.5, 7.0])
    sent = dict(control_tensors(states, 2, index))
    np.testing.assert_array_equal(sent["scaffold.c:w"], [4, 0])
    assert sent["scaffold.c:w"].dtype == np.float32

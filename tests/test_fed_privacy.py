"""Privacy filters on Δ: what leaves the site, how much of it, with how much noise, and what is refused."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from fedclient import fed_privacy
from fedclient.fed_privacy import LaplacianProtocol, PercentileProtocol, PrivacyProtocol, SVTProtocol
from fedcommon.model_meta import FLContext

# Each protocol with parameters that suit deltas of about 1e-3, so that every branch (drop, clip, release) is hit.
FACTORIES = {
    "percentile": lambda seed=0: PercentileProtocol(percentile=30, gamma=1e-3, seed=seed),
    "laplacian": lambda seed=0: LaplacianProtocol(fraction=0.2, epsilon=1e4, gamma=1e-3, tau=3e-4, seed=seed),
    "svt": lambda seed=0: SVTProtocol(fraction=0.2, epsilon=50.0, noise_var=1e-4, gamma=1e-3, tau=1e-4, seed=seed),
}
RANDOM = ["laplacian", "svt"]


def model(dtype=np.float32, seed=1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.standard_normal((8, 3, 5, 5)) * 1e-3).astype(dtype),
        "fc.weight": (rng.standard_normal((300, 40)) * 1e-3).astype(dtype),
        "fc.bias": (rng.standard_normal(40) * 1e-3).astype(dtype),
        "bn.momentum": np.array(0.9, dtype),
        "bn.num_batches_tracked": np.array([7, 8, 9], np.int64),
        "frozen": np.array([True, False]),
    }


def filtered_names(m: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in m.items() if v.ndim > 0 and np.issubdtype(v.dtype, np.floating)]


def flat(m: dict[str, np.ndarray], names: list[str] | None = None) -> np.ndarray:
    return np.concatenate([m[k].ravel() for k in (names or filtered_names(m))])


def laplace_ks(sample: np.ndarray, scale: float) -> float:
    """Kolmogorov-Smirnov distance between a sample and Lap(0, scale)."""
    x = np.sort(sample)
    cdf = np.where(x < 0, 0.5 * np.exp(x / scale), 1 - 0.5 * np.exp(-x / scale))
    n = x.size
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def ks_critical(n: int) -> float:
    # The KS distance of a true sample exceeds 1.949 / sqrt(n) with probability 0.001 (asymptotic
    # Kolmogorov distribution); the seeds are fixed, so a pass here is a pass every time.
    return 1.949 / math.sqrt(n)


# ---- common contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", FACTORIES)
def test_output_has_the_inputs_names_shapes_and_dtypes(name, dtype):
    m = model(dtype)
    out = FACTORIES[name]().apply(m)
    assert list(out) == list(m)
    for k in m:
        assert out[k].shape == m[k].shape and out[k].dtype == m[k].dtype, k


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", FACTORIES)
def test_every_value_is_within_gamma_times_local_steps(name, dtype, steps):
    protocol = FACTORIES[name]()
    m = model(dtype)
    names = filtered_names(m)
    out = protocol.apply({k: v * dtype(steps) if k in names else v for k, v in m.items()}, {"local_steps": steps})
    bound = dtype(protocol.gamma) * dtype(steps)
    values = flat(out)
    assert np.all(np.abs(values) <= bound)
    assert np.any(values != 0)


@pytest.mark.parametrize("name", FACTORIES)
def test_scalars_and_non_float_tensors_pass_through_unchanged(name):
    m = model()
    out = FACTORIES[name]().apply(m)
    for k in ("bn.momentum", "bn.num_batches_tracked", "frozen"):
        np.testing.assert_array_equal(out[k], m[k])
        assert out[k] is not m[k]


@pytest.mark.parametrize("name", FACTORIES)
def test_input_dict_and_arrays_are_not_modified(name):
    m = model()
    before = {k: v.copy() for k, v in m.items()}
    for v in m.values():
        v.flags.writeable = False  # any write into the input raises
    out = FACTORIES[name]().apply(m, {"local_steps": 3})
    assert list(m) == list(before)
    for k in m:
        np.testing.assert_array_equal(m[k], before[k])
        assert not np.shares_memory(out[k], m[k])


class _Ctx:
    """Not a Mapping, only .get(key): what the filters promise to accept."""

    def __init__(self, steps):
        self.steps = steps

    def get(self, key, default=None):
        return self.steps if key == "local_steps" else default


class _TrainingContext:
    """A training-context object (the seed's "TLT training context"): attributes, neither a Mapping nor .get."""

    def __init__(self, steps):
        self.local_steps = steps
        self.epoch = 2


@pytest.mark.parametrize(
    "ctx",
    [lambda s: {"local_steps": s}, lambda s: FLContext({"local_steps": s}), _Ctx, _TrainingContext],
    ids=["dict", "FLContext", "object-with-get", "training-context-object"],
)
@pytest.mark.parametrize("name", FACTORIES)
def test_filter_acts_on_delta_over_local_steps_and_multiplies_back(name, ctx):
    steps = 4.0
    m = model()
    names = filtered_names(m)
    per_step = {k: v / np.float32(steps) if k in names else v for k, v in m.items()}
    expected = FACTORIES[name](seed=5).apply(per_step)
    out = FACTORIES[name](seed=5).apply(m, ctx(steps))
    for k in m:
        np.testing.assert_array_equal(out[k], expected[k] * steps if k in names else m[k])


@pytest.mark.parametrize("ctx", [None, {}, {"local_steps": None}, FLContext(), {"round": 3}])
@pytest.mark.parametrize("name", FACTORIES)
def test_absent_local_steps_means_one(name, ctx):
    m = model()
    expected = FACTORIES[name](seed=2).apply(m)
    out = FACTORIES[name](seed=2).apply(m, ctx)
    for k in m:
        np.testing.assert_array_equal(out[k], expected[k])


@pytest.mark.parametrize("steps", [0, -2, float("nan"), float("inf"), True, "3"])
@pytest.mark.parametrize("name", FACTORIES)
def test_bad_local_steps_are_refused(name, steps):
    with pytest.raises(ValueError, match=r"'local_steps' must be a number > 0, got"):
        FACTORIES[name]().apply(model(), {"local_steps": steps})


@pytest.mark.parametrize("name", FACTORIES)
def test_a_training_context_object_without_local_steps_is_accepted_as_one_step(name):
    m = model()
    expected = FACTORIES[name](seed=4).apply(m)
    out = FACTORIES[name](seed=4).apply(m, object())
    for k in m:
        np.testing.assert_array_equal(out[k], expected[k])


@pytest.mark.parametrize("steps", [0, float("nan"), "3"])
def test_bad_local_steps_of_a_training_context_object_are_refused(steps):
    with pytest.raises(ValueError, match=r"'local_steps' must be a number > 0, got"):
        SVTProtocol().apply(model(), _TrainingContext(steps))


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_gives_the_same_output_and_different_seeds_differ(name):
    m = model()
    first, again, other = (FACTORIES[name](seed=s).apply(m) for s in (11, 11, 12))
    for k in m:
        np.testing.assert_array_equal(first[k], again[k])
    assert not np.array_equal(flat(first), flat(other))


@pytest.mark.parametrize("name", FACTORIES)
def test_filters_work_across_chunks_of_one_tensor(name, monkeypatch):
    m = model()
    reference = FACTORIES[name](seed=3).apply(m)
    monkeypatch.setattr(fed_privacy, "_CHUNK", 777)  # fc.weight spans 16 chunks, the last one partial
    out = FACTORIES[name](seed=3).apply(m)
    values = flat(out)
    assert np.all(np.abs(values) <= np.float32(1e-3))
    if name == "percentile":  # deterministic: chunking must not change anything
        for k in m:
            np.testing.assert_array_equal(out[k], reference[k])
    else:
        n = values.size
        assert np.count_nonzero(values) == np.count_nonzero(flat(reference)) == math.ceil(0.2 * n)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_tensors_are_filtered_and_keep_their_dtype(dtype):
    m = {"w": np.full(1000, 0.5, dtype)}
    clipped = PercentileProtocol(gamma=0.01).apply(m)["w"]
    assert clipped.dtype == np.dtype(dtype)
    np.testing.assert_allclose(clipped.astype(np.float32), 0.01, rtol=1e-2)
    sparse = SVTProtocol(gamma=0.01, seed=0).apply(m)["w"]
    assert sparse.dtype == np.dtype(dtype)
    assert 0 < np.count_nonzero(sparse.astype(np.float32)) <= 100


def test_empty_update_and_zero_size_tensors_are_handled():
    m = {"empty": np.zeros((0, 4), np.float32), "step": np.array(1.0)}
    for name in FACTORIES:
        out = FACTORIES[name]().apply(m)
        assert out["empty"].shape == (0, 4) and out["step"] == 1.0
    assert FACTORIES["svt"]().apply({}) == {}


def test_every_protocol_is_a_privacy_protocol_with_a_dp_flag():
    assert SVTProtocol.is_differentially_private
    assert not LaplacianProtocol.is_differentially_private  # the |d| >= tau selection is not private
    assert not PercentileProtocol.is_differentially_private
    for factory in FACTORIES.values():
        assert isinstance(factory(), PrivacyProtocol)
    with pytest.raises(TypeError):
        PrivacyProtocol()


@pytest.mark.parametrize(
    ("protocol", "spent"),
    [
        (SVTProtocol(epsilon=0.3), 0.3),
        (LaplacianProtocol(epsilon=250), 250.0),
        (PercentileProtocol(), None),
    ],
)
def test_last_epsilon_is_what_the_call_spent(protocol, spent):
    assert protocol.last_epsilon is None
    protocol.apply(model())
    assert protocol.last_epsilon == spent


# ---- parameters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "param", "value", "allowed"),
    [
        (LaplacianProtocol, "fraction", 0, "in (0, 1]"),
        (LaplacianProtocol, "fraction", 1.5, "in (0, 1]"),
        (SVTProtocol, "fraction", -0.1, "in (0, 1]"),
        (SVTProtocol, "fraction", float("nan"), "in (0, 1]"),
        (SVTProtocol, "fraction", True, "in (0, 1]"),
        (LaplacianProtocol, "epsilon", 0, "> 0"),
        (SVTProtocol, "epsilon", -1.0, "> 0"),
        (SVTProtocol, "epsilon", float("inf"), "> 0"),
        (LaplacianProtocol, "gamma", 0.0, "> 0"),
        (SVTProtocol, "gamma", "0.1", "> 0"),
        (PercentileProtocol, "gamma", -1e-3, "> 0"),
        (LaplacianProtocol, "tau", -1e-9, ">= 0"),
        (SVTProtocol, "tau", None, ">= 0"),
        (SVTProtocol, "noise_var", 0, "> 0"),
        (SVTProtocol, "noise_var", float("-inf"), "> 0"),
        (PercentileProtocol, "percentile", -1, "in [0, 100]"),
        (PercentileProtocol, "percentile", 100.5, "in [0, 100]"),
        (PercentileProtocol, "percentile", False, "in [0, 100]"),
    ],
)
def test_invalid_parameters_are_refused_naming_parameter_value_and_range(cls, param, value, allowed):
    with pytest.raises(ValueError) as info:
        cls(**{param: value})
    message = str(info.value)
    assert message.startswith(f"{param} must be ")
    assert allowed in message and repr(value) in message


def test_boundary_parameters_are_accepted_and_act_as_their_limits():
    m = model(np.float64)
    names = filtered_names(m)
    d = flat(m)
    n = d.size
    # fraction 1 and tau 0: every coordinate is released (with noise, clipped to ±gamma).
    released = flat(LaplacianProtocol(fraction=1, tau=0, seed=0).apply(m))
    assert np.count_nonzero(released) == n and np.all(np.abs(released) <= 0.001)
    # SVT at its smallest epsilon and noise: nothing leaves outside ±gamma, and no more than n values.
    svt = flat(SVTProtocol(fraction=1.0, tau=0.0, epsilon=1e-9, noise_var=1e-12, seed=0).apply(m))
    assert np.all(np.isfinite(svt)) and np.all(np.abs(svt) <= 1e-5)
    # Percentile 0 drops nothing (only clips); percentile 100 keeps only the largest |d|.
    kept = flat(PercentileProtocol(percentile=0, gamma=1.0).apply(m), names)
    np.testing.assert_allclose(kept, d)
    top = flat(PercentileProtocol(percentile=100, gamma=1.0).apply(m), names)
    assert np.count_nonzero(top) == 1 and np.abs(top).argmax() == np.abs(d).argmax()


@pytest.mark.parametrize(
    ("fraction", "n", "c"),
    [(0.1, 30, 3), (0.1, 25, 3), (0.3, 10, 3), (1.0, 7, 7), (1e-9, 5, 1), (0.1, 0, 0), (0.1, 100_000_000, 10_000_000)],
)
def test_upload_count_is_the_ceiling_of_fraction_times_n(fraction, n, c):
    assert fed_privacy._upload_count(fraction, n) == c


# ---- PercentileProtocol ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 10, 33.3, 50, 90, 100])
def test_percentile_keeps_only_the_largest_coordinates_over_all_tensors(p):
    m = model()
    m["tiny"] = np.float32(1e-9) * np.arange(1, 501, dtype=np.float32)  # below the 30th percentile
    out = PercentileProtocol(percentile=p, gamma=1e-3).apply(m)
    d, released = flat(m), flat(out)
    magnitude = np.abs(d)
    cut = np.percentile(magnitude, p)  # the documented threshold, computed over all non-scalar tensors at once
    kept = released != 0
    np.testing.assert_array_equal(kept, magnitude >= cut)
    np.testing.assert_array_equal(released[kept], np.clip(d[kept], np.float32(-1e-3), np.float32(1e-3)))
    # About (100 - p)% of the coordinates, the largest ones (all magnitudes here are distinct).
    assert abs(kept.sum() - (100 - p) / 100 * d.size) <= 1
    if 0 < kept.sum() < d.size:
        assert magnitude[kept].min() > magnitude[~kept].max()
    if p >= 30:
        assert not np.any(out["tiny"])


def test_percentile_clips_kept_values_to_gamma():
    out = PercentileProtocol(percentile=50, gamma=0.5).apply({"w": np.array([-3.0, -0.2, 0.1, 0.4, 2.0, 0.7])})
    np.testing.assert_array_equal(out["w"], [-0.5, 0.0, 0.0, 0.0, 0.5, 0.5])


# ---- LaplacianProtocol -------------------------------------------------------------------------------------


def test_laplacian_releases_at_most_c_coordinates_all_with_abs_d_at_least_tau():
    m = model()
    protocol = FACTORIES["laplacian"]()
    d, released = flat(m), flat(protocol.apply(m))
    c = math.ceil(0.2 * d.size)
    assert np.count_nonzero(released) == c  # about 77% are eligible here, far more than c
    assert np.all(np.abs(d[released != 0]) >= np.float32(3e-4))


def test_laplacian_releases_every_eligible_coordinate_when_fewer_than_c():
    d = np.zeros(1000)
    d[:50] = np.linspace(0.2, 0.3, 50)
    out = LaplacianProtocol(fraction=0.1, epsilon=1e6, gamma=1.0, tau=0.1, seed=0).apply({"w": d})["w"]
    np.testing.assert_array_equal(out != 0, np.arange(1000) < 50)


def test_laplacian_chooses_uniformly_among_eligible_coordinates():
    # Half the eligible coordinates are 100 times larger than the rest: a uniform choice ignores that.
    n = 200_000
    d = np.where(np.arange(n) % 2 == 0, 0.01, 1.0)
    out = LaplacianProtocol(fraction=0.1, epsilon=1e9, gamma=10.0, tau=0.0, seed=4).apply({"w": d})["w"]
    chosen = out != 0
    # 20,000 of 200,000 chosen: each half gets 10,000 +- 67 (hypergeometric sd); 500 is 7 sd.
    assert chosen.sum() == 20_000
    assert abs(chosen[0::2].sum() - 10_000) < 500


def test_laplacian_noise_has_the_stated_scale():
    n, fraction, gamma, scale = 100_000, 0.5, 1000.0, 0.5
    c = math.ceil(fraction * n)
    epsilon = 2 * gamma * c / scale  # the documented scale 2 * gamma * c / epsilon, solved for epsilon
    d = np.random.default_rng(6).uniform(-1, 1, n)  # far from +-gamma: no clipping
    out = LaplacianProtocol(fraction=fraction, epsilon=epsilon, gamma=gamma, tau=0.0, seed=6).apply({"w": d})["w"]
    noise = (out - d)[out != 0]
    assert noise.size == c
    # Mean |Lap(b)| = b with sd b / sqrt(c) = 0.4% of b: 3% is about 7 sd.
    assert abs(np.mean(np.abs(noise)) / scale - 1) < 0.03
    assert laplace_ks(noise, scale) < ks_critical(noise.size)


# ---- SVTProtocol -------------------------------------------------------------------------------------------


def test_svt_releases_at_most_c_coordinates():
    m = model()
    for fraction in (0.01, 0.2, 0.7):
        released = flat(SVTProtocol(fraction=fraction, epsilon=50.0, gamma=1e-3, seed=1).apply(m))
        assert 0 < np.count_nonzero(released) <= math.ceil(fraction * released.size)


def test_svt_releases_exactly_c_when_many_coordinates_pass():
    d = np.random.default_rng(0).uniform(-1, 1, 50_000)
    out = SVTProtocol(fraction=0.05, epsilon=1e9, gamma=2.0, tau=0.0, seed=0).apply({"w": d})["w"]
    assert np.count_nonzero(out) == math.ceil(0.05 * 50_000)


@pytest.mark.parametrize(
    ("noise_var", "expected_scale"),
    [(0.5, 0.5), (1e-6, 0.25)],
    ids=["noise_var-above-budget", "budget-above-noise_var"],
)
def test_svt_release_noise_is_laplace_with_the_documented_scale(noise_var, expected_scale):
    # b3 = max(noise_var, 2 * c * gamma / (epsilon / 4)); here the budget's part is 8 * c * gamma / epsilon = 0.25.
    n, fraction, gamma, epsilon = 100_000, 0.5, 1000.0, 1.6e9
    d = np.random.default_rng(8).uniform(-1, 1, n)
    protocol = SVTProtocol(fraction=fraction, epsilon=epsilon, noise_var=noise_var, gamma=gamma, tau=0.0, seed=8)
    out = protocol.apply({"w": d})["w"]
    noise = (out - d)[out != 0]
    assert noise.size == math.ceil(fraction * n)
    # Mean |Lap(b)| = b with sd b / sqrt(50,000) = 0.45% of b: 3% is about 7 sd.
    assert abs(np.mean(np.abs(noise)) / expected_scale - 1) < 0.03
    assert laplace_ks(noise, expected_scale) < ks_critical(noise.size)
    assert protocol.last_epsilon == epsilon


@pytest.mark.parametrize(
    ("gamma", "magnitudes"),
    [
        (0.01, (0.0, 5.0)),  # 16 random bits decide 99.8% of the coordinates
        (0.2, (0.0, 0.1, 5.0)),  # they decide 96%, the rest get the exact test
        (1.0, (0.0, 0.5, 5.0)),  # too few decided that way: the query noise is drawn for every coordinate
        (1000.0, (0.0, 2.0)),
    ],
    ids=["gamma-0.01", "gamma-0.2", "gamma-1", "gamma-1000"],
)
def test_svt_accepts_each_coordinate_with_the_noisy_threshold_probability(gamma, magnitudes):
    # fraction 1 (c = n) releases every accepted coordinate, so the release rate is the acceptance rate.
    # epsilon is set so the query noise is b2 = 8 * c * gamma / epsilon = 1; the threshold noise
    # b1 = 2 * gamma / epsilon = 1 / (4 * n) is then negligible, so T = tau = 1 and P(accept | q) = P(Lap(1) >= 1 - q).
    per_group = 50_000
    n = per_group * len(magnitudes)
    signs = np.where(np.random.default_rng(9).random(n) < 0.5, -1.0, 1.0)
    d = np.repeat(magnitudes, per_group) * signs
    epsilon = 8 * n * gamma
    out = SVTProtocol(fraction=1.0, epsilon=epsilon, gamma=gamma, tau=1.0, seed=9).apply({"w": d})["w"]
    for group, magnitude in enumerate(magnitudes):
        q = min(magnitude, gamma)
        t = 1 - q
        expected = 0.5 * math.exp(-t) if t >= 0 else 1 - 0.5 * math.exp(t)
        rate = np.mean(out[group * per_group : (group + 1) * per_group] != 0)
        # Binomial sd <= sqrt(0.25 / 50,000) = 0.0022: 0.012 is over 5 sd.
        assert abs(rate - expected) < 0.012, (magnitude, rate, expected)


def test_svt_released_values_stay_within_gamma_and_carry_the_sign_of_large_deltas_when_noise_is_small():
    d = np.concatenate([np.full(5000, 3.0), np.full(5000, -3.0)])
    out = SVTProtocol(fraction=1.0, epsilon=1e12, noise_var=1e-9, gamma=1.0, tau=0.5, seed=0).apply({"w": d})["w"]
    np.testing.assert_allclose(out, np.sign(d), atol=1e-6)


# ---- the uniform subset ------------------------------------------------------------------------------------


@pytest.mark.parametrize("slack", [4.0, -3.0], ids=["cut-down", "topped-up"])
def test_choose_picks_a_uniform_k_subset_of_the_candidates(slack):
    rng = np.random.default_rng(0)
    mask = np.zeros(1000, bool)
    mask[::3] = True  # 334 candidates
    hits = np.zeros(1000)
    trials, k = 3000, 100
    for _ in range(trials):
        chosen = fed_privacy._choose(rng, mask, k, slack)
        assert chosen.size == k and np.unique(chosen).size == k and mask[chosen].all()
        hits[chosen] += 1
    rate = hits[mask] / trials
    # Each candidate is chosen with probability 100 / 334 = 0.299; over 3000 trials its sd is 0.0084,
    # and the largest of 334 such deviations stays below 4.5 sd.
    assert np.all(np.abs(rate - k / mask.sum()) < 0.038)
    assert not hits[~mask].any()

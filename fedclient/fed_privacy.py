"""Outbound privacy filters on a model update Δ (seed: fed_learn.client.fed_privacy): sparsify, clip, add noise.

All three filters work on d = Δ / S, where S is the number of local steps behind the update
(train_ctx["local_steps"], or train_ctx.local_steps of a training-context object; 1 when absent), upload 0
for what they drop and multiply the rest back by S.
They act on every non-scalar floating-point tensor of the update, taken as one vector of n coordinates;
0-d tensors and non-float tensors (integer counters, flags) are passed through unchanged, so no filter
protects them: leave them out of the update (exclude_vars) when they are sensitive.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from fedcommon.dtypes import accumulator_dtype, is_float
from fedcommon.model_meta import FLContextKey

__all__ = ["LaplacianProtocol", "PercentileProtocol", "PrivacyProtocol", "SVTProtocol", "privacy_from_params"]

# Coordinates per step of the vectorised passes: big enough that per-step overhead vanishes, small enough
# that the temporaries stay in cache and the extra memory stays a small fraction of the model.
_CHUNK = 1 << 20
_GRID = 1 << 16  # the resolution of the uniform draws that decide most coordinates (16 random bits each)
_DENSE = 0.125  # above this chance that 16 bits cannot decide a coordinate's SVT test, draw its Laplace noise


class PrivacyProtocol(abc.ABC):
    """An outbound filter: takes the update {name: Δ} and returns what may leave the site."""

    is_differentially_private: bool = False
    last_epsilon: float | None = None  # the ε the last apply() spent; None when the filter gives no DP guarantee

    @abc.abstractmethod
    def apply(self, model_diff: dict[str, np.ndarray], train_ctx: Any = None) -> dict[str, np.ndarray]:
        """The update to send: same names, shapes and dtypes as model_diff, which is left unmodified."""


class PercentileProtocol(PrivacyProtocol):
    """Shares only the largest coordinates (Shokri & Shmatikov, "Privacy-preserving deep learning", CCS '15).

    c is the percentile-th percentile (linear interpolation, as numpy.percentile) of |d| over all
    non-scalar float tensors; coordinates with |d| < c are zeroed and the rest clipped to ±gamma.
    This is a sparsifier, NOT differential privacy: no noise is added and the kept values are exact.
    """

    is_differentially_private = False

    def __init__(self, percentile: float = 10, gamma: float = 0.01, *, seed: int | None = None):
        self.percentile = _param("percentile", percentile, "in [0, 100]", lambda v: 0 <= v <= 100)
        self.gamma = _param("gamma", gamma, "> 0", lambda v: v > 0)
        # Nothing here is random; seed is accepted so that every protocol is built the same way.
        self.seed = seed
        self.last_epsilon = None

    def apply(self, model_diff: dict[str, np.ndarray], train_ctx: Any = None) -> dict[str, np.ndarray]:
        update = _Update(model_diff, _local_steps(train_ctx))
        self.last_epsilon = None
        if update.n == 0:
            return update.out
        threshold = self._threshold(update)
        for part in update.parts:
            g = part.cdtype.type(self.gamma)
            for lo, hi in part.chunks():
                d = part.d(lo, hi)
                kept = np.clip(d, -g, g)
                kept[np.abs(d) < part.cdtype.type(threshold)] = 0
                part.write(slice(lo, hi), kept)
        return update.out

    def _threshold(self, update: _Update) -> float:
        # One buffer of |d| and an in-place selection: O(n) and 1x the model, where np.percentile would sort.
        cdtype = np.result_type(*(part.cdtype for part in update.parts))
        magnitudes = np.empty(update.n, cdtype)
        offset = 0
        for part in update.parts:
            for lo, hi in part.chunks():
                np.abs(part.d(lo, hi), out=magnitudes[offset + lo : offset + hi])
            offset += part.size
        # numpy.percentile's "linear" method: the value at virtual index p/100 * (n - 1).
        index = self.percentile / 100 * (update.n - 1)
        below = math.floor(index)
        magnitudes.partition(below)
        low = magnitudes[below]
        high = magnitudes[below + 1 :].min() if below + 1 < update.n else low
        t = cdtype.type(index - below)
        diff = high - low
        return float(low + diff * t if t < 0.5 else high - diff * (1 - t))


class LaplacianProtocol(PrivacyProtocol):
    """Shokri & Shmatikov's "random with threshold" selection with Laplace noise on what is shared (CCS '15).

    d is clipped to ±gamma; among the coordinates with |d| >= tau (the unclipped d), up to
    c = ceil(fraction * n) are chosen uniformly at random without replacement; each is released as
    clip(clip(d) + Lap(2 * gamma * c / epsilon), ±gamma), everything else is 0.
    The released values are epsilon-DP (c values, each of sensitivity 2 * gamma), which is what
    last_epsilon reports; which coordinates are released depends on |d| >= tau without noise, so the
    filter as a whole is not differentially private unless tau == 0 (use SVTProtocol for private selection).
    """

    is_differentially_private = False

    def __init__(
        self,
        fraction: float = 0.1,
        epsilon: float = 1000,
        gamma: float = 0.001,
        tau: float = 0.0001,
        *,
        seed: int | None = None,
    ):
        self.fraction = _param("fraction", fraction, "in (0, 1]", lambda v: 0 < v <= 1)
        self.epsilon = _param("epsilon", epsilon, "> 0", lambda v: v > 0)
        self.gamma = _param("gamma", gamma, "> 0", lambda v: v > 0)
        self.tau = _param("tau", tau, ">= 0", lambda v: v >= 0)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.last_epsilon = None

    def apply(self, model_diff: dict[str, np.ndarray], train_ctx: Any = None) -> dict[str, np.ndarray]:
        update = _Update(model_diff, _local_steps(train_ctx))
        c = _upload_count(self.fraction, update.n)
        masks = [
            np.abs(part.d(lo, hi)) >= part.cdtype.type(self.tau) for part in update.parts for lo, hi in part.chunks()
        ]
        _release(self._rng, update, masks, c, self.gamma, 2 * self.gamma * c / self.epsilon)
        self.last_epsilon = self.epsilon
        return update.out


class SVTProtocol(PrivacyProtocol):
    """The sparse vector technique applied to DSSGD (Shokri & Shmatikov, CCS '15): epsilon-DP per call.

    The SVT is the standard one of Lyu, Su & Li, "Understanding the Sparse Vector Technique for
    Differential Privacy", VLDB 2017 (threshold noise Lap(Δ/ε1), query noise Lap(2cΔ/ε2), at most c
    answers), with numeric answers for the accepted queries costing ε3, so ε = ε1 + ε2 + ε3. Here
    c = ceil(fraction * n), the query is q_i = |clip(d_i, ±gamma)| (sensitivity Δ = gamma), and epsilon
    is split as in their standard SVT, half for the threshold, with the other half shared equally by
    the queries and the released values (ε1 = ε/2, ε2 = ε3 = ε/4):
      noisy threshold  T = tau + Lap(b1),  b1 = gamma / ε1
      coordinate i is accepted when q_i + Lap(b2) >= T,  b2 = 2 * c * gamma / ε2
      up to c accepted coordinates, taken in a random order (a uniform sample of them), are released as
      clip(clip(d_i, ±gamma) + Lap(b3), ±gamma),  b3 = max(noise_var, c * 2 * gamma / ε3)
    and everything else is 0. A released value has sensitivity 2 * gamma and there are at most c, hence
    the least b3; noise_var is the least Laplace scale of that noise the caller wants, raised by the
    budget where it needs more. More noise only adds privacy, so each call spends at most epsilon,
    which last_epsilon reports. Laplace sampling is ordinary floating point, not hardened against
    precision attacks (Mironov, CCS '12).
    """

    is_differentially_private = True

    def __init__(
        self,
        fraction: float = 0.1,
        epsilon: float = 0.1,
        noise_var: float = 0.1,
        gamma: float = 1e-05,
        tau: float = 1e-06,
        *,
        seed: int | None = None,
    ):
        self.fraction = _param("fraction", fraction, "in (0, 1]", lambda v: 0 < v <= 1)
        self.epsilon = _param("epsilon", epsilon, "> 0", lambda v: v > 0)
        self.noise_var = _param("noise_var", noise_var, "> 0", lambda v: v > 0)
        self.gamma = _param("gamma", gamma, "> 0", lambda v: v > 0)
        self.tau = _param("tau", tau, ">= 0", lambda v: v >= 0)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.last_epsilon = None

    def apply(self, model_diff: dict[str, np.ndarray], train_ctx: Any = None) -> dict[str, np.ndarray]:
        update = _Update(model_diff, _local_steps(train_ctx))
        self.last_epsilon = self.epsilon
        if update.n == 0:
            return update.out
        c = _upload_count(self.fraction, update.n)
        b1 = self.gamma / (self.epsilon / 2)
        b2 = 2 * c * self.gamma / (self.epsilon / 4)
        b3 = max(self.noise_var, c * 2 * self.gamma / (self.epsilon / 4))
        threshold = self.tau + self._rng.laplace(0.0, b1)
        # q lies in [0, gamma], so its acceptance probability p(T - q) lies in [p(T), p(T - gamma)].
        bounds = float(_p_at_least(threshold, b2)), float(_p_at_least(threshold - self.gamma, b2))
        masks = [
            self._accepted(part, lo, hi, threshold, b2, bounds) for part in update.parts for lo, hi in part.chunks()
        ]
        _release(self._rng, update, masks, c, self.gamma, b3)
        return update.out

    def _accepted(
        self, part: _Part, lo: int, hi: int, threshold: float, b2: float, bounds: tuple[float, float]
    ) -> np.ndarray:
        """Which of coordinates lo:hi pass the noisy test q + Lap(b2) >= T."""
        # Only the event q + Lap(b2) >= T is used, never the noise itself, and its probability is
        # p(T - q), p(t) = P(Lap(b2) >= t); so it is drawn as u < p(T - q), u ~ U[0, 1): the same mechanism,
        # without a Laplace variate per coordinate. u is drawn as 16 random bits j, u = (j + w) / 2**16, with
        # w ~ U[0, 1) drawn only where j cannot decide: j < floor(2**16 p(T)) accepts and
        # j >= ceil(2**16 p(T - gamma)) rejects whatever q is, so only the rare j in between read d.
        p_low, p_high = bounds
        if p_high - p_low > _DENSE:  # the 16 bits would decide few coordinates: draw the noise itself
            noisy = np.abs(part.d(lo, hi))
            np.minimum(noisy, part.cdtype.type(self.gamma), out=noisy)
            noisy += _laplace(self._rng, b2, hi - lo, part.cdtype)
            return noisy >= part.cdtype.type(threshold)
        j = _bits16(self._rng, hi - lo)
        accepted = j < math.ceil(p_high * _GRID)
        unsure = np.flatnonzero(accepted & (j >= math.floor(p_low * _GRID)))
        if unsure.size:
            u = (j[unsure] + self._rng.random(unsure.size)) / _GRID
            q = np.minimum(np.abs(part.d(lo, hi, unsure).astype(np.float64)), self.gamma)
            accepted[unsure] = u < _p_at_least(threshold - q, b2)
        return accepted


def privacy_from_params(params: Any) -> Any:
    """The filter that privacy_params names: None; a filter object (with apply); or, as in config_fed_client.json,
    {"name": "SVTProtocol", "args": {...}} for a built-in protocol. Raises ValueError saying what is wrong."""
    if params is None or (callable(getattr(params, "apply", None)) and not isinstance(params, Mapping)):
        return params
    if not isinstance(params, Mapping):
        raise ValueError(
            f"privacy_params must be None, a PrivacyProtocol or {{'name': ..., 'args': {{...}}}}, "
            f"got {type(params).__name__}"
        )
    protocols = {cls.__name__: cls for cls in (LaplacianProtocol, PercentileProtocol, SVTProtocol)}
    unknown = sorted(set(params) - {"name", "args"})
    if unknown:
        raise ValueError(f"privacy_params: unknown key(s) {', '.join(map(repr, unknown))}; give 'name' and 'args'")
    name, args = params.get("name"), params.get("args") or {}
    if name not in protocols:
        raise ValueError(f"privacy_params: 'name' must be one of {', '.join(protocols)}, got {name!r}")
    if not isinstance(args, Mapping):
        raise ValueError(f"privacy_params: 'args' must be a dict of {name}'s parameters, got {type(args).__name__}")
    try:
        return protocols[name](**args)
    except TypeError as e:
        raise ValueError(f"privacy_params: {name}: {e}") from None


class _Part:
    """One non-scalar float tensor of the update: its input as a flat vector and its flat output."""

    def __init__(self, value: np.ndarray, out: np.ndarray, steps: float):
        self.src = value.reshape(-1)
        self.dst = out.reshape(-1)
        self.size = self.src.size
        self.steps = steps
        # float64 stays float64; narrower floats are computed in float32 and written back in their own type.
        self.cdtype = accumulator_dtype(value.dtype)

    def chunks(self) -> Iterator[tuple[int, int]]:
        for lo in range(0, self.size, _CHUNK):
            yield lo, min(lo + _CHUNK, self.size)

    def d(self, lo: int, hi: int, index: np.ndarray | None = None) -> np.ndarray:
        """d = Δ / S for coordinates lo:hi (or those of them at index), in the compute dtype."""
        delta = self.src[lo:hi] if index is None else self.src[lo:hi][index]
        if self.steps == 1:
            return delta.astype(self.cdtype, copy=False)
        return np.divide(delta, self.steps, dtype=self.cdtype)

    def write(self, where: slice | np.ndarray, values: np.ndarray) -> None:
        """Store filtered d values, multiplied back by S."""
        if self.steps != 1:
            values *= self.steps
        self.dst[where] = values


class _Update:
    """model_diff split into the tensors the filters act on and those passed through as they are."""

    def __init__(self, model_diff: Mapping[str, np.ndarray], steps: float):
        self.out: dict[str, np.ndarray] = {}
        self.parts: list[_Part] = []
        for name, value in model_diff.items():
            value = np.asarray(value)
            if value.ndim == 0 or not (is_float(value.dtype) or np.issubdtype(value.dtype, np.floating)):
                self.out[name] = value.copy()
                continue
            self.out[name] = np.zeros(value.shape, value.dtype)
            self.parts.append(_Part(value, self.out[name], steps))
        self.n = sum(part.size for part in self.parts)


def _release(
    rng: np.random.Generator, update: _Update, masks: list[np.ndarray], c: int, gamma: float, scale: float
) -> None:
    """Release up to c of the candidate coordinates (masks, one per chunk), chosen uniformly at random
    without replacement, as clip(clip(d, ±gamma) + Lap(scale), ±gamma)."""
    counts = np.array([np.count_nonzero(mask) for mask in masks], np.int64)
    # A uniform c-subset of all candidates: how many fall in each chunk is multivariate hypergeometric,
    # then a uniform subset of that size inside each chunk.
    take = counts if counts.sum() <= c else rng.multivariate_hypergeometric(counts, c)
    chunks = ((part, lo, hi) for part in update.parts for lo, hi in part.chunks())
    for (part, lo, hi), mask, k in zip(chunks, masks, take, strict=True):
        if k == 0:
            continue
        index = _choose(rng, mask, k)
        g = part.cdtype.type(gamma)
        values = np.clip(part.d(lo, hi, index), -g, g)
        values += _laplace(rng, scale, index.size, part.cdtype)
        np.clip(values, -g, g, out=values)
        part.write(lo + index, values)


def _choose(rng: np.random.Generator, mask: np.ndarray, k: int, slack: float = 4.0) -> np.ndarray:
    """Positions of k of the True entries of mask (all of them if fewer), chosen uniformly at random
    without replacement, in no particular order."""
    m = int(np.count_nonzero(mask))
    if k >= m:
        return np.flatnonzero(mask)
    # Keep each candidate with one probability a little above k / m: a uniform subset of whatever size
    # comes out, which is then cut down to k uniformly (or, rarely, topped up uniformly from the rest).
    # That is a uniform k-subset, at a fraction of the cost of rng.choice(np.flatnonzero(mask), k, replace=False).
    level = min(_GRID, math.ceil((k + slack * math.sqrt(k)) / m * _GRID))
    kept = mask & (_bits16(rng, mask.size) < level)
    chosen = np.flatnonzero(kept)
    if chosen.size >= k:
        return np.delete(chosen, rng.choice(chosen.size, chosen.size - k, replace=False))
    rest = np.flatnonzero(mask & ~kept)
    return np.concatenate([chosen, rng.choice(rest, k - chosen.size, replace=False)])


def _bits16(rng: np.random.Generator, size: int) -> np.ndarray:
    """size uniform 16-bit integers, four from each 64-bit output of the bit generator."""
    return rng.bit_generator.random_raw(-(-size // 4)).view(np.uint16)[:size]


def _p_at_least(t: np.ndarray | float, scale: float) -> np.ndarray:
    """P(Lap(scale) >= t)."""
    tail = 0.5 * np.exp(-np.abs(np.asarray(t, np.float64)) / scale)
    return np.where(np.asarray(t) >= 0, tail, 1 - tail)


def _laplace(rng: np.random.Generator, scale: float, size: int, dtype: np.dtype) -> np.ndarray:
    # A standard exponential with a random sign (that of a random int16), drawn in dtype: rng.laplace only
    # makes float64, and slower.
    noise = rng.standard_exponential(size, dtype=dtype)
    noise *= dtype.type(scale)
    return np.copysign(noise, _bits16(rng, size).view(np.int16), out=noise)


def _upload_count(fraction: float, n: int) -> int:
    """c = ceil(fraction * n), without 0.1 * 30 = 3.0000000000000004 becoming 4; at least 1 when n > 0."""
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def _local_steps(train_ctx: Any) -> float:
    """S from train_ctx: its "local_steps" item (a Mapping, or anything with .get(key) such as FLContext), or its
    local_steps attribute (a training-context object); 1 when it has neither or is None."""
    get = getattr(train_ctx, "get", None)
    if callable(get):
        steps = get(FLContextKey.LOCAL_STEPS)
    else:
        steps = getattr(train_ctx, FLContextKey.LOCAL_STEPS, None)
    if steps is None:
        return 1.0
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real) or not math.isfinite(steps) or steps <= 0:
        raise ValueError(f"train_ctx {FLContextKey.LOCAL_STEPS!r} must be a number > 0, got {steps!r}")
    return float(steps)


def _param(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
    if not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)

"""Validation metrics: which one ranks models, and the checks metrics from a peer must pass."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_METRICS = 64
MAX_METRIC_NAME = 100


class MetricsError(ValueError):
    """Metrics that cannot be recorded; the message names the bad entry."""


def primary_metric(metrics: Mapping[str, float]) -> str:
    """The metric that ranks models: "accuracy", else the first "...loss", else the first one."""
    if "accuracy" in metrics:
        return "accuracy"
    losses = [k for k in metrics if k.endswith("loss")]
    return losses[0] if losses else next(iter(metrics))


def metric_score(metrics: Mapping[str, float]) -> float:
    """A score where higher is better: accuracy-like metrics as they are, a loss negated."""
    name = primary_metric(metrics)
    value = float(metrics[name])
    return -value if name.endswith("loss") else value


def mean_score(reports: Mapping[str, Mapping[str, float]]) -> float | None:
    """The mean metric_score over the sites' reports that hold metrics; None when none does."""
    scores = [metric_score(m) for m in reports.values() if m]
    return sum(scores) / len(scores) if scores else None


def mean_metrics(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each numeric metric over the sites' reports that hold it."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in reports.values():
        if not isinstance(metrics, Mapping):
            continue
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[name] = sums.get(name, 0.0) + float(value)
                counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sorted(sums)}


def check_metrics(metrics: Any, what: str) -> dict[str, float]:
    """`metrics` as {name: finite float}, or MetricsError naming what is wrong with `what`'s metrics."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise MetricsError(f"{what}: metrics must be a non-empty mapping of names to numbers")
    if len(metrics) > MAX_METRICS:
        raise MetricsError(f"{what}: {len(metrics)} metrics; at most {MAX_METRICS} are kept")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or len(name) > MAX_METRIC_NAME:
            raise MetricsError(f"{what}: metric names must be 1 to {MAX_METRIC_NAME} characters, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MetricsError(f"{what}: metric {name!r} must be a finite number, got {value!r}")
        out[name] = float(value)
    return out

"""ModelValidator: runs the trainer's validation and checks that it returns usable metrics."""

from __future__ import annotations

import math


class ModelValidator:
    """Validates the fitter's current model on the site's held-out data."""

    def validate(self, fitter) -> dict[str, float]:
        """The fitter's metrics as a dict of finite floats; raises ValueError naming a bad metric."""
        raw = fitter.validate()
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"validate() must return a non-empty dict of metrics, got {raw!r}")
        metrics = {}
        for k, v in raw.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metric {k!r} is not a number: {v!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"metric {k!r} is not finite: {value}")
            metrics[str(k)] = value
        return metrics

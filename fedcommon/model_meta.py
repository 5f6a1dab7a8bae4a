"""FLContext: properties that travel with one federated step (seed: fed_learn.model_meta)."""

from __future__ import annotations

from typing import Any


class FLContextKey:
    """Well-known property names."""

    RUN_NUMBER = "run_number"
    ROUND = "round"
    NUM_ROUNDS = "num_rounds"
    WEIGHT = "weight"
    METRICS = "metrics"
    TASK_NAME = "task_name"
    LOCAL_STEPS = "local_steps"  # S: local iterations behind this update (privacy filters divide by it)
    PRIVACY_PROTOCOL = "privacy_protocol"  # the filter applied to the update, set by the model manager
    PRIVACY_EPSILON = "privacy_epsilon"  # the epsilon that filtering spent
    CLIENT_STATE = "client_state"  # the site's ClientState for the call (after its client_state_processors)
    TRAIN_CONTEXT = "train_context"  # the site's own training context, handed to the privacy filter as train_ctx
    EXTRA_TENSORS = "extra_tensors"  # sent beside the update, after the privacy filter (SCAFFOLD's delta c_i)


class FLContext:
    """A property bag for one federated step: round, weight, metrics and what components add."""

    def __init__(self, props: dict[str, Any] | None = None):
        self._props: dict[str, Any] = dict(props or {})

    def set_prop(self, key: str, value: Any) -> None:
        self._props[key] = value

    def get_prop(self, key: str, default: Any = None) -> Any:
        return self._props.get(key, default)

    def get(self, key: str, default: Any = None) -> Any:
        """get_prop under the Mapping name, so filters can take an FLContext or a dict."""
        return self._props.get(key, default)

    def get_props(self) -> dict[str, Any]:
        return dict(self._props)

    def __repr__(self) -> str:
        return f"FLContext({self._props!r})"

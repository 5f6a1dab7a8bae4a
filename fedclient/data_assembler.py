"""DataAssembler: builds the tensors a site sends for a round from its model manager."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedcommon.model_meta import FLContext, FLContextKey


class DataAssembler:
    """Assembles outgoing model data."""

    @staticmethod
    def get_contribution_data(
        model_manager,
        task_name: str,
        client_state: Any,
        pre_processors: list[Callable] | None,
        fl_ctx: FLContext,
        app_ctx=None,
    ) -> Mapping[str, np.ndarray]:
        """The update (delta_w, privacy filter applied) passed through each pre_processor(tensors, fl_ctx).

        fl_ctx carries client_state (FLContextKey.CLIENT_STATE) to the privacy filter and the processors.
        Without processors it may be a Mapping whose differences are computed as they are read.
        """
        fl_ctx.set_prop(FLContextKey.CLIENT_STATE, client_state)
        tensors = model_manager.read_current_model(task_name, "delta_w", train_ctx=fl_ctx)
        if pre_processors:
            tensors = dict(tensors)  # a processor gets a dict, as the seed's API promises
        for processor in pre_processors or []:
            tensors = processor(tensors, fl_ctx)
        return tensors

    @staticmethod
    def get_best_local_model(
        model_manager, task_name: str, client_state: Any, disable: bool = False
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The best local model's tensors and metrics; empty when `disable` (the site does not share it)."""
        if disable:
            return {}, {}
        best = model_manager.get_best_model()
        if best is None:
            raise RuntimeError("no best local model: this site has not validated a model in this run")
        return best, dict(model_manager.best_metrics or {})

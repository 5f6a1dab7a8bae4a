"""DataAssembler: builds the tensors a site sends for a round from its model manager."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedcommon.model_meta import FLContext


class DataAssembler:
    """Assembles outgoing model data."""

    @staticmethod
    def get_contribution_data(model_manager, task_name: str, client_state: dict,
                              pre_processors: list[Callable] | None, fl_ctx: FLContext,
                              app_ctx=None) -> dict[str, np.ndarray]:
        """The update (delta_w, privacy filter applied) passed through each pre_processor(tensors, fl_ctx)."""
        tensors = model_manager.read_current_model(task_name, "delta_w", train_ctx=fl_ctx)
        for processor in pre_processors or []:
            tensors = processor(tensors, fl_ctx)
        return tensors

"""ModelProcessor: moves weights between a trainer's torch model and numpy dicts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedcommon.mmar import excluded
from fedcommon.torch_state import load_numpy_into_module, state_dict_to_numpy, writable_view


class ModelProcessor:
    """Reads and writes the `model` (a torch.nn.Module) of a trainer ("fitter")."""

    def extract_model(self, fitter) -> dict[str, np.ndarray]:
        """A numpy copy of every variable of the fitter's model, in state_dict order."""
        return state_dict_to_numpy(fitter.model.state_dict())

    def writable_model(self, fitter) -> dict[str, np.ndarray]:
        """Numpy arrays that are the fitter's variables' own memory, for those that can be written in place (dense,
        contiguous CPU tensors); a global model can be decoded straight into them."""
        views = ((name, writable_view(t)) for name, t in fitter.model.state_dict().items())
        return {name: view for name, view in views if view is not None}

    def apply_model(
        self, fitter, model_params: Mapping[str, np.ndarray], exclude_vars: tuple[str, ...] | str = ()
    ) -> bool:
        """Load `model_params` (minus excluded variables) into the fitter's model; True if anything changed."""
        keep = {k: v for k, v in model_params.items() if not excluded(k, exclude_vars)}
        return bool(load_numpy_into_module(fitter.model, keep))

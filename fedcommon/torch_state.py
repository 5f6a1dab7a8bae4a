"""torch state_dict <-> numpy arrays, exact for every carried dtype (bfloat16 via ml_dtypes)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedcommon.dtypes import BFLOAT16, bfloat16


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A copy of `t` as a numpy array; bfloat16 keeps its bits."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bfloat16()).copy()
    return t.numpy().copy()


def numpy_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch tensor with the same values and dtype as `arr` (bfloat16 included)."""
    arr = np.asarray(arr)  # a numpy scalar (from arithmetic on a 0-d array) becomes a 0-d array
    arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
    if arr.dtype.name == BFLOAT16:
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def state_dict_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every tensor of a state_dict as a numpy copy, in order."""
    return {k: tensor_to_numpy(v) for k, v in state.items()}


def load_numpy_into_module(module: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Copy `arrays` into the module's parameters and buffers in place; returns the names changed.

    Raises ValueError naming the variable when a name is unknown or a shape or dtype differs.
    """
    state = module.state_dict()
    sources = {}
    for name, arr in arrays.items():  # check everything first: a refused load changes nothing
        if name not in state:
            raise ValueError(f"variable {name!r} is not in the local model")
        target = state[name]
        src = numpy_to_tensor(arr)
        if tuple(src.shape) != tuple(target.shape) or src.dtype != target.dtype:
            raise ValueError(
                f"variable {name!r}: received {src.dtype}{list(src.shape)}, "
                f"local model has {target.dtype}{list(target.shape)}"
            )
        sources[name] = src
    changed = []
    with torch.no_grad():
        for name, src in sources.items():
            target = state[name]
            if not torch.equal(src, target):
                changed.append(name)
            target.copy_(src)
    return changed

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


def writable_view(t: torch.Tensor) -> np.ndarray | None:
    """A numpy array sharing `t`'s memory, for writing into it in place; None unless `t` is a dense, contiguous CPU
    tensor of a dtype numpy carries (bfloat16 included)."""
    t = t.detach()
    if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous() or t.is_conj() or t.is_neg():
        return None
    try:
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(bfloat16())
        return t.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy has no equivalent for (complex32, float8, quantized)
        return None


def _is_view_of(arr: np.ndarray, t: torch.Tensor) -> bool:
    """True when `arr` is exactly `t`'s memory (writable_view's array): nothing to copy."""
    view = writable_view(t)
    return (
        view is not None
        and arr.dtype == view.dtype
        and arr.shape == view.shape
        and arr.flags.c_contiguous
        and arr.ctypes.data == view.ctypes.data
    )


def state_dict_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every tensor of a state_dict as a numpy copy, in order."""
    return {k: tensor_to_numpy(v) for k, v in state.items()}


def load_numpy_into_module(module: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Copy `arrays` into the module's parameters and buffers in place; returns the names changed.

    An array that is the variable's own memory (writable_view's) is already in place: it counts as changed.
    Raises ValueError naming the variable when a name is unknown or a shape or dtype differs.
    """
    state = module.state_dict()
    sources = {}
    in_place = []
    for name, arr in arrays.items():  # check everything first: a refused load changes nothing
        if name not in state:
            raise ValueError(f"variable {name!r} is not in the local model")
        target = state[name]
        if isinstance(arr, np.ndarray) and _is_view_of(arr, target):
            in_place.append(name)
            continue
        src = numpy_to_tensor(arr)
        if tuple(src.shape) != tuple(target.shape) or src.dtype != target.dtype:
            raise ValueError(
                f"variable {name!r}: received {src.dtype}{list(src.shape)}, "
                f"local model has {target.dtype}{list(target.shape)}"
            )
        sources[name] = src
    changed = in_place
    with torch.no_grad():
        for name, src in sources.items():
            target = state[name]
            if not torch.equal(src, target):
                changed.append(name)
            target.copy_(src)
    return changed

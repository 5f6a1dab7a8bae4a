"""The tensor dtypes fedlearn carries, by wire name; bfloat16 is exact via ml_dtypes."""

from __future__ import annotations

import numpy as np

_BY_NAME: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "bool",
    )
}
BFLOAT16 = "bfloat16"
_SUPPORTED = ", ".join(sorted([*_BY_NAME, BFLOAT16]))


def bfloat16() -> np.dtype:
    """numpy's bfloat16 (ml_dtypes), imported on first use: importing ml_dtypes costs every process some 0.5 s of CPU,
    and only a model with bfloat16 variables needs it (a bfloat16 array exists only once it is imported)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


class DTypeError(ValueError):
    """A dtype fedlearn does not carry."""


def dtype_from_name(name: str) -> np.dtype:
    """The numpy dtype (little-endian) for a wire dtype name."""
    if name == BFLOAT16:
        return bfloat16()
    try:
        return _BY_NAME[name]
    except KeyError:
        raise DTypeError(f"unsupported dtype {name!r} (supported: {_SUPPORTED})") from None


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; raises DTypeError for dtypes not carried."""
    name = np.dtype(dtype).name
    if name not in _BY_NAME and name != BFLOAT16:
        raise DTypeError(f"unsupported dtype {name!r} (supported: {_SUPPORTED})")
    return name


def is_float(dtype: np.dtype) -> bool:
    """True for the floating dtypes, bfloat16 included."""
    return np.dtype(dtype).name in ("float16", "float32", "float64", "bfloat16")


def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype in which updates of a variable are summed: float32 up to 32 bits, else float64."""
    name = np.dtype(dtype).name
    return np.dtype(np.float32) if name in ("float16", "float32", "bfloat16") else np.dtype(np.float64)

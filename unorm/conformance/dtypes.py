"""Floating-point formats the suite knows: names, carriers, units in the last place.

NumPy has no bfloat16, so a bfloat16 value travels as the float32 with the same value
(its *carrier*): inputs are generated in float32 and rounded by the backend (or by
:func:`round_bfloat16` where no framework is involved), and results come back as float32.

Example:
    >>> float(ulp(1.0, "float16"))
    0.0009765625
    >>> param_dtype("bfloat16")
    'float32'
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DTYPES",
    "carrier",
    "cast",
    "param_dtype",
    "round_bfloat16",
    "ulp",
]

#: Every floating dtype a case can ask for, widest first.
DTYPES = ("float64", "float32", "float16", "bfloat16")

# (explicit mantissa bits, smallest normal exponent) of each format.
_FORMATS = {
    "float64": (52, -1022),
    "float32": (23, -126),
    "float16": (10, -14),
    "bfloat16": (7, -126),
}


def _check(dtype: str) -> str:
    if dtype not in _FORMATS:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def carrier(dtype: str) -> np.dtype:
    """The NumPy dtype that holds values of ``dtype`` exactly (float32 for bfloat16).

    Example:
        >>> carrier("bfloat16")
        dtype('float32')
    """
    return np.dtype("float32" if _check(dtype) == "bfloat16" else dtype)


def param_dtype(dtype: str) -> str:
    """Dtype of BatchNorm parameters and buffers for inputs of ``dtype`` (SPEC.md section 2,
    *Numerics and dtypes*, rule 4).

    Example:
        >>> param_dtype("float64"), param_dtype("float16")
        ('float64', 'float32')
    """
    return "float32" if _check(dtype) in ("float16", "bfloat16") else dtype


def round_bfloat16(a: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even), returned as float32 carriers.

    Used where no framework is at hand (the reference column, the suite's own tests);
    backends round with their own cast. NaN stays NaN, infinities stay infinite.

    Example:
        >>> round_bfloat16(np.array([1.0 + 2.0**-9], np.float32)).tolist()
        [1.0]
    """
    f32 = np.ascontiguousarray(a, dtype=np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    # Round to nearest even on the 16 bits that bfloat16 drops.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f32), f32, out).reshape(f32.shape)


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` with NumPy, in its carrier dtype.

    Example:
        >>> cast(np.array([1.0 + 2.0**-12]), "float16").tolist()
        [1.0]
    """
    if _check(dtype) == "bfloat16":
        return round_bfloat16(np.asarray(a, dtype=np.float32))
    with np.errstate(over="ignore"):  # overflow to inf is the cast's meaning
        return np.asarray(a).astype(dtype)


def ulp(x: np.ndarray | float, dtype: str) -> np.ndarray:
    """Unit in the last place of ``|x|`` in ``dtype`` (subnormal spacing near zero).

    Example:
        >>> float(ulp(3.0, "float32")) == 2.0**-22
        True
    """
    nmant, minexp = _FORMATS[_check(dtype)]
    mag = np.maximum(np.abs(np.asarray(x, dtype=np.float64)), 2.0**minexp)
    return np.asarray(2.0 ** (np.floor(np.log2(mag)) - nmant))

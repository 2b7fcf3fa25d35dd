"""The AGC clip of one gradient, written with ``keras.ops`` (``SPEC.md``, AGC, Definition).

Per output unit ``i``: ``max_i = clipping * max(||W_i||, eps)``; where
``||G_i|| > max_i`` (and finite), ``G_i`` becomes ``G_i * max_i / max(||G_i||, 1e-6)``.
Norms and the factor are computed in float32 or wider; the decision is a device-side
``where`` on per-unit tensors and the gradient is multiplied once by the per-unit factor,
which is exactly 1 for units left alone (``x * 1.0 == x`` bit for bit in IEEE arithmetic,
also after the float32 round trip of a 16-bit gradient). No value is read back to the
host, so the clip adds no synchronisation.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from ..spec import AGC_GRAD_NORM_FLOOR, AGCSpec

__all__ = ["clip_gradient", "unit_norms"]


def unit_norms(x: Any, unit_axes: tuple[int, ...]) -> Any:
    """Frobenius norm of each unit of ``x`` over every axis but the (non-negative)
    ``unit_axes``, kept broadcastable against ``x``."""
    reduce = tuple(i for i in range(len(x.shape)) if i not in unit_axes)
    if not reduce:  # every element is its own unit (or a scalar)
        return ops.abs(x)
    # Not tf.math.reduce_euclidean_norm (one kernel, ~15% faster on CPU): XLA has no
    # kernel for it, and the clip must compile inside model.fit(jit_compile=True).
    return ops.sqrt(ops.sum(ops.square(x), axis=reduce, keepdims=True))


def clip_gradient(grad: Any, weight: Any, unit_axes: tuple[int, ...], settings: AGCSpec) -> Any:
    """AGC of one gradient against its weight; returns a tensor of ``grad``'s dtype.

    ``unit_axes`` are non-negative axes of ``grad`` (empty: one unit).

    Example:
        >>> import numpy as np
        >>> g = clip_gradient(np.array([[3.0, 4.0]], "float32"), np.array([[100.0, 0.0]],
        ...                   "float32"), (0,), AGCSpec(clipping=0.01))
        >>> np.asarray(g).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    dtype = keras.backend.standardize_dtype(grad.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(f"grad must have a floating-point dtype, got {dtype}")
    wide = keras.backend.result_type(dtype, "float32")
    g = ops.cast(grad, wide)
    w = ops.cast(weight, wide)
    max_norm = ops.maximum(unit_norms(w, unit_axes), settings.eps) * settings.clipping
    g_norm = unit_norms(g, unit_axes)
    clip = ops.logical_and(ops.isfinite(g_norm), ops.greater(g_norm, max_norm))
    factor = ops.where(clip, max_norm / ops.maximum(g_norm, AGC_GRAD_NORM_FLOOR), 1.0)
    return ops.cast(g * factor, dtype)

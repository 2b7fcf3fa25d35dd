"""The AGC clip of gradients, written with ``keras.ops`` (``SPEC.md`` section 5, *Definition*).

Per output unit ``i``: ``max_i = clipping * max(||W_i||, eps)``; where
``||G_i|| > max_i`` (and finite), ``G_i`` becomes ``G_i * max_i / max(||G_i||, 1e-6)``.
Norms and the factor are computed in float32 or wider; the decision is a device-side
``where`` on per-unit tensors and the gradient is multiplied once by the per-unit factor,
which is exactly 1 for units left alone (``x * 1.0 == x`` bit for bit in IEEE arithmetic,
also after the float32 round trip of a 16-bit gradient). No value is read back to the
host, so the clip adds no synchronisation.

Speed (``benchmarks/bench_keras.py``, ``agc_step``): a model has hundreds of variables
and most are small, so :func:`clip_gradients` clips a whole update at once: one
sum-of-squares vector per tensor, then the thresholds and factors of every unit of every
variable in one concatenated vector (a dozen ops instead of a dozen per variable). A
unit's sum of squares over the leading axes is a matrix product with a vector of ones,
because TensorFlow's CPU column reduction (``reduce_sum`` over every axis but the last)
runs at about a third of the memory bandwidth and the product near all of it (not
under XLA, where the plain sum is the faster).

The clip's multiply runs at the speed of a plain elementwise product. Formulations that
were measured and not taken are listed in ``benchmarks/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from ..spec import AGC_GRAD_NORM_FLOOR, AGCSpec

__all__ = ["clip_gradient", "clip_gradients", "unit_sum_squares"]


def unit_sum_squares(x: Any, unit_axes: tuple[int, ...]) -> Any:
    """Sum of squares of each unit of ``x`` over every axis but the (non-negative)
    ``unit_axes``, as a flat vector in the units' C order (one entry when ``unit_axes``
    is empty: the whole tensor is one unit).

    Example:
        >>> import numpy as np
        >>> np.asarray(unit_sum_squares(np.array([[3.0, 1.0], [4.0, 0.0]]), (1,))).tolist()
        [25.0, 1.0]
    """
    x = ops.convert_to_tensor(x)
    rank = len(x.shape)
    if not unit_axes:
        return ops.reshape(ops.sum(ops.square(x)), (1,))
    trailing = tuple(range(rank - len(unit_axes), rank))
    if tuple(unit_axes) == trailing and _sum_by_matmul(x.dtype) and None not in x.shape:
        units = 1
        for axis in unit_axes:
            units *= int(x.shape[axis])
        rows = ops.reshape(ops.square(x), (-1, units))
        ones = ops.ones((1, int(rows.shape[0])), dtype=rows.dtype)
        return ops.reshape(ops.matmul(ones, rows), (-1,))
    reduce = tuple(i for i in range(rank) if i not in unit_axes)
    if not reduce:  # every element is its own unit
        return ops.reshape(ops.square(x), (-1,))
    return ops.reshape(ops.sum(ops.square(x), axis=reduce), (-1,))


def _sum_by_matmul(dtype: Any) -> bool:
    """Whether to take a unit's sum of squares as a product with a vector of ones rather
    than as a ``sum``: on TensorFlow's own kernels, where it is 1.4x faster at ResNet-50's
    variables, and only where the product is computed in full float32 (not in TF32, which
    TensorFlow uses for float32 products on recent GPUs by default and which would round
    the norms to ~1e-3). Not under XLA, which fuses the square into the reduction but runs
    the product 3x slower, nor on the other backends."""
    if keras.backend.backend() != "tensorflow":
        return False
    from .tf_runtime import compiling_with_xla, float32_matmul_is_exact

    if compiling_with_xla():
        return False
    return keras.backend.standardize_dtype(dtype) == "float64" or float32_matmul_is_exact()


def _factor_shape(x: Any, unit_axes: tuple[int, ...]) -> list[Any]:
    """The shape a flat per-unit vector takes to broadcast against ``x`` (a dimension
    known only at run time, e.g. an embedding gradient's row count, stays a tensor)."""
    shape = ops.shape(x)
    return [shape[i] if i in unit_axes else 1 for i in range(len(shape))]


def _check_float(grad: Any) -> str:
    dtype = keras.backend.standardize_dtype(grad.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(f"grad must have a floating-point dtype, got {dtype}")
    return str(dtype)


#: One-unit gradients of at most this many values are clipped as one concatenated vector:
#: a model's many biases and norm scales then cost a handful of ops instead of a handful
#: each (1.7 ms of ResNet-50's step on a 2-core CPU).
_PACK_LIMIT = 1 << 16


def _size(x: Any) -> int:
    n = 1
    for d in x.shape:
        n *= int(d)
    return n


def _factors(w_sq: Any, g_sq: Any, settings: AGCSpec) -> Any:
    """Per-unit clip factors from the units' sums of squares (1 where left alone)."""
    w_norm, g_norm = ops.sqrt(w_sq), ops.sqrt(g_sq)
    max_norm = ops.maximum(w_norm, settings.eps) * settings.clipping
    clip = ops.logical_and(ops.isfinite(g_norm), ops.greater(g_norm, max_norm))
    return ops.where(clip, max_norm / ops.maximum(g_norm, AGC_GRAD_NORM_FLOOR), 1.0)


def _split(x: Any, sizes: list[int]) -> list[Any]:
    if len(sizes) == 1:
        return [x]
    return list(ops.split(x, [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]))


def _clip_batch(
    grads: list[Any], weights: list[Any], unit_axes: list[tuple[int, ...]], settings: AGCSpec
) -> list[Any]:
    """AGC of gradients that share one computation dtype (and, when more than one, have
    static shapes): every unit's factor from one concatenated vector of norms."""
    many = len(grads) > 1
    packed = [
        i for i, g in enumerate(grads) if many and not unit_axes[i] and _size(g) <= _PACK_LIMIT
    ]
    alone = sorted(set(range(len(grads))) - set(packed))
    w_sq = [unit_sum_squares(weights[i], unit_axes[i]) for i in alone]
    g_sq = [unit_sum_squares(grads[i], unit_axes[i]) for i in alone]
    if packed:
        sizes = [_size(grads[i]) for i in packed]
        segments = np.repeat(np.arange(len(packed), dtype="int32"), sizes)
        flat_g = ops.concatenate([ops.reshape(grads[i], (-1,)) for i in packed], axis=0)
        flat_w = ops.concatenate([ops.reshape(weights[i], (-1,)) for i in packed], axis=0)
        for flat, sums in ((flat_w, w_sq), (flat_g, g_sq)):
            sums.append(ops.segment_sum(ops.square(flat), segments, num_segments=len(packed)))
    factor = _factors(ops.concatenate(w_sq, axis=0), ops.concatenate(g_sq, axis=0), settings)
    pieces = _split(factor, [int(v.shape[0]) for v in w_sq] if many else [1])
    out: list[Any] = [None] * len(grads)
    for i, piece in zip(alone, pieces, strict=False):
        out[i] = grads[i] * ops.reshape(piece, _factor_shape(grads[i], unit_axes[i]))
    if packed:
        scaled = flat_g * ops.take(pieces[-1], segments)
        for i, part in zip(packed, _split(scaled, sizes), strict=True):
            out[i] = ops.reshape(part, grads[i].shape)
    return out


def clip_gradients(
    grads: Sequence[Any],
    weights: Sequence[Any],
    unit_axes: Sequence[tuple[int, ...]],
    settings: AGCSpec,
) -> list[Any]:
    """AGC of several gradients against their weights at once; each result has its
    gradient's dtype and shape. ``unit_axes[k]`` are non-negative axes of ``grads[k]``
    (empty: one unit). Gives what :func:`clip_gradient` gives one by one (up to the order
    in which a unit's squares are summed).

    Example:
        >>> import numpy as np
        >>> g = np.array([[3.0, 4.0]], "float32")
        >>> w = np.array([[100.0, 0.0]], "float32")
        >>> [np.asarray(c).tolist() for c in clip_gradients([g, g], [w, w], [(0,), ()],
        ...                                                  AGCSpec(clipping=0.01))]
        [[[0.6000000238418579, 0.800000011920929]], [[0.6000000238418579, 0.800000011920929]]]
    """
    grads, weights, unit_axes = list(grads), list(weights), list(unit_axes)
    if not len(grads) == len(weights) == len(unit_axes):
        raise ValueError(
            f"grads, weights and unit_axes must have one entry per variable, got "
            f"{len(grads)}, {len(weights)} and {len(unit_axes)}"
        )
    grads = [ops.convert_to_tensor(g) for g in grads]
    dtypes = [_check_float(g) for g in grads]
    out: list[Any] = list(grads)
    # One batch per computation dtype (float32, or float64 for float64 gradients); a
    # gradient whose shape is known only at run time goes alone (its unit count is too).
    batches: dict[Any, list[int]] = {}
    for k, dtype in enumerate(dtypes):
        wide = str(keras.backend.result_type(dtype, "float32"))
        static = all(d is not None for d in grads[k].shape)
        batches.setdefault((wide, -1) if static else (wide, k), []).append(k)
    for (wide, _), members in batches.items():
        clipped = _clip_batch(
            [ops.cast(grads[k], wide) for k in members],
            [ops.cast(weights[k], wide) for k in members],
            [unit_axes[k] for k in members],
            settings,
        )
        for k, c in zip(members, clipped, strict=True):
            out[k] = ops.cast(c, dtypes[k])
    return out


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
    return clip_gradients([grad], [weight], [unit_axes], settings)[0]

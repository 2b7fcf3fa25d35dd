"""Per-feature batch statistics for :class:`unorm.keras.BatchNorm`, in float32 or wider.

Two passes everywhere (``SPEC.md`` section 1): the mean, then the mean squared
deviation from it, never ``E[x^2] - E[x]^2``. On TensorFlow that is ``ops.moments``
itself (``tf.nn.moments``), the op Keras's own layer uses, which keeps ``preset="keras"``
bit-identical to it; Keras's torch backend implements ``ops.moments`` as
``E[x^2] - E[x]^2``, so there (and on JAX) the two passes are written out.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = [
    "count",
    "keras_masked_moments",
    "masked_moments",
    "moments",
    "shift_by_first",
    "shift_by_first_unmasked",
    "tensorflow_backend",
]


def tensorflow_backend() -> bool:
    """Whether Keras runs on TensorFlow."""
    return bool(keras.backend.backend() == "tensorflow")


def moments(x: Any, axes: list[int]) -> tuple[Any, Any]:
    """Mean and biased variance of ``x`` over ``axes`` (two-pass)."""
    if tensorflow_backend():
        mean, variance = ops.moments(x, axes=axes)
        return mean, variance
    mean = ops.mean(x, axis=axes, keepdims=True)
    variance = ops.mean(ops.square(x - mean), axis=axes)
    return ops.squeeze(mean, axis=axes), variance


def shift_by_first(x: Any, axes: list[int]) -> tuple[Any, Any]:
    """``x`` minus, per feature, its first value along ``axes``, and that shift (a
    per-feature vector). The shift is a constant to autodiff, so gradients through the
    shifted tensor are those through ``x``; statistics of the shifted tensor are those of
    ``x`` (the mean less the shift) but keep their float32 digits when the mean is large
    against the spread. An empty batch gives the shift 0 and an empty result."""
    first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(len(x.shape)))
    shift = ops.stop_gradient(x[first])
    if any(x.shape[i] is None or x.shape[i] == 0 for i in axes):
        # A batch that may be empty (its size known only when the graph runs): the sum of
        # its one first value, or of none, keeps the shift one value per feature.
        shift = ops.sum(shift, axis=axes, keepdims=True)
    return x - shift, ops.reshape(shift, (-1,))


def mask_weights(mask: Any, x: Any, dtype: Any) -> Any:
    """``mask`` (``x``'s shape without its last axis) as 1/0 of ``dtype``, broadcast over
    ``x``'s last axis to ``x``'s shape, as Keras's layer applies it."""
    return ops.broadcast_to(ops.cast(ops.expand_dims(mask, -1), dtype), ops.shape(x))


def shift_by_first_unmasked(x: Any, mask: Any, axis: int) -> tuple[Any, Any]:
    """:func:`shift_by_first` for a masked call: each feature is shifted by its first
    value that the mask keeps (``mask`` has ``x``'s shape without its last axis and is
    broadcast over it, as in :func:`masked_moments`); a feature with no kept value, and
    an empty batch, by 0 (``fully_masked="zero"`` gives such a feature mean 0 of the
    unshifted input). ``axis`` is the (non-negative) feature axis."""
    keep = mask_weights(mask, x, "int32")
    channels = x.shape[axis]
    values = ops.reshape(ops.moveaxis(x, axis, -1), (-1, channels))
    kept = ops.reshape(ops.moveaxis(keep, axis, -1), (-1, channels))
    if values.shape[0] is not None and values.shape[0] > 0:
        first = ops.expand_dims(ops.argmax(kept, axis=0), 0)  # the first 1 of each column
        shift = ops.stop_gradient(ops.take_along_axis(values, first, axis=0))
    else:
        # The row count may be 0 when the graph runs, where argmax and gather fail (also
        # in an untaken branch under XLA): the first kept row by a minimum, its value by
        # a sum that is 0 over no rows. One more pass, only where the size is unknown.
        rows = ops.shape(values)[0]
        index = ops.expand_dims(ops.arange(rows), -1)
        first = ops.min(ops.where(kept > 0, index, rows), axis=0, keepdims=True)
        first = ops.where(ops.equal(first, rows), 0, first)
        picked = ops.where(ops.equal(index, first), values, ops.zeros_like(values))
        shift = ops.stop_gradient(ops.sum(picked, axis=0, keepdims=True))
    shift = ops.where(ops.greater(ops.max(kept, axis=0, keepdims=True), 0), shift, 0)
    broadcast = [1] * len(x.shape)
    broadcast[axis] = channels
    return x - ops.reshape(shift, broadcast), ops.reshape(shift, (-1,))


def masked_moments(x: Any, mask: Any, axes: list[int]) -> tuple[Any, Any, Any]:
    """Mean, biased variance and count of the unmasked values of each feature.

    ``mask`` has ``x``'s shape without its last axis and is broadcast over it, as in
    Keras's layer; the count is a per-feature tensor.
    """
    weights = mask_weights(mask, x, x.dtype)
    kept = ops.greater(weights, 0)
    # keepdims: the mean must broadcast along the feature axis wherever it is.
    total = ops.sum(weights, axis=axes, keepdims=True)
    # where, not a product: a masked NaN or inf (padding) times 0 would still be NaN.
    mean = ops.sum(ops.where(kept, x, 0), axis=axes, keepdims=True) / ops.maximum(total, 1.0)
    centred = ops.where(kept, x - mean, 0)
    variance = ops.sum(centred * centred, axis=axes, keepdims=True) / ops.maximum(total, 1.0)
    flat = [ops.reshape(t, (-1,)) for t in (mean, variance, total)]
    return flat[0], flat[1], flat[2]


def keras_masked_moments(x: Any, mask: Any, axes: list[int]) -> tuple[Any, Any, Any]:
    """Mean, biased variance and count of the unmasked values of each feature in the
    arithmetic of ``keras.layers.BatchNormalization`` (its ``_moments``), op for op:
    sums over the kept values divided by ``count + keras.config.epsilon()``, so a feature
    the mask keeps nothing of has mean 0 and variance 0 (``preset="keras"``)."""
    kept = ops.cast(ops.broadcast_to(ops.expand_dims(mask, axis=-1), ops.shape(x)), "bool")
    total = ops.sum(ops.cast(kept, x.dtype), axes, keepdims=True)
    denominator = total + keras.config.epsilon()
    mean = ops.sum(ops.where(kept, x, 0), axes, keepdims=True) / denominator
    squared = ops.square(ops.where(kept, x - mean, 0))
    variance = ops.sum(squared, axes, keepdims=True) / denominator
    flat = [ops.reshape(t, (-1,)) for t in (mean, variance, total)]
    return flat[0], flat[1], flat[2]


def count(x: Any, axes: list[int]) -> Any:
    """Values per feature: an int when the shape is static, else an int64 tensor (a
    ``tf.function`` traced with a ``None`` batch axis)."""
    shape = x.shape
    if all(shape[i] is not None for i in axes):
        n = 1
        for i in axes:
            n *= int(shape[i])
        return n
    dynamic = ops.shape(x)
    total = ops.convert_to_tensor(1, dtype="int64")
    for i in axes:
        total = total * ops.cast(dynamic[i], "int64")
    return total

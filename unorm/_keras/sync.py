"""Cross-replica batch statistics under ``tf.distribute`` (``SPEC.md`` section 3).

Each replica sums its slice; one all-reduce gives the global count and sum, hence the
global mean; a second pass sums each replica's squared deviations from that global mean
and a second all-reduce adds them up. The result is the two-pass statistics of the
concatenated batch, i.e. Chan's exact merge of the per-replica ``(n, mean, M2)`` without
its rounding-prone cross terms, so uneven and empty per-replica batches give the
single-device numbers. ``tf.distribute``'s all-reduce is differentiable (its gradient is
the all-reduce of the gradients), so the backward pass reduces ``sum(dy)`` and
``sum(dy * xhat)`` across replicas as the spec asks, with no code of its own.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["replica_count", "synchronized_moments"]


def replica_count() -> int:
    """Replicas in sync in the current replica context; 1 outside any strategy."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return 1
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def synchronized_moments(x: Any, axes: list[int], weights: Any = None) -> tuple[Any, Any, Any, Any]:
    """Global mean and biased variance over ``axes`` of ``x`` across replicas, the global
    count (a float tensor) and the global number of values per feature by shape (a float
    scalar; 0 when every replica's slice is empty, ``SPEC.md`` section 2, *Empty batch*).
    ``x`` is float32 or wider; ``weights`` (1 for kept, 0 for masked values, ``x``'s
    shape), when given, leaves masked values out, and the count is then one per
    feature."""
    context = tf.distribute.get_replica_context()
    shape = tf.shape(x, out_type=tf.int64)
    local_size = tf.cast(tf.reduce_prod(tf.gather(shape, axes)), x.dtype)
    if weights is None:
        local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
        # keepdims: the mean must broadcast along the feature axis wherever it is
        # (channels first or last), not only when it is the last axis.
        count, total = context.all_reduce(tf.distribute.ReduceOp.SUM, [local_size, local_sum])
        size = count
    else:
        local_count = tf.reduce_sum(weights, axis=axes, keepdims=True)
        local_sum = tf.reduce_sum(x * weights, axis=axes, keepdims=True)
        count, total, size = context.all_reduce(
            tf.distribute.ReduceOp.SUM, [local_count, local_sum, local_size]
        )
    # An empty global batch gives 0/0, here 0; the caller handles it (or, for a mask
    # that keeps nothing, its count check reports it).
    mean = tf.math.divide_no_nan(total, count)
    squared = tf.math.squared_difference(x, mean)
    if weights is not None:
        squared = squared * weights
    local_m2 = tf.reduce_sum(squared, axis=axes, keepdims=True)
    m2 = context.all_reduce(tf.distribute.ReduceOp.SUM, local_m2)
    variance = tf.math.divide_no_nan(m2, count)
    count = count if weights is None else tf.reshape(count, [-1])
    return tf.reshape(mean, [-1]), tf.reshape(variance, [-1]), count, size

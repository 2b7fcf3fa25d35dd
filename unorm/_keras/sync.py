"""Cross-replica batch statistics (``SPEC.md`` section 3) on the Keras backends that have
them.

TensorFlow (``tf.distribute``: ``MirroredStrategy``, ``MultiWorkerMirroredStrategy``, any
strategy with a replica context): each replica sums its slice; one all-reduce gives the
global count and sum, hence the global mean; a second pass sums each replica's squared
deviations from that global mean and a second all-reduce adds them up. The result is the
two-pass statistics of the concatenated batch, i.e. Chan's exact merge of the per-replica
``(n, mean, M2)`` without its rounding-prone cross terms, so uneven and empty per-replica
batches give the single-device numbers. ``tf.distribute``'s all-reduce is differentiable
(its gradient is the all-reduce of the gradients), so the backward pass reduces
``sum(dy)`` and ``sum(dy * xhat)`` across replicas as the spec asks, with no code of its
own.

JAX (``keras.distribution.DataParallel``, or any ``jax.jit`` over arrays sharded on the
batch axis): Keras compiles the step over the *global* arrays, laid out over the devices
(XLA's SPMD partitioner), so the layer's reductions over the batch axis already cover
every device's shard; XLA inserts the cross-device sums, forward and backward, and nothing
is added here. XLA shards an axis into equal parts, so uneven shards are written as equal
shards padded with samples that the layer's ``mask`` leaves out (``SPEC.md`` section 3,
*Uneven shards on JAX*). Code that sees one device's shard (``jax.shard_map``,
``jax.pmap``) would merge nothing, and is refused (:func:`replica_count`). Keras's own
layer accepts ``synchronized=True`` only on TensorFlow (keras-team/keras#18667, done for
TensorFlow alone in keras-team/keras#18671).

Keras's torch backend has no distribution of its own (``keras.distribution`` has no torch
implementation; a model wrapped in ``torch.nn.parallel.DistributedDataParallel`` sees one
process's batch), so ``synchronized=True`` is refused there (:func:`unsupported_backend`).

TensorFlow and JAX are imported only by the function that needs them.
"""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["replica_count", "synchronized_moments", "unsupported_backend"]


def unsupported_backend() -> str | None:
    """Why ``synchronized=True`` cannot work on the current Keras backend (a message for
    the ``ValueError``), or None on TensorFlow and JAX."""
    backend = keras.backend.backend()
    if backend in ("tensorflow", "jax"):
        return None
    return (
        f"synchronized must be False with the {backend!r} backend: True needs TensorFlow "
        "(a tf.distribute strategy) or JAX (keras.distribution, e.g. DataParallel); Keras's "
        f"{backend} backend has no distribution of its own"
        + (
            " (under torch.distributed, use unorm.torch.SyncBatchNorm in a torch model)"
            if backend == "torch"
            else ""
        )
    )


def replica_count() -> int:
    """Replicas whose batch statistics :func:`synchronized_moments` merges: on TensorFlow,
    the replicas in sync in the current replica context (1 outside any strategy); on JAX
    1, as the layer computes on the global array, sharded or not.

    Raises ``ValueError`` on JAX inside ``jax.shard_map`` or ``jax.pmap`` (a mesh axis
    is manual there, and the code sees one device's shard, whose statistics nothing would
    merge)."""
    if keras.backend.backend() == "jax":
        import jax

        manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
        if manual:
            raise ValueError(
                "synchronized=True needs the global batch, but this call sees one device's "
                f"shard (inside jax.shard_map or jax.pmap, over mesh axes {manual}); call "
                "the layer under keras.distribution (e.g. DataParallel) or jax.jit over "
                "sharded arrays, or use synchronized=False for per-shard statistics"
            )
        return 1
    import tensorflow as tf

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
    feature. TensorFlow only (:func:`replica_count` is 1 elsewhere)."""
    import tensorflow as tf

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
        # where, not a product: masked padding that is NaN or inf times 0 is still NaN.
        kept = weights > 0
        local_sum = tf.reduce_sum(tf.where(kept, x, 0), axis=axes, keepdims=True)
        count, total, size = context.all_reduce(
            tf.distribute.ReduceOp.SUM, [local_count, local_sum, local_size]
        )
    # An empty global batch gives 0/0, here 0; the caller handles it (or, for a mask
    # that keeps nothing, its count check reports it).
    mean = tf.math.divide_no_nan(total, count)
    squared = tf.math.squared_difference(x, mean)
    if weights is not None:
        squared = tf.where(kept, squared, 0)
    local_m2 = tf.reduce_sum(squared, axis=axes, keepdims=True)
    m2 = context.all_reduce(tf.distribute.ReduceOp.SUM, local_m2)
    variance = tf.math.divide_no_nan(m2, count)
    count = count if weights is None else tf.reshape(count, [-1])
    return tf.reshape(mean, [-1]), tf.reshape(variance, [-1]), count, size

"""Where AGC runs inside a Keras optimizer's update (``SPEC.md``, AGC, Where AGC runs).

The clip must see the *effective* gradient, the one the update consumes: after loss-scale
unscaling, after gradient accumulation (once per update, on the accumulated mean), after
the data-parallel all-reduce. Keras's public ``apply(grads, variables)`` is too early for
the last two (it sees each micro-batch, and each replica's local gradient), and the
optimizer's ``_clip_gradients(grads)`` hook sees no variables. So AGC wraps, on the
wrapped optimizer instance only, the one internal step that has both:

- TensorFlow: ``_all_reduce_sum_gradients(grads_and_vars)``, called by the update step
  after accumulation and unscaling; AGC clips what it returns (the all-reduced sum, the
  same on every replica).
- other backends: ``_backend_update_step(grads, variables, learning_rate)``, where the
  gradients are already final (JAX and torch reduce them outside the optimizer).

Both are per-instance attributes: the optimizer's class and every other instance are
left alone, and the optimizer's own configuration and state are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras

from ..spec import AGCSpec
from .clip import clip_gradient
from .layout import VariableSetting

__all__ = ["innermost", "install"]

_MARK = "_unorm_agc_hooked"


def innermost(optimizer: Any) -> Any:
    """The optimizer that runs the update, through ``inner_optimizer`` wrappers
    (``LossScaleOptimizer``, AGC itself)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def _clip_dense_or_sparse(grad: Any, weight: Any, axes: tuple[int, ...], spec: AGCSpec) -> Any:
    import tensorflow as tf

    if not isinstance(grad, tf.IndexedSlices):
        return clip_gradient(grad, weight, axes, spec)
    if 0 not in axes:
        # Units span rows: clip the dense gradient (rare: an override on an embedding).
        return clip_gradient(tf.convert_to_tensor(grad), weight, axes, spec)
    # Rows are independent units (an Embedding's gradient): sum repeated rows, as the
    # dense gradient would, then clip only the rows that have a gradient.
    rows, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(rows)[0])
    clipped = clip_gradient(values, tf.gather(weight, rows), axes, spec)
    return tf.IndexedSlices(clipped, rows, grad.dense_shape)


def install(
    optimizer: Any, settings: Callable[[], Sequence[VariableSetting]], spec: AGCSpec
) -> None:
    """Make ``optimizer`` (built) clip each update's gradients with AGC.

    ``settings()`` gives the per-variable settings in the order of the optimizer's
    variables. Installing twice on one optimizer is an error: it would clip twice.
    """
    if getattr(optimizer, _MARK, False):
        raise ValueError(f"optimizer {optimizer.name!r} is already wrapped by an AGC; wrap it once")

    def clip(grad: Any, variable: Any) -> Any:
        if grad is None:
            return None
        setting = settings()[optimizer._get_variable_index(variable)]
        if setting.excluded:
            return grad
        if keras.backend.backend() == "tensorflow":
            return _clip_dense_or_sparse(grad, variable, setting.unit_axes, spec)
        return clip_gradient(grad, variable, setting.unit_axes, spec)

    if keras.backend.backend() == "tensorflow":
        all_reduce = optimizer._all_reduce_sum_gradients

        def all_reduce_then_clip(grads_and_vars: Any) -> list[tuple[Any, Any]]:
            return [(clip(g, v), v) for g, v in all_reduce(grads_and_vars)]

        object.__setattr__(optimizer, "_all_reduce_sum_gradients", all_reduce_then_clip)
    else:
        update_step = optimizer._backend_update_step

        def clip_then_update(grads: Any, variables: Any, learning_rate: Any) -> Any:
            clipped = [clip(g, v) for g, v in zip(grads, variables, strict=True)]
            return update_step(clipped, variables, learning_rate)

        object.__setattr__(optimizer, "_backend_update_step", clip_then_update)
    object.__setattr__(optimizer, _MARK, True)

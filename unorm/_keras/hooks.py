"""Where AGC runs inside a Keras optimizer's update (``SPEC.md`` section 5, *Where AGC
runs in a training step*).

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
from . import internals
from .clip import clip_gradient, clip_gradients
from .layout import VariableSetting

__all__ = ["innermost", "install"]

_MARK = "_unorm_agc_hooked"


def innermost(optimizer: Any) -> Any:
    """The optimizer that runs the update, through ``inner_optimizer`` wrappers
    (``LossScaleOptimizer``, AGC itself)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def _clip_sparse(grad: Any, weight: Any, axes: tuple[int, ...], spec: AGCSpec) -> Any:
    """AGC of an ``IndexedSlices`` gradient (an Embedding's)."""
    import tensorflow as tf

    if 0 not in axes:
        # Units span rows: clip the dense gradient (rare: an override on an embedding).
        return clip_gradient(tf.convert_to_tensor(grad), weight, axes, spec)
    # Rows are independent units: sum repeated rows, as the dense gradient would, then
    # clip only the rows that have a gradient.
    rows, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(rows)[0])
    clipped = clip_gradient(values, tf.gather(weight, rows), axes, spec)
    return tf.IndexedSlices(clipped, rows, grad.dense_shape)


def _sparse(grad: Any) -> bool:
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(grad, tf.IndexedSlices)


def install(
    optimizer: Any, settings: Callable[[], Sequence[VariableSetting]], spec: AGCSpec
) -> None:
    """Make ``optimizer`` (built) clip each update's gradients with AGC.

    ``settings()`` gives the per-variable settings in the order of the optimizer's
    variables. Installing twice on one optimizer is an error: it would clip twice.
    """
    if getattr(optimizer, _MARK, False):
        raise ValueError(f"optimizer {optimizer.name!r} is already wrapped by an AGC; wrap it once")

    def clip(grads: Sequence[Any], variables: Sequence[Any]) -> list[Any]:
        """The update's gradients, clipped: dense ones together (:func:`clip_gradients`),
        sparse ones one by one; ``None`` and excluded gradients pass unchanged."""
        out = list(grads)
        dense: list[int] = []
        axes: list[tuple[int, ...]] = []
        table = settings()
        for k, (grad, variable) in enumerate(zip(grads, variables, strict=True)):
            setting = table[internals.variable_index(optimizer, variable)]
            if grad is None or setting.excluded:
                continue
            if _sparse(grad):
                out[k] = _clip_sparse(grad, variable, setting.unit_axes, spec)
            else:
                dense.append(k)
                axes.append(setting.unit_axes)
        if dense:
            clipped = clip_gradients(
                [grads[k] for k in dense], [variables[k] for k in dense], axes, spec
            )
            for k, c in zip(dense, clipped, strict=True):
                out[k] = c
        return out

    if keras.backend.backend() == "tensorflow":

        def then_clip(all_reduce: Any) -> Any:
            def all_reduce_then_clip(grads_and_vars: Any) -> list[tuple[Any, Any]]:
                reduced = list(all_reduce(grads_and_vars))
                variables = [v for _, v in reduced]
                clipped = clip([g for g, _ in reduced], variables)
                return list(zip(clipped, variables, strict=True))

            return all_reduce_then_clip

        internals.replace_all_reduce(optimizer, then_clip)
    else:

        def clip_first(update_step: Any) -> Any:
            def clip_then_update(grads: Any, variables: Any, learning_rate: Any) -> Any:
                return update_step(clip(list(grads), list(variables)), variables, learning_rate)

            return clip_then_update

        internals.replace_update_step(optimizer, clip_first)
    object.__setattr__(optimizer, _MARK, True)

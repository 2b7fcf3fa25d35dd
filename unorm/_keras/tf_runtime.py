"""TensorFlow-only pieces of :class:`unorm.keras.BatchNorm` that run inside the graph.

- :func:`assert_count`: the one-value-per-feature check where the count is only known
  when the graph runs (a ``tf.function`` traced with a ``None`` batch axis, or the global
  count of a synchronized batch). A Python ``ValueError`` cannot be raised there; a
  TensorFlow assertion (``InvalidArgumentError``) with the same message is.
- :func:`update_on_backward`: the ``update_on="backward"`` mode (the ``mxnet`` preset),
  in which the moving statistics change only when a gradient flows back through the
  layer's output, as in MXNet's CPU kernel.
- :func:`fused_batch_norm_train`, :func:`fused_batch_norm_inference`: TensorFlow's fused
  BatchNorm kernel (statistics, output and, under a tape, the gradient in one kernel
  each), for the settings where its arithmetic is the spec's.
- :func:`compiling_with_xla` and :func:`float32_matmul_is_exact` pick the faster of two
  formulations of AGC's unit norms where both are exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from . import internals

__all__ = [
    "assert_count",
    "compiling_with_xla",
    "float32_matmul_is_exact",
    "fused_batch_norm_inference",
    "fused_batch_norm_train",
    "update_on_backward",
]


def assert_count(count: Any, allow_single_value: bool, message: str, *tensors: Any) -> list[Any]:
    """Fail the running graph unless ``count`` values per feature may be trained on, and
    return ``tensors`` made to wait for that check.

    ``count`` is an integer or float tensor; more than 1 value is needed, or more than 0
    with ``allow_single_value``. Whatever is computed from the returned tensors (the
    output, the moving-statistics update) runs only after the check has passed, so a
    failing call changes no state. Under XLA (``jit_compile=True``) assertions are not
    compiled: the layer then guards its update with the same condition instead.
    """
    floor = 0 if allow_single_value else 1
    check = tf.debugging.assert_greater(
        tf.cast(count, tf.float32), tf.constant(floor, tf.float32), message=message
    )
    with tf.control_dependencies([check] if check is not None else []):
        return [tf.identity(t) for t in tensors]


def _fused_kernel(
    x: Any, gamma: Any, beta: Any, stats: tuple[Any, Any] | None, eps: float
) -> tuple[Any, Any, Any]:
    """``FusedBatchNormV3`` on float32 ``x`` of any rank with features on its last axis,
    viewed as ``(1, 1, M, C)`` NHWC unless it has rank 4 (a reshape, not a copy).
    ``stats`` None: training on the batch's statistics; else ``(mean, variance)`` to
    normalise with. Returns ``y`` in ``x``'s shape and the kernel's mean and variance."""
    shape = tf.shape(x)
    channels = int(x.shape[-1])
    x4 = x if len(x.shape) == 4 else tf.reshape(x, [1, 1, -1, channels])
    ones = tf.ones([channels], x.dtype)
    y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=ones if gamma is None else gamma,
        offset=tf.zeros([channels], x.dtype) if beta is None else beta,
        mean=tf.zeros([channels], x.dtype) if stats is None else stats[0],
        variance=ones if stats is None else stats[1],
        epsilon=eps,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=stats is None,
    )
    return tf.reshape(y, shape), mean, variance


def fused_batch_norm_train(x: Any, gamma: Any, beta: Any, eps: float) -> tuple[Any, Any, Any]:
    """Batch normalisation of float32 ``x`` over every axis but the last with its own
    batch statistics, by ``FusedBatchNormV3``: returns ``y``, the batch mean and the
    biased batch variance (per feature). ``gamma``/``beta`` None: 1 and 0.

    One kernel computes mean, variance and output, and its registered gradient is one
    kernel too, where the composed form (``tf.nn.moments`` plus
    ``tf.nn.batch_normalization``, what Keras's own layer runs) takes a dozen passes over
    ``x`` (2x the time at ResNet shapes on CPU). The kernel's variance is the unbiased
    estimate; the biased one is recovered exactly enough (one rounding). The kernel's
    accuracy is that of ``E[x^2] - E[x]^2`` on some builds (oneDNN loses 1e-2 of ``y`` at
    mean 1e4, std 1), so the caller centres ``x`` first. At least 2 values per feature.
    Channels-first input is not taken: TensorFlow's CPU kernel transposes it.
    """
    y, mean, unbiased = _fused_kernel(x, gamma, beta, None, eps)
    n = tf.cast(tf.size(x, out_type=tf.int64) // int(x.shape[-1]), x.dtype)
    return y, mean, unbiased * ((n - 1.0) / n)


def fused_batch_norm_inference(
    x: Any, gamma: Any, beta: Any, mean: Any, variance: Any, eps: float
) -> Any:
    """``(x - mean) / sqrt(variance + eps) * gamma + beta`` for float32 ``x`` with features
    on its last axis, by ``FusedBatchNormV3`` in inference mode.

    As fast as ``tf.nn.batch_normalization`` (what Keras's own layer runs), and
    subtracts the mean before scaling: the composed ``x * s + (beta - mean * s)`` loses
    1e-3 of ``y`` at a running mean of 1e4 against a spread of 1, the kernel 4e-7.
    """
    return _fused_kernel(x, gamma, beta, (mean, variance), eps)[0]


def update_on_backward(y: Any, update: Callable[[], None]) -> Any:
    """Return ``y`` unchanged, running ``update()`` when the gradient of ``y`` is taken.

    The identity's gradient is the incoming gradient itself, so the values that flow
    back are exactly those without the hook.
    """

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def identity(t: Any) -> Any:
        def grad(dy: Any) -> Any:
            update()
            return tf.identity(dy)

        return tf.identity(t), grad

    return identity(y)


# Whether compiling_with_xla has warned that TensorFlow moved its XLA check.
_XLA_CHECK_MISSING_WARNED = False


def compiling_with_xla() -> bool:
    """Whether ops built now are compiled by XLA (inside ``tf.function(jit_compile=True)``,
    which ``model.fit`` uses with ``jit_compile=True``), by TensorFlow's own private check
    (:func:`unorm._keras.internals.graph_in_xla_context`). Where a TensorFlow release has
    moved that check, this warns once and answers True, the formulation that is correct
    and fast enough everywhere."""
    if tf.executing_eagerly():
        return False
    try:
        return internals.graph_in_xla_context(tf.compat.v1.get_default_graph())
    except (ImportError, AttributeError) as err:  # pragma: no cover - a TensorFlow that moved it
        global _XLA_CHECK_MISSING_WARNED
        if not _XLA_CHECK_MISSING_WARNED:
            _XLA_CHECK_MISSING_WARNED = True
            warnings.warn(
                f"unorm cannot tell whether TensorFlow compiles with XLA ({err}); AGC uses "
                "its formulation for XLA, which is exact everywhere and may be slower",
                RuntimeWarning,
                stacklevel=2,
            )
        return True


def float32_matmul_is_exact() -> bool:
    """Whether TensorFlow computes float32 matrix products in float32: not where a GPU is
    visible and TensorFlow-32 execution is enabled (TensorFlow's default), since TF32
    keeps only 10 bits of each factor's mantissa."""
    if not tf.config.experimental.tensor_float_32_execution_enabled():
        return True
    return not tf.config.list_physical_devices("GPU")

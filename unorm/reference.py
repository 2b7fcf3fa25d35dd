"""The NumPy reference of unorm's specification (``SPEC.md``), its executable twin.

Pure functions over NumPy arrays. Every computation runs in float64 and each result is
cast at the end to the dtype the spec says (the input's, unless ``out_dtype`` is given),
so the reference is the most accurate statement of what a backend should return. Works
with numpy 1.23 and 2.x; imports no framework.

Conventions: ``axis`` is the feature axis of ``x``; every other axis is reduced. Per-feature
arrays (``gamma``, ``beta``, running statistics) have shape ``(C,)``.

Example:
    >>> import numpy as np
    >>> from unorm import reference as ref
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> y, stats = ref.batch_norm_train(x, axis=1)
    >>> np.allclose(y.mean(axis=0), 0.0), stats.count
    (True, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .spec import (
    AGC_GRAD_NORM_FLOOR,
    AGCSpec,
    BatchNormSpec,
    ScaledWSSpec,
    UnitAxes,
    normalize_axis,
    normalize_unit_axes,
)

__all__ = [
    "BatchStats",
    "MaskedStats",
    "RenormStats",
    "RunningStats",
    "accumulated_stats",
    "agc_clip",
    "agc_clip_all",
    "agc_clipped_units",
    "agc_unit_axes",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm_inference_backward",
    "batch_norm_step",
    "batch_norm_train",
    "batch_renorm_backward",
    "batch_renorm_step",
    "batch_renorm_train",
    "batch_stats",
    "check_input",
    "fold_batch_norm",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_train",
    "ghost_fed_stats",
    "ghost_groups",
    "init_running_stats",
    "masked_batch_norm_backward",
    "masked_batch_norm_train",
    "masked_batch_stats",
    "merge_stats",
    "recalibrated_stats",
    "renorm_correction",
    "scaled_weight_standardize",
    "scaled_weight_standardize_backward",
    "unit_norms",
    "update_renorm_stats",
    "update_running_stats",
    "update_running_stats_masked",
]

F64 = NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """Per-feature statistics of a batch: ``count`` values, their ``mean`` and ``m2``.

    ``m2`` is the sum of squared deviations from the mean (Welford's / Chan's M2), so
    ``m2 / count`` is the biased and ``m2 / (count - 1)`` the unbiased variance. An empty
    batch has ``count == 0``, ``mean == 0`` and ``m2 == 0``.
    """

    count: int
    mean: F64
    m2: F64

    def var(self, unbiased: bool = False) -> F64:
        """The variance: ``m2 / count`` or, with ``unbiased``, ``m2 / (count - 1)``."""
        denominator = self.count - 1 if unbiased else self.count
        if denominator <= 0:
            raise ValueError(
                f"variance of {self.count} value(s) per channel is undefined "
                f"({'unbiased' if unbiased else 'biased'} estimator)"
            )
        return self.m2 / denominator


class RunningStats(NamedTuple):
    """Running statistics of a BatchNorm layer (float64 in the reference)."""

    mean: F64
    var: F64
    num_batches_tracked: int


def _f64(a: ArrayLike) -> F64:
    return np.asarray(a, dtype=np.float64)


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def _broadcast(v: F64, ndim: int, axis: int) -> F64:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _per_feature(v: ArrayLike, name: str, arr: np.ndarray, ax: int) -> F64:
    """``v`` as float64 after checking it has shape ``(C,)`` for ``arr``'s feature axis.

    NumPy would broadcast a length-1 (or scalar) array over every feature and silently
    return the wrong numbers for a layer with more than one feature, so only ``(C,)`` is
    accepted.
    """
    out = _f64(v)
    channels = arr.shape[ax]
    if out.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per feature on axis {ax} of an "
            f"input of shape {arr.shape}, got shape {out.shape}"
        )
    return out


def _check_stats(stats: BatchStats, arr: np.ndarray, ax: int) -> BatchStats:
    _per_feature(stats.mean, "stats.mean", arr, ax)
    _per_feature(stats.m2, "stats.m2", arr, ax)
    return stats


def check_input(x: ArrayLike, axis: int, num_features: int | None = None) -> tuple[np.ndarray, int]:
    """Validate a BatchNorm input and return it with its normalised feature axis.

    Raises ``ValueError`` naming the problem: rank below 2, a feature axis out of range,
    a non-floating dtype, or a feature count other than ``num_features``.

    Example:
        >>> check_input(np.zeros((2, 3), np.float32), axis=-1)[1]
        1
    """
    arr = np.asarray(x)
    if arr.ndim < 2:
        raise ValueError(
            f"input must have rank >= 2 (a batch axis and a feature axis), got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"input must have a floating-point dtype, got {arr.dtype}")
    ax = normalize_axis(axis, arr.ndim)
    if num_features is not None and arr.shape[ax] != num_features:
        raise ValueError(
            f"input must have {num_features} features on axis {axis}, "
            f"got shape {arr.shape} with {arr.shape[ax]}"
        )
    return arr, ax


def batch_stats(x: ArrayLike, axis: int = 1) -> BatchStats:
    """Per-feature count, mean and M2 of ``x`` (two-pass, float64).

    Example:
        >>> batch_stats(np.array([[1.0], [3.0]]), axis=1)
        BatchStats(count=2, mean=array([2.]), m2=array([2.]))
    """
    arr, ax = check_input(x, axis)
    data = arr.astype(np.float64)
    axes = _reduce_axes(data.ndim, ax)
    count = int(np.prod([data.shape[i] for i in axes]))
    channels = data.shape[ax]
    if count == 0:
        return BatchStats(0, np.zeros(channels), np.zeros(channels))
    # A non-finite input gives non-finite statistics; that is specified, not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        mean = data.mean(axis=axes)
        m2 = ((data - _broadcast(mean, data.ndim, ax)) ** 2).sum(axis=axes)
    return BatchStats(count, mean, m2)


def merge_stats(parts: Iterable[BatchStats]) -> BatchStats:
    """Merge per-replica statistics exactly (Chan et al. 1979, the k-way form).

    ``N = sum n_k``, ``mean = sum n_k mean_k / N``,
    ``M2 = sum M2_k + sum n_k (mean_k - mean)^2``. Empty replicas (``n_k == 0``)
    contribute nothing. The result equals :func:`batch_stats` of the concatenated batch.

    Example:
        >>> a = batch_stats(np.array([[1.0], [2.0]]))
        >>> b = batch_stats(np.array([[6.0]]))
        >>> merged = merge_stats([a, b])
        >>> merged.count, merged.mean, merged.m2
        (3, array([3.]), array([14.]))
    """
    items = list(parts)
    if not items:
        raise ValueError("merge_stats needs at least one replica's statistics")
    channels = {p.mean.shape for p in items}
    if len(channels) != 1:
        raise ValueError(f"replica statistics must share one shape, got {sorted(channels)}")
    total = sum(p.count for p in items)
    shape = items[0].mean.shape
    if total == 0:
        return BatchStats(0, np.zeros(shape), np.zeros(shape))
    mean = sum((p.count * _f64(p.mean) for p in items), np.zeros(shape)) / total
    m2 = sum(
        (_f64(p.m2) + p.count * (_f64(p.mean) - mean) ** 2 for p in items if p.count),
        np.zeros(shape),
    )
    return BatchStats(total, mean, m2)


def _check_trainable_count(
    count: int, allow_single_value: bool, refuse_empty: bool = False
) -> None:
    # An empty batch (count 0) is allowed: its output is empty (SPEC.md section 2,
    # *Empty batch*); a masked feature of no kept value is not (``refuse_empty``).
    if (count == 1 and not allow_single_value) or (count == 0 and refuse_empty):
        raise ValueError(
            f"expected more than 1 value per channel to compute batch statistics (training, "
            f"or track_running_stats=False), got {count} (batch size x spatial size); "
            "use a larger batch or inference mode with running statistics"
        )


def _affine(xhat: F64, gamma: ArrayLike | None, beta: ArrayLike | None, ax: int) -> F64:
    y = xhat
    if gamma is not None:
        y = y * _broadcast(_per_feature(gamma, "gamma", xhat, ax), xhat.ndim, ax)
    if beta is not None:
        y = y + _broadcast(_per_feature(beta, "beta", xhat, ax), xhat.ndim, ax)
    return y


def _check_dy(dy: ArrayLike, data: F64) -> F64:
    # A dy that merely broadcasts against x would give a dx of the wrong shape and sums
    # over the wrong number of values, so the shapes must be equal.
    grad = _f64(dy)
    if grad.shape != data.shape:
        raise ValueError(f"dy must have the input's shape {data.shape}, got {grad.shape}")
    return grad


def _out(y: F64, dtype: DTypeLike) -> np.ndarray:
    return y.astype(dtype)


def batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    stats: BatchStats | None = None,
    allow_single_value: bool = False,
    out_dtype: DTypeLike | None = None,
) -> tuple[np.ndarray, BatchStats]:
    """Training-mode BatchNorm: normalise with the batch's own (biased) statistics.

    ``y = gamma * (x - mean) / sqrt(var_biased + eps) + beta`` per feature. ``gamma`` or
    ``beta`` None means 1 or 0 (``scale``/``center`` off). ``stats`` replaces the batch's
    statistics (cross-replica BN passes the merged ones). Returns ``y`` in ``out_dtype``
    (default: ``x``'s dtype) and the statistics used. ``gamma``, ``beta`` and the
    statistics must have shape ``(C,)`` (``ValueError`` otherwise).

    Example:
        >>> y, s = batch_norm_train(np.array([[0.0], [2.0]]), eps=0.0)
        >>> y.ravel().tolist(), s.var().tolist()
        ([-1.0, 1.0], [1.0])
    """
    arr, ax = check_input(x, axis)
    used = batch_stats(arr, ax) if stats is None else _check_stats(stats, arr, ax)
    _check_trainable_count(used.count, allow_single_value)
    out = arr.dtype if out_dtype is None else out_dtype
    if used.count == 0:  # an empty batch: nothing to normalise
        return _out(np.zeros(arr.shape), out), used
    data = arr.astype(np.float64)
    inv_std = 1.0 / np.sqrt(used.var() + eps)
    xhat = (data - _broadcast(_f64(used.mean), data.ndim, ax)) * _broadcast(inv_std, data.ndim, ax)
    y = _affine(xhat, gamma, beta, ax)
    return _out(y, out), used


def batch_norm_inference(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    out_dtype: DTypeLike | None = None,
) -> np.ndarray:
    """Inference-mode BatchNorm with running statistics.

    ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``. The running
    statistics, ``gamma`` and ``beta`` must have shape ``(C,)`` (``ValueError`` otherwise).

    Example:
        >>> batch_norm_inference(np.array([[3.0]]), [1.0], [4.0], eps=0.0).tolist()
        [[1.0]]
    """
    arr, ax = check_input(x, axis)
    mean = _per_feature(running_mean, "running_mean", arr, ax)
    var = _per_feature(running_var, "running_var", arr, ax)
    data = arr.astype(np.float64)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (data - _broadcast(mean, data.ndim, ax)) * _broadcast(inv_std, data.ndim, ax)
    y = _affine(xhat, gamma, beta, ax)
    return _out(y, arr.dtype if out_dtype is None else out_dtype)


class BatchNormGrads(NamedTuple):
    """Gradients of BatchNorm: ``dx`` (input's shape), ``dgamma``, ``dbeta`` ((C,) or None)."""

    dx: np.ndarray
    dgamma: F64 | None
    dbeta: F64 | None


def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    stats: BatchStats | None = None,
    center: bool = True,
    out_dtype: DTypeLike | None = None,
) -> BatchNormGrads:
    """Vector-Jacobian product of training-mode BatchNorm, through the batch statistics.

    With ``xhat = (x - mean) * r``, ``r = 1 / sqrt(var + eps)`` and ``n`` values per
    feature: ``dbeta = sum dy``, ``dgamma = sum dy * xhat`` and
    ``dx = gamma * r * (dy - mean(dy) - xhat * mean(dy * xhat))``. ``gamma=None`` means
    ``scale`` is off (``dgamma`` is None); ``center=False`` makes ``dbeta`` None. ``stats``
    are the (merged) statistics the forward pass used; for cross-replica BN pass the
    merged ones and sum ``sum dy`` / ``sum dy * xhat`` over replicas (:func:`batch_norm_backward`
    on the concatenated batch gives the same numbers). ``dy`` must have ``x``'s shape and
    ``gamma`` shape ``(C,)`` (``ValueError`` otherwise).

    Example:
        >>> g = batch_norm_backward(np.ones((2, 1)), np.array([[0.0], [2.0]]))
        >>> g.dx.ravel().tolist(), g.dbeta.tolist()
        ([0.0, 0.0], [2.0])
    """
    arr, ax = check_input(x, axis)
    used = batch_stats(arr, ax) if stats is None else _check_stats(stats, arr, ax)
    _check_trainable_count(used.count, allow_single_value=True)
    data = arr.astype(np.float64)
    grad = _check_dy(dy, data)
    g = None if gamma is None else _per_feature(gamma, "gamma", arr, ax)
    axes = _reduce_axes(data.ndim, ax)
    if used.count == 0:  # an empty batch: empty dx, sums over nothing are 0
        zeros = np.zeros(arr.shape[ax])
        dx0 = _out(np.zeros(arr.shape), arr.dtype if out_dtype is None else out_dtype)
        return BatchNormGrads(dx0, None if g is None else zeros, zeros.copy() if center else None)
    r = 1.0 / np.sqrt(used.var() + eps)
    xhat = (data - _broadcast(_f64(used.mean), data.ndim, ax)) * _broadcast(r, data.ndim, ax)
    sum_dy = grad.sum(axis=axes)
    sum_dy_xhat = (grad * xhat).sum(axis=axes)
    n = used.count
    scale = r if g is None else r * g
    dx = _broadcast(scale, data.ndim, ax) * (
        grad
        - _broadcast(sum_dy / n, data.ndim, ax)
        - xhat * _broadcast(sum_dy_xhat / n, data.ndim, ax)
    )
    return BatchNormGrads(
        _out(dx, arr.dtype if out_dtype is None else out_dtype),
        None if g is None else sum_dy_xhat,
        sum_dy if center else None,
    )


def batch_norm_inference_backward(
    dy: ArrayLike,
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    center: bool = True,
    out_dtype: DTypeLike | None = None,
) -> BatchNormGrads:
    """Vector-Jacobian product of inference-mode BatchNorm (running statistics are constants).

    ``dx = dy * gamma / sqrt(running_var + eps)``, ``dgamma = sum dy * xhat``,
    ``dbeta = sum dy``. ``dy`` must have ``x``'s shape, the running statistics and
    ``gamma`` shape ``(C,)`` (``ValueError`` otherwise).

    Example:
        >>> g = batch_norm_inference_backward(np.ones((1, 1)), [[5.0]], [1.0], [4.0], eps=0.0)
        >>> g.dx.tolist(), g.dgamma
        ([[0.5]], None)
    """
    arr, ax = check_input(x, axis)
    mean = _per_feature(running_mean, "running_mean", arr, ax)
    var = _per_feature(running_var, "running_var", arr, ax)
    g = None if gamma is None else _per_feature(gamma, "gamma", arr, ax)
    data = arr.astype(np.float64)
    grad = _check_dy(dy, data)
    axes = _reduce_axes(data.ndim, ax)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (data - _broadcast(mean, data.ndim, ax)) * _broadcast(r, data.ndim, ax)
    scale = r if g is None else r * g
    dx = grad * _broadcast(scale, data.ndim, ax)
    return BatchNormGrads(
        _out(dx, arr.dtype if out_dtype is None else out_dtype),
        None if g is None else (grad * xhat).sum(axis=axes),
        grad.sum(axis=axes) if center else None,
    )


def init_running_stats(num_features: int) -> RunningStats:
    """Initial running statistics: mean 0, variance 1, no batch tracked."""
    return RunningStats(np.zeros(num_features), np.ones(num_features), 0)


def update_running_stats(
    running: RunningStats,
    stats: BatchStats,
    *,
    momentum: float | None = 0.1,
    unbiased: bool = True,
    skip_nonfinite: bool = True,
) -> RunningStats:
    """One running-statistics update from a training batch's statistics.

    ``f = momentum``, or ``1 / (num_batches_tracked + 1)`` when ``momentum`` is None (the
    cumulative average); ``mean <- (1 - f) mean + f batch_mean`` and
    ``var <- (1 - f) var + f batch_var``, where ``batch_var`` is ``m2 / (n - 1)``
    (``unbiased``) or ``m2 / n``; ``num_batches_tracked`` grows by one. With
    ``skip_nonfinite`` a batch whose mean or fed variance has a non-finite entry changes
    nothing at all. With one value per channel the unbiased estimate is undefined and the
    biased one (0) is fed instead (only reachable where ``allow_single_value`` is set).

    Example:
        >>> s = batch_stats(np.array([[0.0], [2.0]]))
        >>> update_running_stats(init_running_stats(1), s, momentum=None).var.tolist()
        [2.0]
    """
    unbiased_ok = unbiased and stats.count > 1
    batch_var = stats.var(unbiased=unbiased_ok)
    return _fold(running, _f64(stats.mean), batch_var, momentum, skip_nonfinite)


def _fold(
    running: RunningStats,
    batch_mean: F64,
    batch_var: F64,
    momentum: float | None,
    skip_nonfinite: bool,
) -> RunningStats:
    """Fold one batch's mean and fed variance into ``running`` (``f = momentum``, or
    ``1 / (num_batches_tracked + 1)``), unless the guard skips a non-finite batch."""
    if skip_nonfinite and not (np.all(np.isfinite(batch_mean)) and np.all(np.isfinite(batch_var))):
        return running
    tracked = running.num_batches_tracked + 1
    f = 1.0 / tracked if momentum is None else float(momentum)
    return RunningStats(
        (1.0 - f) * _f64(running.mean) + f * batch_mean,
        (1.0 - f) * _f64(running.var) + f * batch_var,
        tracked,
    )


def _empty_batch_update(running: RunningStats, spec: BatchNormSpec) -> RunningStats:
    """The running statistics after an empty training batch (``spec.empty_batch``)."""
    if spec.empty_batch == "skip":
        return running
    if spec.empty_batch == "count":
        return running._replace(num_batches_tracked=running.num_batches_tracked + 1)
    # "nan": the mean and variance of no values are 0/0, fed like any batch's.
    nothing = np.full(np.shape(running.mean), np.nan)
    return _fold(running, nothing, nothing, spec.momentum, spec.skip_nonfinite)


def batch_norm_step(
    x: ArrayLike,
    running: RunningStats | None,
    spec: BatchNormSpec,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    training: bool,
    backward_ran: bool = True,
    mask: ArrayLike | None = None,
) -> tuple[np.ndarray, RunningStats | None]:
    """One call of a BatchNorm layer configured by ``spec``: the output and new state.
    (A ``spec`` with ``renorm=True`` keeps more state: :func:`batch_renorm_step`.)

    Follows the spec's mode rules: in training, normalise with batch statistics and update
    the running ones (unless ``track_running_stats`` is off; with ``update_on="backward"``
    only when ``backward_ran``; an empty batch as ``spec.empty_batch`` says); in inference,
    normalise with running statistics, or with batch statistics when
    ``track_running_stats`` is off. ``mask`` (see :func:`masked_batch_stats`) leaves
    masked positions out of the batch statistics; inference with running statistics
    ignores it.

    Example:
        >>> spec = BatchNormSpec()
        >>> y, state = batch_norm_step(np.array([[0.0], [2.0]]), init_running_stats(1),
        ...                            spec, training=True)
        >>> state.mean.tolist(), state.var.tolist()
        ([0.1], [1.1])
    """
    if spec.renorm:
        raise ValueError("batch_norm_step takes no renorm=True spec; use batch_renorm_step")
    gamma = gamma if spec.scale else None
    beta = beta if spec.center else None
    if spec.virtual_batch_size is not None and training and np.size(x) > 0:
        if mask is not None:
            raise ValueError("virtual_batch_size must be None for a masked batch")
        y, groups = ghost_batch_norm_train(x, gamma, beta, spec=spec)
        if not spec.track_running_stats or running is None:
            return y, running
        if spec.update_on == "backward" and not backward_ran:
            return y, running
        mean, fed = ghost_fed_stats(groups, spec)
        return y, _fold(running, mean, fed, spec.momentum, spec.skip_nonfinite)
    if mask is not None and (training or not spec.track_running_stats):
        y, masked = masked_batch_norm_train(x, mask, gamma, beta, spec=spec)
        if not training or not spec.track_running_stats or running is None:
            return y, running
        if spec.update_on == "backward" and not backward_ran:
            return y, running
        # An empty batch follows empty_batch, except that Keras's masked arithmetic
        # (fully_masked="zero") feeds 0 and 0 where its layer's rule is "nan".
        zeros_fed = spec.fully_masked == "zero" and spec.empty_batch == "nan"
        if np.size(x) == 0 and not zeros_fed:
            return y, _empty_batch_update(running, spec)
        return y, update_running_stats_masked(running, masked, spec)
    if training or not spec.track_running_stats:
        y, stats = batch_norm_train(
            x,
            gamma,
            beta,
            eps=spec.eps,
            axis=spec.axis,
            allow_single_value=spec.allow_single_value,
        )
        if not training or not spec.track_running_stats or running is None:
            return y, running
        if spec.update_on == "backward" and not backward_ran:
            return y, running
        if stats.count == 0:
            return y, _empty_batch_update(running, spec)
        return y, update_running_stats(
            running,
            stats,
            momentum=spec.momentum,
            unbiased=spec.unbiased,
            skip_nonfinite=spec.skip_nonfinite,
        )
    if running is None:
        raise ValueError("inference with track_running_stats=True needs running statistics")
    y = batch_norm_inference(
        x, running.mean, running.var, gamma, beta, eps=spec.eps, axis=spec.axis
    )
    return y, running


# -- Accumulated micro-batches (SPEC.md section 2) ---------------------------------------


def accumulated_stats(
    running: RunningStats, micro: Sequence[BatchStats], spec: BatchNormSpec
) -> RunningStats:
    """The running statistics after one accumulated step of the micro-batches ``micro``:
    their exact merge (:func:`merge_stats`) fed to one update of ``spec`` (the unbiased
    factor on the total count), skipped whole when the guard finds any micro-batch
    non-finite; a step of only empty micro-batches follows ``empty_batch``.

    Example:
        >>> a, b = batch_stats(np.array([[0.0], [2.0]])), batch_stats(np.array([[4.0]]))
        >>> accumulated_stats(init_running_stats(1), [a, b], BatchNormSpec(momentum=1.0)).var
        array([4.])
    """
    if not micro:
        raise ValueError("accumulated_stats needs at least one micro-batch's statistics")
    with np.errstate(invalid="ignore", over="ignore"):
        finite = all(np.all(np.isfinite(m.mean)) and np.all(np.isfinite(m.m2)) for m in micro)
        merged = merge_stats(micro)
    if merged.count == 0:
        return _empty_batch_update(running, spec)
    if spec.skip_nonfinite and not finite:
        return running
    with np.errstate(invalid="ignore", over="ignore"):
        return update_running_stats(
            running, merged, momentum=spec.momentum, unbiased=spec.unbiased,
            skip_nonfinite=spec.skip_nonfinite,
        )  # fmt: skip


# -- Ghost batches (SPEC.md section 2, *Ghost batches*) --------------------------------


def ghost_groups(batch: int, virtual_batch_size: int) -> list[slice]:
    """The groups of a batch of ``batch`` samples: consecutive slices of
    ``virtual_batch_size`` samples along axis 0, the last one holding the remainder.
    ``ValueError`` where ``virtual_batch_size`` exceeds a nonempty batch.

    Example:
        >>> ghost_groups(10, 4)
        [slice(0, 4, None), slice(4, 8, None), slice(8, 10, None)]
    """
    if 0 < batch < virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size must be at most the batch size in training, got "
            f"{virtual_batch_size} for a batch of {batch}"
        )
    return [
        slice(i, min(i + virtual_batch_size, batch)) for i in range(0, batch, virtual_batch_size)
    ]


def _ghost_checked(x: ArrayLike, spec: BatchNormSpec) -> tuple[np.ndarray, int, list[slice]]:
    arr, ax = check_input(x, spec.axis)
    if ax == 0:
        raise ValueError(
            "axis must not be 0 with virtual_batch_size (the groups split the batch axis 0), "
            f"got {spec.axis}"
        )
    assert spec.virtual_batch_size is not None
    return arr, ax, ghost_groups(arr.shape[0], spec.virtual_batch_size)


def ghost_batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    spec: BatchNormSpec,
    out_dtype: DTypeLike | None = None,
) -> tuple[np.ndarray, list[BatchStats]]:
    """Training-mode BatchNorm with ghost batches: each group of :func:`ghost_groups` is
    normalised by :func:`batch_norm_train` with its own statistics (its own count held to
    the one-value rule). Returns ``y`` and the groups' statistics.

    Example:
        >>> x = np.array([[0.0], [2.0], [10.0], [14.0]])
        >>> y, groups = ghost_batch_norm_train(x, spec=BatchNormSpec(eps=0.0, virtual_batch_size=2))
        >>> y.ravel().tolist(), [g.mean.tolist() for g in groups]
        ([-1.0, 1.0, -1.0, 1.0], [[1.0], [12.0]])
    """
    arr, ax, groups = _ghost_checked(x, spec)
    parts = [
        batch_norm_train(
            arr[g],
            gamma,
            beta,
            eps=spec.eps,
            axis=ax,
            allow_single_value=spec.allow_single_value,
            out_dtype=np.float64,
        )
        for g in groups
    ]
    y = np.concatenate([p[0] for p in parts], axis=0)
    return _out(y, arr.dtype if out_dtype is None else out_dtype), [p[1] for p in parts]


def ghost_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    spec: BatchNormSpec,
    out_dtype: DTypeLike | None = None,
) -> BatchNormGrads:
    """Vector-Jacobian product of :func:`ghost_batch_norm_train`: each group's
    :func:`batch_norm_backward`, ``dgamma`` and ``dbeta`` summed over the groups."""
    arr, ax, groups = _ghost_checked(x, spec)
    grad = _check_dy(dy, arr.astype(np.float64))
    parts = [
        batch_norm_backward(grad[g], arr[g], gamma, eps=spec.eps, axis=ax, center=spec.center)
        for g in groups
    ]
    dx = np.concatenate([p.dx.astype(np.float64) for p in parts], axis=0)
    dgammas = [p.dgamma for p in parts if p.dgamma is not None]
    dbetas = [p.dbeta for p in parts if p.dbeta is not None]
    dgamma = None if gamma is None else np.sum(dgammas, axis=0)
    dbeta = np.sum(dbetas, axis=0) if spec.center else None
    return BatchNormGrads(_out(dx, arr.dtype if out_dtype is None else out_dtype), dgamma, dbeta)


def ghost_fed_stats(groups: Sequence[BatchStats], spec: BatchNormSpec) -> tuple[F64, F64]:
    """The mean and variance the running statistics are fed after a ghost-batch call:
    ``ghost_running="batch"`` the exact merge of the groups (:func:`merge_stats`, the
    batch's own statistics, the variance unbiased on the total count), ``"groups"`` the
    unweighted mean of the groups' means and of their fed variances (each unbiased on
    its own count), as tf.keras 2 averaged them.

    Example:
        >>> a, b = batch_stats(np.array([[0.0], [2.0]])), batch_stats(np.array([[10.0], [14.0]]))
        >>> ghost_fed_stats([a, b], BatchNormSpec(virtual_batch_size=2, ghost_running="groups"))
        (array([6.5]), array([5.]))
    """
    if spec.ghost_running == "batch":
        merged = merge_stats(groups)
        return _f64(merged.mean), merged.var(unbiased=spec.unbiased and merged.count > 1)
    means = [_f64(g.mean) for g in groups]
    fed = [g.var(unbiased=spec.unbiased and g.count > 1) for g in groups]
    return np.mean(means, axis=0), np.mean(fed, axis=0)


# -- Batch Renormalization (SPEC.md section 2, *Batch Renormalization*) ---------------


class RenormStats(NamedTuple):
    """The state Batch Renormalization adds (float64 in the reference): ``mean`` and
    ``std``, the renorm statistics ``r`` and ``d`` come from, and ``running_std``, the
    running standard deviation of ``renorm_running="stddev"`` (None under
    ``"variance"``)."""

    mean: F64
    std: F64
    running_std: F64 | None = None

    @classmethod
    def initial(cls, num_features: int, spec: BatchNormSpec) -> RenormStats:
        """Mean 0, standard deviations 1 (the square root of the running variance's 1)."""
        ones = np.ones(num_features)
        running_std = ones.copy() if spec.renorm_running == "stddev" else None
        return cls(np.zeros(num_features), ones.copy(), running_std)


def renorm_correction(
    stats: BatchStats, renorm: RenormStats, spec: BatchNormSpec
) -> tuple[F64, F64]:
    """Batch Renormalization's ``r`` and ``d`` for a batch's statistics.

    ``s = max(renorm_std, sqrt(eps))``, ``r = sqrt(var + eps) / s`` clipped to
    ``[renorm_rmin, renorm_rmax]``, ``d = (mean - renorm_mean) / s`` clipped to
    ``[-renorm_dmax, renorm_dmax]`` (an unset bound clips nothing).

    Example:
        >>> s = batch_stats(np.array([[0.0], [2.0]]))
        >>> spec = BatchNormSpec(eps=0.0, renorm=True, renorm_rmax=1.5)
        >>> r, d = renorm_correction(s, RenormStats.initial(1, spec), spec)
        >>> r.tolist(), d.tolist()
        ([1.0], [1.0])
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sigma = np.sqrt(stats.var() + spec.eps)
        floor = np.maximum(_f64(renorm.std), np.sqrt(spec.eps))
        r = sigma / floor
        d = (_f64(stats.mean) - _f64(renorm.mean)) / floor
    if spec.renorm_rmin is not None:
        r = np.maximum(r, spec.renorm_rmin)
    if spec.renorm_rmax is not None:
        r = np.minimum(r, spec.renorm_rmax)
    if spec.renorm_dmax is not None:
        d = np.clip(d, -spec.renorm_dmax, spec.renorm_dmax)
    return r, d


def batch_renorm_train(
    x: ArrayLike,
    renorm: RenormStats,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    spec: BatchNormSpec,
    stats: BatchStats | None = None,
    out_dtype: DTypeLike | None = None,
) -> tuple[np.ndarray, BatchStats, F64, F64]:
    """Training-mode Batch Renormalization: ``y = gamma * (xhat * r + d) + beta`` with
    ``xhat`` the batch-normalised input and ``r``, ``d`` from :func:`renorm_correction`.

    ``spec`` supplies ``eps``, ``axis``, ``allow_single_value`` and the clipping bounds;
    ``stats`` replaces the batch's statistics (the merged ones, cross-replica). Returns
    ``y``, the statistics, ``r`` and ``d``.

    Example:
        >>> spec = BatchNormSpec(eps=0.0, renorm=True)
        >>> x = np.array([[0.0], [2.0]])
        >>> y, _, r, d = batch_renorm_train(x, RenormStats.initial(1, spec), spec=spec)
        >>> y.ravel().tolist()  # the first call, unclipped: the input itself
        [0.0, 2.0]
    """
    arr, ax = check_input(x, spec.axis)
    used = batch_stats(arr, ax) if stats is None else _check_stats(stats, arr, ax)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input: specified
        xhat, _ = batch_norm_train(
            arr, eps=spec.eps, axis=ax, stats=used,
            allow_single_value=spec.allow_single_value, out_dtype=np.float64,
        )  # fmt: skip
    channels = arr.shape[ax]
    if used.count == 0:
        nothing = np.full(channels, np.nan)
        return _out(np.zeros(arr.shape), out_dtype or arr.dtype), used, nothing, nothing
    r, d = renorm_correction(used, renorm, spec)
    corrected = xhat * _broadcast(r, arr.ndim, ax) + _broadcast(d, arr.ndim, ax)
    y = _affine(corrected, gamma, beta, ax)
    return _out(y, arr.dtype if out_dtype is None else out_dtype), used, r, d


def batch_renorm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    r: ArrayLike,
    d: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    stats: BatchStats | None = None,
    center: bool = True,
    out_dtype: DTypeLike | None = None,
) -> BatchNormGrads:
    """Vector-Jacobian product of training-mode Batch Renormalization, ``r`` and ``d``
    constants: ``dx`` is :func:`batch_norm_backward`'s with ``gamma * r`` as the scale,
    ``dgamma = sum dy * (xhat * r + d)``, ``dbeta = sum dy``.

    Example:
        >>> x = np.array([[0.0], [2.0]])
        >>> g = batch_renorm_backward(np.array([[1.0], [0.0]]), x, [2.0], [0.5], [1.0], eps=0.0)
        >>> g.dx.ravel().tolist(), g.dgamma.tolist()
        ([0.0, 0.0], [-1.5])
    """
    arr, ax = check_input(x, axis)
    r64, d64 = _per_feature(r, "r", arr, ax), _per_feature(d, "d", arr, ax)
    g = None if gamma is None else _per_feature(gamma, "gamma", arr, ax)
    scale = r64 if g is None else g * r64
    grads = batch_norm_backward(
        dy, arr, scale, eps=eps, axis=ax, stats=stats, center=center, out_dtype=out_dtype
    )
    if g is None:
        return BatchNormGrads(grads.dx, None, grads.dbeta)
    sum_dy = _check_dy(dy, arr.astype(np.float64)).sum(axis=_reduce_axes(arr.ndim, ax))
    # batch_norm_backward's dgamma is sum(dy * xhat); renorm's is r times that + d * sum(dy).
    assert grads.dgamma is not None
    return BatchNormGrads(grads.dx, r64 * grads.dgamma + d64 * sum_dy, grads.dbeta)


def update_renorm_stats(
    running: RunningStats,
    renorm: RenormStats,
    stats: BatchStats,
    spec: BatchNormSpec,
) -> tuple[RunningStats, RenormStats]:
    """The state update of one Batch Renormalization training call (``SPEC.md`` section 2):
    the renorm statistics at ``renorm_momentum`` from the batch's mean and
    ``sqrt(var + eps)``, and the inference statistics as ``renorm_running`` says, all
    skipped together by the guard; an empty batch as ``empty_batch`` says.

    Example:
        >>> spec = BatchNormSpec(renorm=True, renorm_momentum=0.5, eps=0.0)
        >>> s = batch_stats(np.array([[0.0], [2.0]]))
        >>> start = RenormStats.initial(1, spec)
        >>> run, ren = update_renorm_stats(init_running_stats(1), start, s, spec)
        >>> ren.mean.tolist(), ren.std.tolist(), run.var.tolist()
        ([0.5], [1.0], [1.1])
    """
    channels = np.shape(running.mean)
    if stats.count == 0:
        if spec.empty_batch != "nan":
            return _empty_batch_update(running, spec), renorm
        mean = var = np.full(channels, np.nan)
        fed = var
    else:
        mean = _f64(stats.mean)
        var = stats.var()
        fed = stats.var(unbiased=spec.unbiased and stats.count > 1)
    with np.errstate(invalid="ignore", over="ignore"):
        sigma = np.sqrt(var + spec.eps)
        fed_std = np.sqrt(fed + spec.eps)
    finite = all(np.all(np.isfinite(a)) for a in (mean, fed, sigma))
    if spec.skip_nonfinite and not finite:
        return running, renorm
    g = spec.renorm_momentum
    new_renorm_mean = (1.0 - g) * _f64(renorm.mean) + g * mean
    new_renorm_std = (1.0 - g) * _f64(renorm.std) + g * sigma
    tracked = running.num_batches_tracked + 1
    f = 1.0 / tracked if spec.momentum is None else float(spec.momentum)
    new_mean = (1.0 - f) * _f64(running.mean) + f * mean
    running_std = None
    if spec.renorm_running == "stddev":
        assert renorm.running_std is not None
        running_std = (1.0 - f) * _f64(renorm.running_std) + f * fed_std
        with np.errstate(invalid="ignore", over="ignore"):
            new_var = np.maximum(running_std * running_std - spec.eps, 0.0)
    else:
        new_var = (1.0 - f) * _f64(running.var) + f * fed
    return (
        RunningStats(new_mean, new_var, tracked),
        RenormStats(new_renorm_mean, new_renorm_std, running_std),
    )


def batch_renorm_step(
    x: ArrayLike,
    running: RunningStats,
    renorm: RenormStats,
    spec: BatchNormSpec,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    training: bool,
    backward_ran: bool = True,
) -> tuple[np.ndarray, RunningStats, RenormStats]:
    """One call of a BatchNorm layer with ``renorm=True``: the output and the new state.

    Training: :func:`batch_renorm_train` then :func:`update_renorm_stats` (with
    ``update_on="backward"`` only when ``backward_ran``). Inference: the running
    statistics, as without renorm.

    Example:
        >>> spec = BatchNormSpec(renorm=True)
        >>> x = np.array([[0.0], [2.0]])
        >>> _, run, ren = batch_renorm_step(x, init_running_stats(1),
        ...                                 RenormStats.initial(1, spec), spec, training=True)
        >>> run.num_batches_tracked, round(float(ren.mean[0]), 6)
        (1, 0.01)
    """
    if not spec.renorm:
        raise ValueError("batch_renorm_step needs a spec with renorm=True")
    gamma = gamma if spec.scale else None
    beta = beta if spec.center else None
    if not training:
        y = batch_norm_inference(
            x, running.mean, running.var, gamma, beta, eps=spec.eps, axis=spec.axis
        )
        return y, running, renorm
    y, stats, _, _ = batch_renorm_train(x, renorm, gamma, beta, spec=spec)
    if spec.update_on == "backward" and not backward_ran:
        return y, running, renorm
    new_running, new_renorm = update_renorm_stats(running, renorm, stats, spec)
    return y, new_running, new_renorm


# -- masked batches (SPEC.md section 2, *Masked batches*) -----------------------------


@dataclasses.dataclass(frozen=True)
class MaskedStats:
    """Per-feature statistics of the values a mask keeps: ``count`` (an int per feature,
    shape ``(C,)``), ``mean`` and ``m2`` (0 for a feature of no kept value)."""

    count: NDArray[np.int64]
    mean: F64
    m2: F64

    def var(self, unbiased: bool = False) -> F64:
        """Per-feature variance: ``m2 / count`` or, with ``unbiased``, ``m2 / (count - 1)``
        where ``count > 1`` (the biased value elsewhere); 0 where nothing is kept."""
        biased = self.m2 / np.maximum(self.count, 1)
        if not unbiased:
            return biased
        return np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), biased)


def _kept(mask: ArrayLike, arr: np.ndarray) -> NDArray[np.bool_]:
    """``mask`` as booleans broadcast to ``arr``'s shape (``ValueError`` if it cannot be)."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise ValueError(f"mask must be boolean, got dtype {m.dtype}")
    try:
        return np.broadcast_to(m, arr.shape)
    except ValueError:
        raise ValueError(
            f"mask must broadcast to the input's shape {arr.shape}, got shape {m.shape}"
        ) from None


def masked_batch_stats(x: ArrayLike, mask: ArrayLike, axis: int = 1) -> MaskedStats:
    """Per-feature count, mean and M2 of the values of ``x`` that ``mask`` keeps.

    ``mask`` is a boolean array that broadcasts to ``x``'s shape (``True`` keeps a value);
    a Keras mask of shape ``x.shape[:-1]`` is ``mask[..., None]`` here. Masked values
    (NaN ones too) take no part. A feature of no kept value has count, mean and M2 0.

    Example:
        >>> x = np.array([[1.0, 5.0], [3.0, 9.0]])
        >>> s = masked_batch_stats(x, np.array([[True, True], [True, False]]))
        >>> s.count.tolist(), s.mean.tolist(), s.m2.tolist()
        ([2, 1], [2.0, 5.0], [2.0, 0.0])
    """
    arr, ax = check_input(x, axis)
    keep = _kept(mask, arr)
    axes = _reduce_axes(arr.ndim, ax)
    data = np.where(keep, arr.astype(np.float64), 0.0)
    count = keep.sum(axis=axes).astype(np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = data.sum(axis=axes) / np.maximum(count, 1)
        centred = np.where(keep, data - _broadcast(mean, arr.ndim, ax), 0.0)
        m2 = (centred**2).sum(axis=axes)
    return MaskedStats(count, mean, m2)


def _check_masked_counts(
    stats: MaskedStats, size: int, allow_single_value: bool, fully_masked: str
) -> None:
    """Refuse a masked batch that keeps too little of a feature (``SPEC.md`` section 2,
    *Masked batches*): one value without ``allow_single_value``, or none of a nonempty
    batch (``size`` values per feature) unless ``fully_masked="zero"``."""
    counts = stats.count
    if size > 0 and fully_masked == "error" and np.any(counts == 0):
        _check_trainable_count(0, allow_single_value, refuse_empty=True)
    if np.any(counts == 1):
        _check_trainable_count(1, allow_single_value)


def masked_batch_norm_train(
    x: ArrayLike,
    mask: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    spec: BatchNormSpec,
    out_dtype: DTypeLike | None = None,
) -> tuple[np.ndarray, MaskedStats]:
    """Training-mode BatchNorm of a masked batch: every position (masked ones too) is
    normalised with the statistics of the values the mask keeps, per feature.

    ``spec`` supplies ``eps``, ``axis``, ``allow_single_value`` and ``fully_masked``: a
    feature of no kept value is refused (``"error"``) or has mean 0 and variance 0
    (``"zero"``, Keras's layer), its output ``gamma * x / sqrt(eps) + beta``. Returns the
    output and the statistics (of an empty batch: count 0, mean 0, M2 0).

    Example:
        >>> x = np.array([[0.0], [2.0], [50.0]])
        >>> keep = np.array([[True], [True], [False]])
        >>> y, s = masked_batch_norm_train(x, keep, spec=BatchNormSpec(eps=0.0))
        >>> y.ravel().tolist(), s.count.tolist()
        ([-1.0, 1.0, 49.0], [2])
    """
    arr, ax = check_input(x, spec.axis)
    stats = masked_batch_stats(arr, mask, ax)
    size = arr.size // max(arr.shape[ax], 1)
    out = arr.dtype if out_dtype is None else out_dtype
    if size == 0:  # an empty batch: nothing to normalise
        return _out(np.zeros(arr.shape), out), stats
    _check_masked_counts(stats, size, spec.allow_single_value, spec.fully_masked)
    xhat, _ = _masked_xhat(arr, ax, stats, spec.eps)
    return _out(_affine(xhat, gamma, beta, ax), out), stats


def _masked_xhat(arr: np.ndarray, ax: int, stats: MaskedStats, eps: float) -> tuple[F64, F64]:
    """``xhat`` at every position and ``r = 1 / sqrt(var_biased + eps)`` per feature."""
    r = 1.0 / np.sqrt(stats.var() + eps)
    data = arr.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = (data - _broadcast(stats.mean, arr.ndim, ax)) * _broadcast(r, arr.ndim, ax)
    return xhat, r


def masked_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mask: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    spec: BatchNormSpec,
    out_dtype: DTypeLike | None = None,
) -> BatchNormGrads:
    """Vector-Jacobian product of :func:`masked_batch_norm_train`.

    Every output depends on the kept values' statistics, so with ``k`` kept values of a
    feature: ``dbeta = sum dy`` and ``dgamma = sum dy * xhat`` over every position, and
    ``dx = gamma * r * (dy - keep * (sum(dy) + xhat * sum(dy * xhat)) / k)`` (masked
    positions get ``gamma * r * dy``: the statistics do not depend on them). A feature of
    no kept value under ``fully_masked="zero"`` has constant statistics: ``dx = gamma * r
    * dy``. With every value kept this is :func:`batch_norm_backward`.

    Example:
        >>> x = np.array([[0.0], [2.0], [1.0]])
        >>> keep = np.array([[True], [True], [False]])
        >>> g = masked_batch_norm_backward(np.ones((3, 1)), x, keep, spec=BatchNormSpec(eps=0.0))
        >>> g.dx.ravel().tolist(), g.dbeta.tolist()
        ([-0.5, -0.5, 1.0], [3.0])
    """
    arr, ax = check_input(x, spec.axis)
    data = arr.astype(np.float64)
    grad = _check_dy(dy, data)
    keep = _kept(mask, arr)
    stats = masked_batch_stats(arr, keep, ax)
    size = arr.size // max(arr.shape[ax], 1)
    g = None if gamma is None else _per_feature(gamma, "gamma", arr, ax)
    out = arr.dtype if out_dtype is None else out_dtype
    channels = arr.shape[ax]
    if size == 0:  # an empty batch: empty dx, sums over nothing are 0
        zeros = np.zeros(channels)
        none = None if g is None else zeros
        return BatchNormGrads(_out(np.zeros(arr.shape), out), none, zeros.copy())
    _check_masked_counts(stats, size, True, spec.fully_masked)
    xhat, r = _masked_xhat(arr, ax, stats, spec.eps)
    axes = _reduce_axes(arr.ndim, ax)
    sum_dy = grad.sum(axis=axes)
    sum_dy_xhat = (grad * xhat).sum(axis=axes)
    k = np.maximum(stats.count, 1)  # no kept value: keep is False everywhere, no term
    through_stats = _broadcast(sum_dy / k, arr.ndim, ax) + xhat * _broadcast(
        sum_dy_xhat / k, arr.ndim, ax
    )
    scale = r if g is None else r * g
    dx = _broadcast(scale, arr.ndim, ax) * (grad - np.where(keep, through_stats, 0.0))
    return BatchNormGrads(
        _out(dx, out),
        None if g is None else sum_dy_xhat,
        sum_dy if spec.center else None,
    )


def update_running_stats_masked(
    running: RunningStats, stats: MaskedStats, spec: BatchNormSpec
) -> RunningStats:
    """:func:`update_running_stats` for a masked batch: each feature is fed its own kept
    values' mean and variance (unbiased on its own count where ``spec.running_var`` says
    so and ``count > 1``; a feature of no kept value, under ``fully_masked="zero"``,
    feeds 0 and 0). ``num_batches_tracked`` grows by one; the guard skips the whole
    batch when any fed value is non-finite.

    Example:
        >>> s = masked_batch_stats(np.array([[0.0], [2.0], [9.0]]), [[True], [True], [False]])
        >>> update_running_stats_masked(init_running_stats(1), s, BatchNormSpec()).var.tolist()
        [1.1]
    """
    fed = stats.var(unbiased=spec.unbiased)
    return _fold(running, _f64(stats.mean), fed, spec.momentum, spec.skip_nonfinite)


def unit_norms(w: ArrayLike, unit_axes: UnitAxes) -> F64:
    """Frobenius norm of every output unit of ``w``, in float64, kept broadcastable.

    The norm runs over every axis except ``unit_axes``; ``unit_axes=None`` or a tensor of
    rank <= 1 is a single unit (the whole tensor's norm, shape ``(1,) * ndim``).

    Example:
        >>> unit_norms(np.array([[3.0, 4.0], [0.0, 1.0]]), 0).ravel().tolist()
        [5.0, 1.0]
    """
    data = _f64(w)
    keep = normalize_unit_axes(unit_axes, data.ndim)
    reduce = tuple(i for i in range(data.ndim) if i not in keep)
    norms: F64 = np.sqrt((data * data).sum(axis=reduce, keepdims=True))
    return norms


def agc_clip(
    grad: ArrayLike,
    weight: ArrayLike,
    unit_axes: UnitAxes,
    *,
    clipping: float = 0.01,
    eps: float = 1e-3,
) -> np.ndarray:
    """Adaptive gradient clipping of one parameter (Brock et al. 2021, arXiv 2102.06171).

    Per unit ``i``: ``max_i = clipping * max(||W_i||, eps)``; where ``||G_i|| > max_i``
    (strictly) the unit is rescaled, ``G_i * max_i / max(||G_i||, 1e-6)``; otherwise it is
    returned unchanged, bit for bit. A unit whose gradient norm is not finite is left as it
    is, so a loss scaler still sees the inf/nan. Returns an array of ``grad``'s dtype.

    Example:
        >>> agc_clip(np.array([[3.0, 4.0]]), np.array([[100.0, 0.0]]), 0, clipping=0.01)
        array([[0.6, 0.8]])
    """
    g_in, g = _agc_grad(grad, weight)
    clip, max_norm, g_norm = _agc_units(g, weight, unit_axes, AGCSpec(clipping=clipping, eps=eps))
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite units are left alone
        factor = max_norm / np.maximum(g_norm, AGC_GRAD_NORM_FLOOR)
        clipped = np.where(clip, g * factor, g).astype(g_in.dtype)
    # Units under the threshold come back bit for bit, whatever the float64 round trip did.
    return np.where(np.broadcast_to(clip, g_in.shape), clipped, g_in)


def _agc_grad(grad: ArrayLike, weight: ArrayLike) -> tuple[np.ndarray, F64]:
    """``grad`` as given and in float64, once it is checked to be floating point and of
    ``weight``'s shape."""
    g_in = np.asarray(grad)
    if not np.issubdtype(g_in.dtype, np.floating):
        raise ValueError(f"grad must have a floating-point dtype, got {g_in.dtype}")
    w_shape = np.shape(weight)
    if w_shape != g_in.shape:
        raise ValueError(f"grad and weight must share a shape, got {g_in.shape} and {w_shape}")
    return g_in, g_in.astype(np.float64)


def _agc_units(
    g: F64, weight: ArrayLike, unit_axes: UnitAxes, settings: AGCSpec
) -> tuple[np.ndarray, F64, F64]:
    """Per unit (kept broadcastable): whether AGC rescales it (a finite gradient norm
    strictly above the threshold), the threshold and the gradient norm."""
    max_norm = settings.clipping * np.maximum(unit_norms(weight, unit_axes), settings.eps)
    with np.errstate(invalid="ignore", over="ignore"):
        g_norm = unit_norms(g, unit_axes)
        clip = np.isfinite(g_norm) & (g_norm > max_norm)
    return clip, max_norm, g_norm


def agc_clipped_units(
    grad: ArrayLike,
    weight: ArrayLike,
    unit_axes: UnitAxes,
    *,
    clipping: float = 0.01,
    eps: float = 1e-3,
) -> np.ndarray:
    """Which units :func:`agc_clip` rescales, as a boolean array of ``grad``'s shape (True
    on every element of a rescaled unit; False where the gradient comes back unchanged).

    Example:
        >>> agc_clipped_units(np.array([[3.0, 4.0], [0.0, 0.1]]), np.ones((2, 2)), 0,
        ...                   clipping=0.5).tolist()
        [[True, True], [False, False]]
    """
    g = _agc_grad(grad, weight)[1]
    clip = _agc_units(g, weight, unit_axes, AGCSpec(clipping=clipping, eps=eps))[0]
    return np.broadcast_to(clip, g.shape).copy()


def agc_unit_axes(
    shapes: Mapping[str, Sequence[int]],
    layer_axes: Mapping[str, UnitAxes],
    unit_axes: object = None,
) -> dict[str, UnitAxes]:
    """Each parameter's unit axes under ``SPEC.md`` section 5's precedence, for the
    parameters that are not excluded: a ``unit_axes`` mapping entry naming it; else one
    unit at rank <= 1; else an int ``unit_axes`` for every parameter of rank >= 2; else its
    layer's axes (``layer_axes``). A parameter left without axes is absent from the result
    (:func:`agc_clip_all` refuses it).

    Raises ``ValueError`` for a ``unit_axes`` that is not None, an int or a mapping, and
    for a mapping entry that names no parameter.

    Example:
        >>> agc_unit_axes({"w": (3, 4), "b": (3,)}, {"w": 0}, unit_axes=1)
        {'w': 1, 'b': None}
    """
    by_name = unit_axes if isinstance(unit_axes, Mapping) else {}
    every = unit_axes if isinstance(unit_axes, int) and not isinstance(unit_axes, bool) else None
    if unit_axes is not None and not isinstance(unit_axes, Mapping) and every is None:
        raise ValueError(
            "unit_axes must be an int (the axis of every parameter of rank >= 2), a "
            f"mapping from parameters to axes, or None, got {unit_axes!r}"
        )
    missing = [name for name in by_name if name not in shapes]
    if missing:
        raise ValueError(f"unit_axes names no parameter or layer of the model: {missing}")
    out: dict[str, UnitAxes] = {}
    for name, shape in shapes.items():
        if name in by_name:
            out[name] = by_name[name]
        elif len(shape) <= 1:
            out[name] = None
        elif every is not None:
            out[name] = every
        elif name in layer_axes:
            out[name] = layer_axes[name]
    return out


def agc_clip_all(
    grads: Mapping[str, ArrayLike],
    weights: Mapping[str, ArrayLike],
    unit_axes: Mapping[str, UnitAxes],
    *,
    clipping: float = 0.01,
    eps: float = 1e-3,
    exclude: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """AGC over named parameters: every gradient clipped by :func:`agc_clip` except the
    names in ``exclude`` (the final classifier's weight and bias), returned unchanged.

    A name missing from ``unit_axes`` is one unit if its rank is <= 1 and an error
    otherwise: the output-unit axis of a matrix depends on its layer, not its shape.

    Example:
        >>> out = agc_clip_all({"w": np.ones((1, 1))}, {"w": np.zeros((1, 1))}, {"w": 0})
        >>> out["w"].tolist()
        [[1e-05]]
    """
    # Validated up front: with every parameter excluded, agc_clip would never see them.
    AGCSpec(clipping=clipping, eps=eps)
    missing = [name for name in exclude if name not in grads]
    if missing:
        raise ValueError(f"exclude names no parameter or layer of the model: {missing}")
    out: dict[str, np.ndarray] = {}
    for name, g in grads.items():
        if name in exclude:
            out[name] = np.asarray(g)
            continue
        w = np.asarray(weights[name])
        if name not in unit_axes and w.ndim > 1:
            raise ValueError(
                f"AGC does not know the output-unit axis of parameter {name!r} (shape "
                f"{w.shape}); pass unit_axes={{{name!r}: <axis>}} or exclude it"
            )
        try:
            normalize_unit_axes(unit_axes.get(name), w.ndim)
        except ValueError as err:  # the shared message, plus which parameter
            raise ValueError(f"{err} (parameter {name!r} of shape {w.shape})") from None
        out[name] = agc_clip(g, w, unit_axes.get(name), clipping=clipping, eps=eps)
    return out


def _ws_parts(
    w: F64, unit_axes: UnitAxes, style: str, eps: float
) -> tuple[tuple[int, ...], int, F64, F64, F64]:
    """Reduced axes, fan_in, centred weights, per-unit variance and scale of Scaled WS."""
    keep = normalize_unit_axes(unit_axes, w.ndim)
    reduce = tuple(i for i in range(w.ndim) if i not in keep)
    fan_in = int(np.prod([w.shape[i] for i in reduce])) if reduce else 1
    if fan_in == 0:
        raise ValueError(f"weight must have fan_in >= 1, got shape {w.shape}")
    centred = w - w.mean(axis=reduce, keepdims=True)
    var = (centred * centred).mean(axis=reduce, keepdims=True)
    if style == "deepmind":
        scale = 1.0 / np.sqrt(np.maximum(var * fan_in, eps))
    else:
        scale = 1.0 / np.sqrt((var + eps) * fan_in)
    return reduce, fan_in, centred, var, scale


def _gain(gain: ArrayLike | None, w: F64, reduce: tuple[int, ...]) -> F64:
    if gain is None:
        return np.ones([1 if i in reduce else n for i, n in enumerate(w.shape)])
    shape = [1 if i in reduce else n for i, n in enumerate(w.shape)]
    return _f64(gain).reshape(shape)


def scaled_weight_standardize(
    w: ArrayLike,
    gain: ArrayLike | None = None,
    unit_axes: UnitAxes = 0,
    *,
    style: str = "deepmind",
    eps: float | None = None,
) -> np.ndarray:
    """Scaled Weight Standardisation of one weight (``SPEC.md`` section 6).

    Per output unit ``i`` (statistics over every other axis, ``fan_in`` values, biased
    variance): ``deepmind`` (canonical) ``W_hat = gain (W - mean) / sqrt(max(var fan_in,
    eps))``; ``timm`` ``W_hat = gain (W - mean) / sqrt((var + eps) fan_in)``. ``gain`` has
    one value per unit (None: 1). Returns ``w``'s dtype.

    Example:
        >>> w = np.array([[1.0, 3.0], [2.0, 2.0]])
        >>> scaled_weight_standardize(w).tolist()  # the constant unit stays 0 thanks to eps
        [[-0.7071067811865475, 0.7071067811865475], [0.0, 0.0]]
    """
    settings = ScaledWSSpec(style=style, eps=eps)  # type: ignore[arg-type]
    assert settings.eps is not None
    w_in = np.asarray(w)
    data = w_in.astype(np.float64)
    reduce, _, centred, _, scale = _ws_parts(data, unit_axes, settings.style, settings.eps)
    with np.errstate(
        invalid="ignore", divide="ignore"
    ):  # eps=0 on a constant unit: nan, as specified
        out = _gain(gain, data, reduce) * centred * scale
    return out.astype(w_in.dtype)


def scaled_weight_standardize_backward(
    grad: ArrayLike,
    w: ArrayLike,
    gain: ArrayLike | None = None,
    unit_axes: UnitAxes = 0,
    *,
    style: str = "deepmind",
    eps: float | None = None,
) -> tuple[F64, F64]:
    """Vector-Jacobian product of :func:`scaled_weight_standardize`: ``(dW, dgain)``.

    With ``c = W - mean``, ``s`` the scale and ``g`` the gain, per unit:
    ``dc = g s grad + 2 c / n * sum(grad g c) * ds/dvar`` and ``dW = dc - mean(dc)``,
    where ``ds/dvar = -n/2 (var n)^-3/2`` (deepmind, 0 where ``var n <= eps``) or
    ``-1/2 n^-1/2 (var + eps)^-3/2`` (timm); ``dgain = sum(grad c s)``.

    Example:
        >>> dw, dg = scaled_weight_standardize_backward(np.ones((1, 2)), [[1.0, 3.0]], eps=0.0)
        >>> dw.tolist(), dg.tolist()
        ([[0.0, 0.0]], [0.0])
    """
    settings = ScaledWSSpec(style=style, eps=eps)  # type: ignore[arg-type]
    assert settings.eps is not None
    data = _f64(w)
    dy = _f64(grad)
    reduce, n, c, var, scale = _ws_parts(data, unit_axes, settings.style, settings.eps)
    g = _gain(gain, data, reduce)
    if settings.style == "deepmind":
        active = var * n > settings.eps
        dscale = np.where(active, -0.5 * n * np.maximum(var * n, 1e-300) ** -1.5, 0.0)
    else:
        dscale = -0.5 * n**-0.5 * (var + settings.eps) ** -1.5
    dvar = (dy * g * c).sum(axis=reduce, keepdims=True) * dscale
    dc = g * scale * dy + dvar * 2.0 * c / n
    dw = dc - dc.mean(axis=reduce, keepdims=True)
    dgain = (dy * c * scale).sum(axis=reduce)
    return dw, dgain.reshape(-1)


# -- BatchNorm after training (SPEC.md section 8) ---------------------------------------


def fold_batch_norm(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    out_axes: int | Sequence[int] = 0,
    view: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference-mode BatchNorm into the layer before it (``SPEC.md`` section 8).

    ``s = gamma / sqrt(running_var + eps)``, ``W' = W * s`` along the layer's
    output-channel axes and ``b' = (b - running_mean) * s + beta``, in float64; ``W'`` is
    returned in ``weight``'s dtype and ``b'`` in ``bias``'s (``weight``'s when ``bias`` is
    None, which counts as zero). ``gamma`` None is 1 (``scale=False``), ``beta`` None is 0
    (``center=False``).

    ``out_axes`` are the axes of ``weight`` (of ``view`` when given) that index the output
    channels, as the layer-kind table gives them (``unit_plan``): 0 for a channels-first
    convolution or a PyTorch/MXNet dense weight, ``(0, 2)`` of the view ``(g, I/g, O/g,
    *k)`` for a grouped transposed convolution. ``s`` (shape ``(C,)``) is reshaped to the
    sizes of those axes, in order, so ``C`` must be their product.

    Example:
        >>> w, b = fold_batch_norm(np.ones((2, 3)), None, [0.0, 1.0], [3.0, 0.0],
        ...                        [2.0, 1.0], eps=1.0)
        >>> w.tolist(), b.tolist()
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [0.0, -1.0])
    """
    w = np.asarray(weight)
    data = _f64(w)
    shape = data.shape if view is None else tuple(int(v) for v in view)
    if int(np.prod(shape)) != data.size:
        raise ValueError(f"view must hold the weight's {data.size} values, got {tuple(shape)}")
    axes = (out_axes,) if isinstance(out_axes, (int, np.integer)) else tuple(out_axes)
    axes = tuple(normalize_axis(int(a), len(shape)) for a in axes)
    if not axes or len(set(axes)) != len(axes):
        raise ValueError(f"out_axes must name one or more distinct axes, got {out_axes!r}")
    channels = int(np.prod([shape[a] for a in axes]))
    mean, var = _f64(running_mean), _f64(running_var)
    for name, v in (("running_mean", mean), ("running_var", var)):
        if v.shape != (channels,):
            raise ValueError(
                f"{name} must have shape ({channels},), one value per output channel of a "
                f"weight of shape {tuple(shape)} on axes {axes}, got shape {v.shape}"
            )
    g = np.ones(channels) if gamma is None else _f64(gamma).reshape(channels)
    be = np.zeros(channels) if beta is None else _f64(beta).reshape(channels)
    b = np.zeros(channels) if bias is None else _f64(bias).reshape(channels)
    s = g / np.sqrt(var + float(eps))
    # s's channel o = the row-major index over the sizes of ``axes``, broadcast elsewhere.
    sizes = [shape[a] for a in axes]
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    placed = np.transpose(s.reshape(sizes), order)
    broadcast = [shape[a] if a in axes else 1 for a in range(len(shape))]
    folded = (data.reshape(shape) * placed.reshape(broadcast)).reshape(w.shape)
    new_bias = (b - mean) * s + be
    bias_dtype = w.dtype if bias is None else np.asarray(bias).dtype
    return folded.astype(w.dtype), new_bias.astype(bias_dtype)


def recalibrated_stats(
    batches: Iterable[ArrayLike], axis: int = 1, *, unbiased: bool = True
) -> RunningStats:
    """The running statistics ``recalibrate`` sets from a BatchNorm's inputs (section 8).

    Each batch's per-feature ``(n, mean, M2)`` (:func:`batch_stats`) is merged exactly
    (:func:`merge_stats`); the running mean is the merged mean and the running variance
    ``M2 / (N - 1)`` (``unbiased``, the layer's ``running_var="unbiased"``; ``M2 / N``
    when ``N == 1``) or ``M2 / N``. ``num_batches_tracked`` counts the batches that held
    a value. Raises ``ValueError`` for no batches, a batch with a non-finite value, or no
    value over all batches.

    Example:
        >>> s = recalibrated_stats([np.array([[1.0], [2.0]]), np.array([[6.0]])])
        >>> s.mean.tolist(), s.var.tolist(), s.num_batches_tracked
        ([3.0], [7.0], 2)
    """
    parts = []
    for i, batch in enumerate(batches):
        stats = batch_stats(batch, axis)
        if not (np.all(np.isfinite(stats.mean)) and np.all(np.isfinite(stats.m2))):
            raise ValueError(
                f"batches[{i}] gives non-finite statistics; recalibrate only on finite data"
            )
        parts.append(stats)
    if not parts:
        raise ValueError("batches must yield at least one batch, got none")
    merged = merge_stats(parts)
    if merged.count == 0:
        raise ValueError("batches hold no values; the running statistics are undefined")
    var = merged.var(unbiased=unbiased and merged.count > 1)
    return RunningStats(merged.mean, var, sum(1 for p in parts if p.count))

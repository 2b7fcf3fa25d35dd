"""``unorm.flax.BatchNorm``: BatchNorm for Flax NNX following ``SPEC.md``.

The layer keeps ``nnx.BatchNorm``'s state names (``scale``, ``bias`` as ``nnx.Param``;
``mean``, ``var`` as ``nnx.BatchStat``) plus ``num_batches_tracked``, and its switch
``use_running_average`` (set by ``model.train()`` / ``model.eval()``), so a native model's
state loads with ``nnx.update`` and ``nnx.state`` / Orbax save it as any NNX state.

Statistics are per feature ``(count, mean, M2)``, two-pass, in float32 at least; across
devices (``axis_name`` under ``shard_map``, ``pmap`` or ``vmap``) every shard's triple is
gathered and merged exactly (Chan et al.), so uneven shards, given as equal shapes with a
per-sample ``mask``, and empty shards give the one-device statistics. Under a sharded
``jax.jit`` the layer computes on the global array and XLA inserts the sums itself.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .._core.settings import BatchNormSettings
from ..spec import UNSET, BatchNormSpec, Unset, given, normalize_axis

__all__ = ["BatchNorm", "batch_moments"]


def _stat_dtype(dtype: Any) -> Any:
    """The dtype statistics are computed in: the input's, at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def batch_moments(
    x: jax.Array,
    axis: int,
    *,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-feature ``(count, mean, M2)`` of ``x`` over every axis but ``axis``, in float32
    at least; with ``mask`` (boolean, broadcastable to ``x``) only the values it keeps,
    and with ``axis_name`` merged exactly over that named axis (Chan's merge of every
    shard's triple, so shards of unequal kept counts and empty ones are exact).

    A feature of no kept value has mean 0 and M2 0 here (its count says so).

    Example:
        >>> n, mean, m2 = batch_moments(jnp.array([[1.0], [3.0]]), -1)
        >>> float(n[0]), float(mean[0]), float(m2[0])
        (2.0, 2.0, 2.0)
    """
    dtype = _stat_dtype(x.dtype)
    xs = x.astype(dtype)
    feature = axis % x.ndim
    axes = tuple(d for d in range(x.ndim) if d != feature)
    if mask is None:
        count = math.prod(x.shape[d] for d in axes)
        n = jnp.full((x.shape[feature],), count, dtype)
        mean = jnp.mean(xs, axes) if count else jnp.zeros_like(n)
        m2 = jnp.sum(jnp.square(xs - jnp.expand_dims(mean, axes)), axes)
    else:
        keep = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
        n = jnp.sum(keep, axes, dtype=dtype)
        safe = jnp.where(n > 0, n, 1)
        # where, not a product: NaN or inf padding must not reach the sums.
        mean = jnp.sum(jnp.where(keep, xs, 0), axes) / safe
        centred = jnp.where(keep, xs - jnp.expand_dims(mean, axes), 0)
        m2 = jnp.sum(jnp.square(centred), axes)
    if axis_name is None:
        return n, mean, m2
    # One collective for the three: each shard's triple, then the exact merge.
    gathered = jax.lax.all_gather(jnp.stack([n, mean, m2]), axis_name)  # (shards, 3, C)
    ns, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = jnp.sum(ns, 0)
    safe_total = jnp.where(total > 0, total, 1)
    merged = jnp.sum(ns * means, 0) / safe_total
    spread = jnp.sum(m2s + ns * jnp.square(means - merged), 0)
    return total, merged, spread


class BatchNorm(BatchNormSettings, nnx.Module):
    """Batch Normalisation with one meaning on every backend (``SPEC.md`` section 2), as an
    ``nnx.Module``.

    Canonical by default (momentum 0.1 weighing the *new* batch statistic, eps 1e-5,
    unbiased running variance, the non-finite guard, one value per feature refused);
    ``preset="flax"`` reproduces ``nnx.BatchNorm`` (momentum 0.99 weighing the old value
    is ``momentum=0.01`` here), and ``"torch"``, ``"keras"``, ``"mxnet"`` the other
    frameworks' layers (``SPEC.md`` section 4).

    Args:
        num_features: C, the number of features on ``axis``.
        axis: the feature axis (default -1, channels-last as Flax).
        eps: added to the variance inside the square root (default 1e-5).
        momentum: weight of the new batch statistic (default 0.1; None: the cumulative
            average).
        use_bias, use_scale: learn ``bias`` (beta) and ``scale`` (gamma), as
            ``nnx.BatchNorm``. Default True.
        track_running_stats: keep running statistics and use them in inference; False
            normalises with batch statistics always. Default True.
        preset: None (canonical) or a backend's name (``"flax"``, ``"torch"``, ...).
        running_var, skip_nonfinite, allow_single_value, empty_batch: as
            :class:`unorm.spec.BatchNormSpec`; default from the preset.
        use_running_average: False (default) trains; True normalises with the running
            statistics (``model.eval()`` sets it, ``model.train()`` clears it).
        axis_name: the named axis (``shard_map``, ``pmap``, ``vmap``) whose shards'
            statistics are merged; None (default) merges nothing (under a sharded
            ``jax.jit`` none is needed).
        param_dtype: dtype of parameters and running statistics (default float32, also
            for 16-bit inputs).
        rngs: accepted for ``nnx.BatchNorm``'s signature and unused (the initial values
            are ones and zeros).

    ``frozen`` (default False; :func:`unorm.flax.freeze` sets it) normalises with the
    running statistics in training too and never updates them.

    The one-value-per-feature check needs static shapes: it runs where the count is
    known while tracing (no ``mask``); with a ``mask`` it is not made.

    Example:
        >>> bn = BatchNorm(3)
        >>> y = bn(jnp.arange(12.0).reshape(4, 3))
        >>> y.shape, int(bn.num_batches_tracked[...])
        ((4, 3), 1)
        >>> [round(float(v), 4) for v in bn.var[...]]
        [2.4, 2.4, 2.4]
    """

    # The parameter of nnx.BatchNorm's name, shadowing the settings' flag (use_scale).
    scale: nnx.Param[jax.Array] | None = None  # type: ignore[assignment]

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = -1,
        eps: float | Unset = UNSET,
        momentum: float | Unset | None = UNSET,
        use_bias: bool = True,
        use_scale: bool = True,
        track_running_stats: bool = True,
        preset: str | None = None,
        running_var: str | Unset = UNSET,
        skip_nonfinite: bool | Unset = UNSET,
        allow_single_value: bool | Unset = UNSET,
        empty_batch: str | Unset = UNSET,
        use_running_average: bool = False,
        axis_name: str | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        for flag, value in (("use_bias", use_bias), ("use_scale", use_scale)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        self.spec = BatchNormSpec.from_preset(
            preset,
            center=use_bias,
            scale=use_scale,
            track_running_stats=track_running_stats,
            axis=axis,
            **given(
                eps=eps,
                momentum=momentum,
                running_var=running_var,
                skip_nonfinite=skip_nonfinite,
                allow_single_value=allow_single_value,
                empty_batch=empty_batch,
            ),
        )
        if self.spec.update_on == "backward":
            # A JAX function has no backward pass of its own to update state in: whether
            # gradients are taken is the caller's (jax.grad), not the layer's, to know.
            raise ValueError(
                "update_on='backward' (the mxnet preset's update in backward) cannot be "
                "expressed in JAX; use update_on='forward'"
            )
        self.num_features = num_features
        self.frozen = False
        self.use_running_average = use_running_average
        self.axis_name = axis_name
        self.param_dtype = param_dtype
        shape = (num_features,)
        self.scale = nnx.Param(jnp.ones(shape, param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype)) if use_bias else None
        self.mean: nnx.BatchStat[jax.Array] | None
        self.var: nnx.BatchStat[jax.Array] | None
        self.num_batches_tracked: nnx.BatchStat[jax.Array] | None
        if track_running_stats:
            self.mean = nnx.BatchStat(jnp.zeros(shape, param_dtype))
            self.var = nnx.BatchStat(jnp.ones(shape, param_dtype))
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        else:
            self.mean = self.var = self.num_batches_tracked = None

    @property
    def use_bias(self) -> bool:
        """Whether the layer learns ``bias`` (the spec's ``center``)."""
        return self.spec.center

    @property
    def use_scale(self) -> bool:
        """Whether the layer learns ``scale`` (the spec's ``scale``)."""
        return self.spec.scale

    @property
    def epsilon(self) -> float:
        """``eps``, under ``nnx.BatchNorm``'s name."""
        return self.spec.eps

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: set ``use_running_average`` where given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    # -- input checks ------------------------------------------------------------------

    def _check_input(self, x: Any) -> int:
        """Validate ``x`` (while tracing, before any state is touched); its feature axis."""
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"input must be an array, got {type(x).__name__}")
        if len(shape) < 2:
            raise ValueError(
                "input must have rank >= 2 (a batch axis and a feature axis), "
                f"got shape {tuple(shape)}"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"input must have a floating-point dtype, got {dtype}")
        ax = normalize_axis(self.spec.axis, len(shape))
        if shape[ax] != self.num_features:
            raise ValueError(
                f"input must have {self.num_features} features on axis {self.spec.axis}, "
                f"got shape {tuple(shape)} with {shape[ax]}"
            )
        return ax

    def _static_count(self, x: jax.Array, ax: int, masked: bool) -> int | None:
        """Values per feature if known while tracing (no mask), across ``axis_name``."""
        if masked:
            return None
        count = math.prod(d for i, d in enumerate(x.shape) if i != ax)
        if self.axis_name is not None:
            count *= int(jax.lax.axis_size(self.axis_name))
        return count

    def _check_count(self, count: int | None, shape: tuple[int, ...]) -> None:
        """Refuse one value per feature (``SPEC.md`` section 2, *One value per feature*)."""
        if count == 1 and not self.spec.allow_single_value:
            raise ValueError(
                "expected more than 1 value per channel to compute batch statistics "
                f"(training, or track_running_stats=False), got 1 (batch size x spatial "
                f"size) for input of shape {shape}; use a larger batch or eval mode with "
                "running statistics"
            )

    # -- call --------------------------------------------------------------------------

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalise ``x``: with batch statistics in training (updating the running ones,
        exactly once) or with ``track_running_stats=False``, else with the running ones.

        ``use_running_average`` overrides the attribute for this call, as in
        ``nnx.BatchNorm``. ``mask`` (boolean, broadcastable to ``x``) keeps the values
        that count in the statistics (padding, uneven shards); every value is normalised.
        Bad input raises ``ValueError`` before any state changes. Returns an array of
        ``x``'s shape and dtype.
        """
        ax = self._check_input(x)
        inference = self.use_running_average if use_running_average is None else use_running_average
        # Frozen (SPEC.md section 8): the running statistics, whatever train() said.
        inference = inference or self.frozen
        spec = self.spec
        stat = _stat_dtype(x.dtype)
        if x.size == 0:  # whatever the statistics, nothing to normalise
            updating = not inference and self._static_count(x, ax, mask is not None) == 0
            return self._empty(x, ax, training=updating)
        if inference and spec.track_running_stats:
            assert self.mean is not None and self.var is not None
            return self._normalise(x, self.mean[...].astype(stat), self.var[...].astype(stat), ax)
        self._check_count(self._static_count(x, ax, mask is not None), tuple(x.shape))
        if mask is None and self.axis_name is None:
            # One device, every value: nnx.BatchNorm's own two means (the same float32
            # rounding, and one reduction over the centred values, not two).
            reduce = tuple(d for d in range(x.ndim) if d != ax)
            xs = x.astype(stat)
            batch_mean = jnp.mean(xs, reduce)
            batch_var = jnp.mean(jnp.square(xs - jnp.expand_dims(batch_mean, reduce)), reduce)
            n = jnp.full_like(batch_mean, math.prod(x.shape[d] for d in reduce))
            m2 = batch_var * n
        else:
            n, mean, m2 = batch_moments(x, ax, mask=mask, axis_name=self.axis_name)
            has = n > 0
            nan = jnp.asarray(jnp.nan, stat)
            batch_mean = jnp.where(has, mean, nan)
            batch_var = jnp.where(has, m2 / jnp.where(has, n, 1), nan)
        if not inference and spec.track_running_stats:
            self._update(n, batch_mean, m2, batch_var)
        return self._normalise(x, batch_mean, batch_var, ax)

    def _normalise(self, x: jax.Array, mean: jax.Array, var: jax.Array, ax: int) -> jax.Array:
        """``(x - mean) * (rsqrt(var + eps) * scale) + bias`` in the statistics' dtype, as
        ``nnx.BatchNorm`` orders it; the result in ``x``'s dtype."""
        shape = [1] * x.ndim
        shape[ax] = self.num_features
        xs = x.astype(mean.dtype)
        mul = jax.lax.rsqrt(var + jnp.asarray(self.spec.eps, var.dtype)).reshape(shape)
        if self.scale is not None:
            mul = mul * self.scale[...].astype(mean.dtype).reshape(shape)
        y = (xs - mean.reshape(shape)) * mul
        if self.bias is not None:
            y = y + self.bias[...].astype(mean.dtype).reshape(shape)
        return y.astype(x.dtype)

    def _empty(self, x: jax.Array, ax: int, training: bool) -> jax.Array:
        """An empty batch (``SPEC.md`` section 2, *Empty batch*): an empty output through
        the affine parameters, so their gradients are zero sums over nothing; the state as
        ``empty_batch`` says."""
        shape = [1] * x.ndim
        shape[ax] = self.num_features
        stat = _stat_dtype(x.dtype)
        y = x.astype(stat)
        if self.scale is not None:
            y = y * self.scale[...].astype(stat).reshape(shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(stat).reshape(shape)
        if training and self.spec.track_running_stats:
            nothing = jnp.full((self.num_features,), jnp.nan, stat)
            self._update(jnp.zeros((self.num_features,), stat), nothing, nothing, nothing)
        return y.astype(x.dtype)

    def _update(
        self, n: jax.Array, batch_mean: jax.Array, m2: jax.Array, batch_var: jax.Array
    ) -> None:
        """Fold one batch into the running statistics (``SPEC.md`` section 2): the fed
        variance, the factor, the guard and the empty-batch rule, without host syncs."""
        assert self.mean is not None and self.var is not None
        assert self.num_batches_tracked is not None
        spec = self.spec
        old_mean, old_var = self.mean[...], self.var[...]
        tracked = self.num_batches_tracked[...]
        if spec.unbiased:  # one value per feature: the unbiased estimate is the biased one
            fed = jnp.where(n > 1, m2 / jnp.where(n > 1, n - 1, 1), batch_var)
        else:
            fed = batch_var
        fed = jax.lax.stop_gradient(fed)
        batch_mean = jax.lax.stop_gradient(batch_mean)
        if spec.momentum is None:
            wide = jnp.promote_types(old_mean.dtype, jnp.float32)
            factor: Any = (1.0 / (tracked.astype(wide) + 1)).astype(old_mean.dtype)
        else:
            factor = spec.momentum
        new_mean = (1 - factor) * old_mean + factor * batch_mean.astype(old_mean.dtype)
        new_var = (1 - factor) * old_var + factor * fed.astype(old_var.dtype)
        empty = jnp.all(n == 0)
        ok = jnp.asarray(True)
        if spec.skip_nonfinite:
            ok = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(fed))
        if spec.empty_batch == "nan":  # the NaN statistics of no values, fed as any batch's
            commit = counted = ok
        else:
            commit = ok & ~empty
            counted = commit | empty if spec.empty_batch == "count" else commit
        self.mean[...] = jnp.where(commit, new_mean, old_mean)
        self.var[...] = jnp.where(commit, new_var, old_var)
        self.num_batches_tracked[...] = tracked + counted.astype(tracked.dtype)

"""The Flax native column: ``flax.nnx.BatchNorm`` under the case's settings.

The layer gets the case's values as its own arguments (``epsilon``, ``momentum`` weighing
the old value, ``use_bias``, ``use_scale``, ``axis``) and keeps its defaults otherwise
(``use_fast_variance=True``); what it cannot be told (the guard, the variance estimator,
one value per feature, the cumulative average) is its own, the ``flax`` preset's. It
keeps no ``num_batches_tracked``. Departures are labelled by the suite, never counted as
failures of unorm.

Example:
    >>> from unorm.conformance.adapter import LayerConfig
    >>> create().native_spec(LayerConfig(3, 4, -1, "float32")).running_var
    'biased'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unorm.conformance.adapter import (
    LayerConfig,
    SyncResult,
    Unsupported,
    old_weight,
    old_weight_native_spec,
)
from unorm.conformance.columns import flax as _flax
from unorm.spec import BatchNormSpec

__all__ = ["FlaxNativeAdapter", "create"]


class FlaxNativeAdapter(_flax.FlaxBase):
    """``flax.nnx.BatchNorm`` driven with native arguments."""

    name = "flax-native"
    native = True
    absent = frozenset({"num_batches_tracked"})

    def native_spec(self, config: LayerConfig) -> BatchNormSpec:
        return old_weight_native_spec(
            config, "flax", "nnx.BatchNorm", "normalises with running statistics in eval"
        )

    def make(self, config: LayerConfig) -> Any:
        spec = self.native_spec(config)
        jnp = _flax.jnp()
        return _flax.nnx().BatchNorm(
            config.num_features,
            epsilon=spec.eps,
            momentum=old_weight(spec),
            use_bias=spec.center,
            use_scale=spec.scale,
            axis=spec.axis,
            param_dtype=getattr(jnp, config.param_dtype),
            rngs=_flax.nnx().Rngs(0),
        )

    def bn_freeze(self, layer: _flax.Built, trainable: bool) -> _flax.Built:
        """Flax's own freeze: the layer called with ``use_running_average=True`` whatever
        the step asks (a subclass that always passes it, holding the layer's state).
        ``nnx.BatchNorm`` has no fixed scale and bias of its own (an optimizer filter
        leaves them out), so a frozen layer with fixed ones is unsupported."""
        if not trainable:
            raise Unsupported(
                "nnx.BatchNorm has no fixed scale and bias (an optimizer's filter leaves "
                "them out); use_running_average=True freezes the statistics only"
            )
        nnx = _flax.nnx()

        class AlwaysRunningAverage(nnx.BatchNorm):  # type: ignore[misc,name-defined]
            """``nnx.BatchNorm`` called with ``use_running_average=True`` always."""

            def __call__(self, x: Any, use_running_average: Any = None, **kw: Any) -> Any:
                return super().__call__(x, use_running_average=True, **kw)

        old = layer.layer
        frozen = AlwaysRunningAverage(
            old.num_features,
            epsilon=old.epsilon,
            momentum=old.momentum,
            use_bias=old.use_bias,
            use_scale=old.use_scale,
            axis=old.axis,
            param_dtype=old.param_dtype,
            rngs=nnx.Rngs(0),
        )
        nnx.update(frozen, nnx.state(old))
        return _flax.Built(frozen, layer.config)

    def sync_bn_step(
        self,
        config: LayerConfig,
        gamma: np.ndarray,
        beta: np.ndarray,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
    ) -> SyncResult:
        # nnx.BatchNorm's axis_name averages the shards' means and mean squares (lax.pmean):
        # shards of unequal kept counts are weighed equally, so the suite's uneven and
        # empty replicas would not be its statistics; nothing to compare fairly.
        raise Unsupported("nnx.BatchNorm's axis_name weighs every shard equally (lax.pmean)")


def create() -> FlaxNativeAdapter:
    """The adapter the suite loads."""
    return FlaxNativeAdapter()

"""The Keras native column: ``keras.layers.BatchNormalization`` under the case's settings.

The layer gets the case's values as Keras's own arguments (``epsilon``, ``momentum`` as
the weight of the *old* value, ``center``, ``scale``, ``axis``); what it cannot be told
(the variance fed to the moving variance, the non-finite guard, ...) is Keras's, i.e. the
``keras`` preset's. ``momentum=None`` and ``track_running_stats=False`` have no Keras
equivalent and are reported unsupported. Departures are labelled, never failures.

Example:
    >>> from unorm.conformance.adapter import LayerConfig
    >>> create().native_spec(LayerConfig(3, 4, -1, "float32")).running_var
    'biased'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unorm.conformance import dtypes
from unorm.conformance.adapter import LayerConfig, Unsupported, old_weight, old_weight_native_spec
from unorm.conformance.columns import keras as _keras
from unorm.spec import BatchNormSpec

__all__ = ["KerasNativeAdapter", "create"]


class KerasNativeAdapter(_keras.KerasBase):
    """``keras.layers.BatchNormalization`` driven with native arguments."""

    name = "keras-native"
    native = True

    def native_spec(self, config: LayerConfig) -> BatchNormSpec:
        return old_weight_native_spec(
            config, "keras", "BatchNormalization", "keeps moving statistics"
        )

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Any:
        spec = self.native_spec(config)
        dtype = config.dtype if config.dtype in dtypes.DTYPES else "float32"
        layer = _keras.keras().layers.BatchNormalization(
            axis=spec.axis,
            momentum=old_weight(spec),
            epsilon=spec.eps,
            center=spec.center,
            scale=spec.scale,
            dtype=_keras.policy(dtype),
            **_renorm_arguments(spec),
        )
        return self.built(layer, config, gamma, beta)

    def bn_freeze(self, layer: _keras.Built, trainable: bool) -> _keras.Built:
        """Keras's own freeze, ``trainable=False``: in Keras 3 the layer then normalises
        with its moving statistics also under ``training=True``, and gamma and beta are
        fixed with it; a frozen layer with trainable ones it cannot express."""
        if trainable:
            raise Unsupported(
                "keras.layers.BatchNormalization(trainable=False) fixes gamma and beta too; "
                "Keras has no frozen layer with a trainable scale and shift"
            )
        layer.layer.trainable = False
        return layer


def _renorm_arguments(spec: BatchNormSpec) -> dict[str, Any]:
    """Keras's own ``renorm`` arguments for ``spec`` (none without renorm)."""
    if not spec.renorm:
        return {}
    return {
        "renorm": True,
        "renorm_clipping": spec.renorm_clipping,
        "renorm_momentum": 1.0 - spec.renorm_momentum,
    }


def create() -> KerasNativeAdapter:
    """The adapter the suite loads."""
    return KerasNativeAdapter()

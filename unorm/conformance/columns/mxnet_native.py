"""The MXNet native column: ``mxnet.gluon.nn.BatchNorm`` under the case's settings.

The block gets the case's values as Gluon's own arguments (``epsilon``, ``momentum`` as
the weight of the *old* value, ``center``, ``scale``, ``axis``); what it cannot be told
(the variance fed to the running variance, the update happening in backward on CPU, the
non-finite guard) is Gluon's, i.e. the ``mxnet`` preset's. ``momentum=None`` and
``track_running_stats=False`` have no Gluon equivalent (``use_global_stats`` is a frozen
layer, not batch statistics in inference) and are reported unsupported. Cross-replica
cases run ``gluon.contrib.nn.SyncBatchNorm``, which averages per-device moments with
equal weights.

Example:
    >>> from unorm.conformance.adapter import LayerConfig
    >>> create().native_spec(LayerConfig(3, 4, 1, "float32")).update_on
    'backward'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unorm.conformance.adapter import (
    LayerConfig,
    Unsupported,
    old_weight,
    old_weight_native_spec,
)
from unorm.conformance.columns import mxnet as _mxnet
from unorm.spec import BatchNormSpec

__all__ = ["MXNetNativeAdapter", "create"]


class MXNetNativeAdapter(_mxnet.MXNetBase):
    """``gluon.nn.BatchNorm`` driven with native arguments."""

    name = "mxnet-native"
    native = True

    def native_spec(self, config: LayerConfig) -> BatchNormSpec:
        return old_weight_native_spec(
            config, "mxnet", "gluon.nn.BatchNorm", "uses running statistics in inference"
        )

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Any:
        spec = self.native_spec(config)
        block = _mxnet.mx().gluon.nn.BatchNorm(
            axis=spec.axis,
            momentum=old_weight(spec),
            epsilon=spec.eps,
            center=spec.center,
            scale=spec.scale,
            in_channels=config.num_features,
        )
        return self.built(block, config, gamma, beta)

    def bn_freeze(self, layer: Any, trainable: bool) -> Any:
        """Gluon's own freeze: a ``gluon.nn.BatchNorm(use_global_stats=True)`` of the same
        settings holding the layer's parameters and running statistics (it normalises
        with them in training too, and never updates them); gamma and beta fixed
        (``grad_req="null"``) unless ``trainable``."""
        old = layer.block
        kw = old._kwargs
        block = _mxnet.mx().gluon.nn.BatchNorm(
            axis=kw["axis"], momentum=kw["momentum"], epsilon=kw["eps"],
            center=old.beta.grad_req != "null", scale=not kw["fix_gamma"],
            use_global_stats=True, in_channels=layer.params["gamma"].shape[0],
        )  # fmt: skip
        block.initialize()
        if layer.dtype == "float64":
            block.cast("float64")
        params = _mxnet.params_of(block)
        for name, param in params.items():
            param.set_data(layer.params[name].data())
        if not trainable:
            for name in ("gamma", "beta"):
                params[name].grad_req = "null"
        return _mxnet.Built(block, params, layer.dtype)

    def sync_block(self, config: LayerConfig, devices: int) -> Any:
        spec = self.native_spec(config)
        if spec.axis % config.ndim != 1:
            raise Unsupported("gluon.contrib.nn.SyncBatchNorm normalises axis 1 only")
        return _mxnet.mx().gluon.contrib.nn.SyncBatchNorm(
            in_channels=config.num_features,
            num_devices=devices,
            momentum=old_weight(spec),
            epsilon=spec.eps,
            center=spec.center,
            scale=spec.scale,
        )


def create() -> MXNetNativeAdapter:
    """The adapter the suite loads."""
    return MXNetNativeAdapter()

"""The MXNet Gluon 1.9 backend's declaration (:mod:`unorm._core.registry`); imports no
framework."""

from __future__ import annotations

from .._core.layer_kinds import CHANNELS_FIRST_LAYOUTS
from .._core.registry import BackendPlugin

#: Dense (units, in); Conv (O, I/g, *k), depthwise (groups = in) (I*M, 1, *k);
#: Conv*DTranspose (I, O/g, *k); Embedding (rows, dim): PyTorch's layouts.
PLUGIN = BackendPlugin(
    name="mxnet",
    title="MXNet Gluon",
    environment="legacy",
    modules=("mxnet",),
    distributions={"mxnet": "mxnet"},
    native_preset={
        "eps": 1e-5,
        "momentum": 1.0 - 0.9,
        "running_var": "biased",
        "skip_nonfinite": False,
        "allow_single_value": True,
        "update_on": "backward",
        "empty_batch": "nan",
    },
    native_arguments={
        "eps": "epsilon",
        "momentum_weighs": "old",
        "affine": False,
        "default_axis": 1,
        "cumulative_average": False,
    },
    layouts=CHANNELS_FIRST_LAYOUTS,
    file_endings=("-symbol.json", ".params"),
    columns=("mxnet", "mxnet-native"),
    public_module="unorm.mxnet",
    port_module="unorm._mxnet.port",
    models_module="unorm.models.mxnet",
    order=2,
)

"""The Keras 3 backend's declaration (:mod:`unorm._core.registry`); imports no framework."""

from __future__ import annotations

from .._core.layer_kinds import KernelLayout
from .._core.registry import BackendPlugin

#: Dense (in, units); Conv (*k, I/g, O); Conv*DTranspose (*k, O, I); DepthwiseConv
#: (*k, I, M), output channel i*M + m; Embedding (rows, dim).
PLUGIN = BackendPlugin(
    name="keras",
    title="Keras 3",
    environment="current",
    modules=("keras", "tensorflow"),
    distributions={"keras": "keras", "tensorflow": "tensorflow-cpu"},
    native_preset={
        "eps": 1e-3,
        "momentum": 1.0 - 0.99,
        "running_var": "biased",
        "skip_nonfinite": False,
        "allow_single_value": True,
        "update_on": "forward",
        "empty_batch": "nan",
        # Only Keras's layers take a mask (the other plug-ins declare no fully_masked).
        "fully_masked": "zero",
        # Only Keras's layer has Batch Renormalization (renorm=True), keeping a moving
        # stddev for inference and weighing the old renorm statistics by 0.99.
        "renorm_momentum": 1.0 - 0.99,
        "renorm_running": "stddev",
    },
    native_arguments={
        "eps": "epsilon",
        "momentum_weighs": "old",
        "affine": False,
        "default_axis": -1,
        "cumulative_average": False,
        "renorm": True,
    },
    layouts={
        "dense": KernelLayout("k b a"),
        "conv": KernelLayout("k b a"),
        "conv_transpose": KernelLayout("k b a"),
        "depthwise_conv": KernelLayout("k a b"),
        "embedding": KernelLayout("a b k"),
    },
    file_endings=(".keras", ".weights.h5"),
    columns=("keras", "keras-native"),
    public_module="unorm.keras",
    port_module="unorm._keras.port",
    models_module="unorm.models.keras",
    order=1,
)

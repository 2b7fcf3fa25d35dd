"""The Flax NNX backend's declaration (:mod:`unorm._core.registry`); imports no framework.

Conventions read from ``flax/nnx/nn/normalization.py`` (Flax 0.12.8): ``nnx.BatchNorm``
weighs the *old* value with ``momentum=0.99``, adds ``epsilon=1e-5`` inside the square
root, feeds the running variance the biased batch variance, updates in the forward call
(``use_running_average=False``), has no guard, accepts one value per feature silently and
feeds an empty batch's NaN statistics (``mean`` of nothing) to the update. Its feature
axis defaults to the last one. Its statistics use ``E[x^2] - E[x]^2`` clamped at 0
(``use_fast_variance=True``); unorm computes two-pass statistics under every preset, which
agree with it to float32 rounding on data whose mean is small against its spread.
"""

from __future__ import annotations

from .._core.layer_kinds import KernelLayout
from .._core.registry import BackendPlugin

#: nnx.Linear kernel (in, out); nnx.Conv (*k, I/g, O); nnx.ConvTranspose (*k, I, O)
#: (``transpose_kernel=True``: (*k, O, I), which the AGC transformation reads from the
#: layer); a depthwise nnx.Conv (``feature_group_count`` = in) (*k, 1, I*M), output
#: channel i*M + m; nnx.Embed embedding (rows, dim).
PLUGIN = BackendPlugin(
    name="flax",
    title="Flax NNX",
    environment="current",
    modules=("jax", "flax", "optax"),
    distributions={"jax": "jax", "flax": "flax", "optax": "optax"},
    native_preset={
        "eps": 1e-5,
        "momentum": 1.0 - 0.99,
        "running_var": "biased",
        "skip_nonfinite": False,
        "allow_single_value": True,
        "update_on": "forward",
        "empty_batch": "nan",
    },
    native_arguments={
        "eps": "epsilon",
        "momentum_weighs": "old",
        "affine": False,
        "default_axis": -1,
        "cumulative_average": False,
    },
    layouts={
        "dense": KernelLayout("k b a"),
        "conv": KernelLayout("k b a"),
        "conv_transpose": KernelLayout("k a b"),
        "depthwise_conv": KernelLayout("k 1 ab"),
        "embedding": KernelLayout("a b k"),
    },
    file_endings=(".msgpack",),
    columns=("flax", "flax-native"),
    public_module="unorm.flax",
    port_module="unorm._flax.port",
    models_module="unorm.models.flax",
    order=3,
)

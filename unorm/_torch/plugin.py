"""The PyTorch backend's declaration (:mod:`unorm._core.registry`); imports no framework."""

from __future__ import annotations

from .._core.layer_kinds import CHANNELS_FIRST_LAYOUTS
from .._core.registry import BackendPlugin

#: Linear (out, in); Conv (O, I/g, *k); ConvTranspose (I, O/g, *k); a depthwise Conv
#: (groups = in) (I*M, 1, *k); Embedding (rows, dim).
PLUGIN = BackendPlugin(
    name="torch",
    title="PyTorch",
    environment="current",
    modules=("torch",),
    distributions={"torch": "torch"},
    native_preset={
        "eps": 1e-5,
        "momentum": 0.1,
        "running_var": "unbiased",
        "skip_nonfinite": False,
        "allow_single_value": False,
        "update_on": "forward",
        "empty_batch": "count",
    },
    native_arguments={
        "eps": "eps",
        "momentum_weighs": "new",
        "affine": True,
        "default_axis": 1,
        "cumulative_average": True,
    },
    layouts=CHANNELS_FIRST_LAYOUTS,
    file_endings=(".pt", ".pth"),
    columns=("torch", "torch-native"),
    public_module="unorm.torch",
    port_module="unorm._torch.port",
    models_module="unorm.models.torch",
    order=0,
)

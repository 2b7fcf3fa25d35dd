"""``unorm port``: move a seed network's state between checkpoint files of any framework.

The file's name says its format: ``.safetensors`` is the neutral checkpoint
(:mod:`unorm.port`); ``.pt``/``.pth`` a PyTorch ``state_dict``; ``.keras`` or
``.weights.h5`` a Keras file; ``-symbol.json``/``.params`` an MXNet pair. A native file is
read into the named seed network of its framework (``unorm.models.<framework>``), whose
state is exported to the canonical layout; that state is then written as the neutral
checkpoint, or loaded into the destination framework's network and written natively.

Each framework is imported only when a file of it is read or written; MXNet lives in the
legacy environment, so a PyTorch -> MXNet port takes two calls, one in each environment,
through a ``.safetensors`` file.

Example:
    $ unorm port lenet.pt lenet.safetensors          # current environment
    $ unorm port lenet.safetensors lenet-symbol.json  # legacy environment
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from . import port
from ._core.registry import plugin, plugins_in_order
from .port import Checkpoint, CheckpointError

__all__ = ["FORMATS", "framework_of", "port_file"]

#: File-name endings and the framework whose format they are: the neutral checkpoint's,
#: then every plug-in's ``file_endings`` in the plug-ins' order.
FORMATS: dict[str, str] = {
    ".safetensors": "neutral",
    **{ending: p.name for p in plugins_in_order() for ending in p.file_endings},
}


def framework_of(path: str | os.PathLike[str]) -> str:
    """The framework whose checkpoint format ``path``'s name ends with (or ``neutral``).

    Example:
        >>> framework_of("run/lenet.weights.h5")
        'keras'
    """
    name = os.fspath(path)
    for ending, framework in FORMATS.items():
        if name.endswith(ending):
            return framework
    endings = ", ".join(FORMATS)
    raise CheckpointError(
        f"{name}: unknown checkpoint format; file names must end with one of {endings}"
    )


def _modules(framework: str) -> tuple[ModuleType, dict[str, Any]]:
    declared = plugin(framework)
    return declared.load("port"), declared.load("models").MODELS


def _network(framework: str, model: str) -> tuple[ModuleType, Any, tuple[int, ...]]:
    backend, models = _modules(framework)
    if model not in models:
        raise CheckpointError(f"model must be one of {sorted(models)}, got {model!r}")
    factory, input_shape = models[model]
    return backend, factory(), input_shape


def port_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], model: str = "lenet_bn"
) -> Checkpoint:
    """Port ``model``'s state from the file ``src`` to the file ``dst``; return the state.

    Nothing is written unless the whole state was read and fits the destination network;
    the destination file is replaced atomically.
    """
    source_fw, target_fw = framework_of(src), framework_of(dst)
    if source_fw == "neutral":
        ckpt = port.load(src)
    else:
        backend, network, input_shape = _network(source_fw, model)
        ckpt = backend.export_model(backend.read_native(network, src), input_shape)
    if target_fw == "neutral":
        port.save(ckpt, dst)
    else:
        backend, network, _ = _network(target_fw, model)
        backend.load_checkpoint(network, ckpt)
        backend.write_native(network, dst)
    return ckpt

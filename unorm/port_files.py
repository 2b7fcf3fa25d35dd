"""``unorm port``: move a model's state between checkpoint files of any framework.

The file's name says its format: ``.safetensors`` is the neutral checkpoint
(:mod:`unorm.port`); ``.pt``/``.pth`` a PyTorch ``state_dict``; ``.keras`` or
``.weights.h5`` a Keras file; ``-symbol.json``/``.params`` an MXNet pair. A native file is
read into the named network of its framework, whose state is exported to the canonical
layout (with the probe every load is verified on); that state is then written as the
neutral checkpoint, or loaded into the destination framework's network and written
natively.

The network is a seed network of ``unorm.models`` by name (``lenet_bn``), a zoo model of
``unorm.models.zoo`` (``resnet50``, ``keras_mobilenet_v2``, ...), or the user's
own as ``package.module:factory``: ``factory(framework)`` returns the model for that
framework's name (``"torch"``, ``"keras"``, ``"mxnet"``), or a ``(model, input_shape)``
pair, ``input_shape`` being one sample's shape in that framework's own convention (it
gives the probe and the Flatten shapes; without it PyTorch and MXNet sources export no
probe).

Each framework is imported only when a file of it is read or written; MXNet lives in the
legacy environment, so a PyTorch -> MXNet port takes two calls, one in each environment,
through a ``.safetensors`` file.

Example:
    $ unorm port lenet.pt lenet.safetensors          # current environment
    $ unorm port lenet.safetensors lenet-symbol.json  # legacy environment
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from . import port
from ._core.port_plan import pair_checkpoints
from ._core.registry import plugin, plugins_in_order
from .port import Checkpoint, CheckpointError

__all__ = ["FORMATS", "framework_of", "port_file", "settings_lost"]

#: File-name endings and the framework whose format they are: the neutral checkpoint's,
#: then the ``file_endings`` of every plug-in that ports, in the plug-ins' order.
FORMATS: dict[str, str] = {
    ".safetensors": "neutral",
    **{ending: p.name for p in plugins_in_order() if p.ports for ending in p.file_endings},
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


def _user_network(framework: str, model: str) -> tuple[Any, tuple[int, ...] | None]:
    """The user's ``package.module:factory`` called for ``framework``."""
    module_name, _, attr = model.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"model {model!r}: cannot import it ({err})") from None
    made = factory(framework)
    if isinstance(made, tuple) and len(made) == 2:
        network, shape = made
        return network, tuple(int(d) for d in shape)
    return made, None


def _network(framework: str, model: str) -> tuple[ModuleType, Any, tuple[int, ...] | None]:
    from .models import zoo  # imports no framework: a zoo model's builder does

    backend, models = _modules(framework)
    if ":" in model:
        network, input_shape = _user_network(framework, model)
        return backend, network, input_shape
    if model in zoo.ZOO:
        if framework not in zoo.ZOO[model].builders:
            raise CheckpointError(
                f"model {model!r} has no {framework} build; the zoo builds it in "
                f"{sorted(zoo.ZOO[model].builders)}"
            )
        # One sample channels-first, as PyTorch and MXNet take it (Keras reads its graph).
        return backend, zoo.build(model, framework), zoo.ZOO[model].input_shape()
    if model not in models:
        choices = sorted(models) + sorted(zoo.ZOO)
        raise CheckpointError(
            f"model must be one of {choices} or package.module:factory, got {model!r}"
        )
    factory, input_shape = models[model]
    return backend, factory(), input_shape


def _export(backend: ModuleType, network: Any, input_shape: tuple[int, ...] | None) -> Checkpoint:
    if input_shape is None:  # no example: no probe, and Flatten shapes from the graph only
        return backend.export_checkpoint(network)  # type: ignore[no-any-return]
    return backend.export_model(network, input_shape)  # type: ignore[no-any-return]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return bool(a == b)


def settings_lost(want: Checkpoint, got: Checkpoint) -> list[str]:
    """The settings of ``want`` that ``got`` (the same model read back from a written
    file) does not have: every BatchNorm setting (its ``preset`` name aside) and Scaled
    WS setting, as ``layer 1 'bn1': eps 0.001 -> 1e-05``; the two exports' layers pair
    along their data flows (a framework may order them otherwise).

    Example:
        >>> from unorm.port import Layer
        >>> def bn(eps):
        ...     return Checkpoint([Layer("bn", "batchnorm", {}, {"spec": {"eps": eps}})], {}, "x")
        >>> settings_lost(bn(1e-3), bn(1e-5))
        ["layer 0 'bn': eps 0.001 -> 1e-05"]
    """
    out = []
    for index, other in pair_checkpoints(want, got).items():
        a, b = want.layers[index], got.layers[other]
        for attr in ("spec", "ws"):
            mine, theirs = dict(a.attrs.get(attr) or {}), dict(b.attrs.get(attr) or {})
            for key, value in mine.items():
                # The feature axis is the layout's (1 channels-first, -1 channels-last),
                # not a setting: the checkpoint's tensors are canonical either way.
                if key not in ("preset", "axis") and not _same(value, theirs.get(key)):
                    out.append(f"layer {index} {a.name!r}: {key} {value!r} -> {theirs.get(key)!r}")
    return out


def _write_checked(
    backend: ModuleType,
    network: Any,
    ckpt: Checkpoint,
    dst: Path,
    framework: str,
    model: str,
    accept_loss: bool,
) -> None:
    """Write ``network`` natively to ``dst`` through a temporary folder beside it, read
    the files back into a fresh network and refuse (unless ``accept_loss``) when a
    setting of ``ckpt`` did not survive; then move the files into place, each keeping
    the mode an existing one had."""
    workdir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        backend.write_native(network, workdir / dst.name)
        _, fresh, shape = _network(framework, model)
        back = _export(backend, backend.read_native(fresh, workdir / dst.name), shape)
        lost = settings_lost(ckpt, back)
        if lost and not accept_loss:
            raise CheckpointError(
                f"{dst}: this format cannot hold every setting of the state; read back, "
                f"{'; '.join(lost)}. Write a format that holds them (.safetensors, or the "
                "framework's full-model file), or accept the loss (accept_loss=True, "
                "unorm port --accept-loss)"
            )
        for written in sorted(workdir.iterdir()):
            final = dst.parent / written.name
            mode = final.stat().st_mode & 0o7777 if final.exists() else None
            os.replace(written, final)
            if mode is not None:
                os.chmod(final, mode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def port_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model: str = "lenet_bn",
    accept_loss: bool = False,
    mapping: dict[str, str] | None = None,
) -> Checkpoint:
    """Port ``model``'s state (a seed network's name, or ``package.module:factory``, see
    the module's docstring) from the file ``src`` to the file ``dst``; return the state.

    Nothing is written unless the whole state was read, fits the destination network and
    passes the checkpoint's probe; the destination file is replaced atomically and keeps
    its mode (a new one gets what the umask gives). A native destination is read back
    before it replaces anything: a format that drops a setting (a weights-only file keeps
    no BatchNorm eps or momentum; reading it gives the model's own) is refused, naming
    every setting it would lose, unless ``accept_loss``. A weights-only source takes its
    settings from ``model``'s layers, as the framework's own loader does. ``mapping``
    (checkpoint layer name -> destination layer name) pairs those layers explicitly, the
    rest by order, where the data flow cannot decide. A missing source
    or destination folder, an unknown model and every refusal raise
    :class:`~unorm.port.CheckpointError`.
    """
    source_fw, target_fw = framework_of(src), framework_of(dst)
    folder = Path(dst).parent
    if not folder.is_dir():
        raise CheckpointError(f"{dst}: the folder {folder} does not exist")
    if not Path(src).exists():
        raise CheckpointError(f"{src}: no such file")
    if source_fw == "neutral":
        ckpt = port.load(src)
    else:
        backend, network, input_shape = _network(source_fw, model)
        ckpt = _export(backend, backend.read_native(network, src), input_shape)
    if target_fw == "neutral":
        port.save(ckpt, dst)
    else:
        backend, network, _ = _network(target_fw, model)
        if mapping:
            backend.load_checkpoint(network, ckpt, mapping=mapping)
        else:
            backend.load_checkpoint(network, ckpt)
        _write_checked(backend, network, ckpt, Path(dst), target_fw, model, accept_loss)
    return ckpt

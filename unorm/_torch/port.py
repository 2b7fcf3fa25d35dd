"""Export a PyTorch model's state to the neutral checkpoint and load one into a model.

Layers with parameters are matched by order (Conv*d, ConvTranspose*d, Linear, unorm's and
PyTorch's BatchNorm); pooling, activations, Flatten and Dropout carry nothing. PyTorch's
layout is the canonical one, so tensors move as they are; a Linear after a Flatten of a
``(C, H, W)`` map records ``flatten_from`` so channels-last frameworks can permute it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..port import (
    Checkpoint,
    CheckpointError,
    Layer,
    describe,
    match_layers,
    role_array,
    ws_settings,
)
from ..spec import BatchNormSpec, ScaledWSSpec
from .batchnorm import BatchNorm
from .ws import _ScaledStd

__all__ = ["export_checkpoint", "export_model", "load_checkpoint", "read_native", "write_native"]

_BN_ROLES = {
    "gamma": "weight",
    "beta": "bias",
    "running_mean": "running_mean",
    "running_var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "dense"
    if isinstance(module, (BatchNorm, _BatchNorm)):
        return "batchnorm"
    return None


def _param_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    out = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            out.append((name or type(module).__name__, module, kind))
    return out


def _bn_spec(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, BatchNorm):
        return dataclasses.asdict(module.spec)
    assert isinstance(module, _BatchNorm)
    spec = BatchNormSpec.from_native(
        "torch",
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
    )
    return dataclasses.asdict(spec)


def _flatten_shapes(model: nn.Module, example: torch.Tensor | None) -> dict[str, list[int]]:
    """Input shape (without batch) of every Linear fed by a Flatten of a feature map."""
    if example is None:
        return {}
    shapes: dict[str, list[int]] = {}
    pending: list[list[int]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Flatten):
            hooks.append(
                module.register_forward_hook(lambda m, i, o: pending.append(list(i[0].shape[1:])))
            )
        elif isinstance(module, nn.Linear):

            def grab(m: nn.Module, i: Any, o: Any, name: str = name) -> None:
                if pending and len(pending[-1]) > 1:
                    shapes[name] = pending[-1]
                pending.clear()

            hooks.append(module.register_forward_hook(grab))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def export_checkpoint(model: nn.Module, example: torch.Tensor | None = None) -> Checkpoint:
    """The neutral :class:`~unorm.port.Checkpoint` of ``model``'s state.

    ``example``: an input batch, run once in eval mode (running statistics untouched) to
    find which Linear layers follow a Flatten of a feature map; needed only when the model
    has one and the checkpoint will be loaded into a channels-last framework.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        >>> ckpt = export_checkpoint(net, torch.zeros(1, 1, 4, 4))
        >>> [(la.kind, la.attrs.get("flatten_from")) for la in ckpt.layers]
        [('conv', None), ('dense', [2, 2, 2])]
    """
    flat = _flatten_shapes(model, example)
    layers: list[Layer] = []
    tensors: dict[str, np.ndarray] = {}
    for name, module, kind in _param_layers(model):
        roles: dict[str, str] = {}
        attrs: dict[str, Any] = {}
        if kind == "batchnorm":
            pairs = [(role, getattr(module, attr)) for role, attr in _BN_ROLES.items()]
            attrs["spec"] = _bn_spec(module)
            attrs["native"] = not isinstance(module, BatchNorm)
        else:
            pairs = [("weight", module.weight), ("bias", getattr(module, "bias", None))]
            if kind != "dense":
                attrs["groups"] = int(module.groups)  # type: ignore[arg-type]
            if isinstance(module, _ScaledStd):
                # A Scaled WS convolution: its gain and settings travel with it.
                pairs.append(("gain", module.gain))
                attrs["ws"] = {"style": module.ws.style, "eps": module.ws.eps}
            if name in flat:
                attrs["flatten_from"] = flat[name]
        for role, value in pairs:
            if value is not None:
                key = f"{name}.{role}"
                tensors[key] = _numpy(value)
                roles[role] = key
        layers.append(Layer(name, kind, roles, attrs))
    return Checkpoint(layers=layers, tensors=tensors, source="torch")


_Step = tuple[
    nn.Module, Layer, list[tuple[torch.Tensor, np.ndarray]], BatchNormSpec | ScaledWSSpec | None
]


def _target_spec(
    module: nn.Module, layer: Layer, where: str
) -> BatchNormSpec | ScaledWSSpec | None:
    """The settings a BatchNorm or Scaled WS convolution will take from ``layer``
    (validated before any copy)."""
    if isinstance(module, _ScaledStd):
        return ws_settings(layer, where)
    if layer.kind != "batchnorm" or "spec" not in layer.attrs:
        return None
    settings = dict(layer.attrs["spec"])
    if isinstance(module, BatchNorm):
        # The model keeps its own axis and structure; the semantics come from the source.
        settings["axis"] = module.spec.axis
        settings["center"] = settings["scale"] = module.affine
        settings["track_running_stats"] = module.track_running_stats
    try:
        return BatchNormSpec(**settings)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: invalid BatchNorm settings: {err}") from None


def _plan(model: nn.Module, ckpt: Checkpoint) -> list[_Step]:
    """Match layers by order and check every shape before anything is copied."""
    targets = _param_layers(model)
    plan = []
    for (index, layer), (name, module, kind) in zip(
        match_layers(ckpt, [k for _, _, k in targets]), targets, strict=True
    ):
        where = f"layer {index}: checkpoint {describe(layer, ckpt)} vs model {kind} {name!r}"
        if kind != layer.kind:
            raise CheckpointError(f"{where}: kinds differ")
        roles = (
            _BN_ROLES
            if kind == "batchnorm"
            else {"weight": "weight", "bias": "bias", "gain": "gain"}
        )
        copies = []
        for role, attr in roles.items():
            dst = getattr(module, attr, None)
            src = role_array(ckpt, layer, role, dst is not None, where)
            if src is None:
                continue
            assert dst is not None
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(
                    f"{where}: {role} shape {tuple(src.shape)} in the checkpoint, "
                    f"{tuple(dst.shape)} in the model"
                )
            copies.append((dst, src))
        plan.append((module, layer, copies, _target_spec(module, layer, where)))
    return plan


def load_checkpoint(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load ``ckpt`` into ``model`` (layers matched by order, shapes checked first).

    Nothing is changed unless every layer matches. A unorm :class:`BatchNorm` takes the
    checkpoint's BatchNorm settings (a ported Keras or MXNet layer keeps behaving as it
    did at home, e.g. its eps and momentum); its feature axis stays the model's. A native
    ``nn.BatchNorm*d`` takes eps and momentum and warns where the source's training
    semantics (running-variance estimator, non-finite guard, one value per channel,
    update in backward) cannot be expressed by it.

    Example:
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> load_checkpoint(b, export_checkpoint(a))
        >>> bool(torch.equal(a.weight, b.weight))
        True
    """
    plan = _plan(model, ckpt)
    with torch.no_grad():
        for module, layer, copies, spec in plan:
            for dst, src in copies:
                dst.copy_(torch.from_numpy(np.array(src, order="C")).to(dst.dtype))
            if spec is not None:
                _apply_spec(module, layer, spec)


def _apply_spec(module: nn.Module, layer: Layer, spec: BatchNormSpec | ScaledWSSpec) -> None:
    if isinstance(spec, ScaledWSSpec):
        assert isinstance(module, _ScaledStd)
        module.ws = spec
        return
    if isinstance(module, BatchNorm):
        module.spec = spec
        return
    assert isinstance(module, _BatchNorm)
    module.eps = spec.eps
    module.momentum = spec.momentum
    lost = spec.native_gaps("torch")
    if lost:
        warnings.warn(
            f"{layer.name!r}: nn.BatchNorm cannot express the source's training semantics "
            f"({', '.join(lost)}); eval output is unchanged, training differs. "
            "Use unorm.torch.convert() first.",
            stacklevel=3,
        )


def read_native(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a PyTorch ``state_dict`` file (``torch.save(model.state_dict(), path)``) into
    ``model`` and return it. Keys and shapes are checked first: a file that does not fit
    raises :class:`~unorm.port.CheckpointError` and leaves ``model`` unchanged.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for damaged files
        raise CheckpointError(f"{path}: not a readable PyTorch state_dict: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: keys do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            theirs, ours = tuple(value.shape), tuple(own[key].shape)
            raise CheckpointError(f"{path}: {key!r} has shape {theirs}, the model's {ours}")
    model.load_state_dict(state)
    return model


def write_native(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save ``model.state_dict()`` to ``path`` atomically (temporary file, then rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_model(model: nn.Module, input_shape: tuple[int, ...]) -> Checkpoint:
    """:func:`export_checkpoint` with a zero example input of ``input_shape`` (no batch
    axis), as ``unorm port`` calls it for the seed networks."""
    example = torch.zeros((1, *input_shape), dtype=next(model.parameters()).dtype)
    return export_checkpoint(model, example)

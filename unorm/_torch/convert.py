"""``unorm.torch.convert``: swap a model's native BatchNorm layers for unorm's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import internals
from .after_training import is_frozen_native
from .batchnorm import BatchNorm
from .sync import SyncBatchNorm

__all__ = ["convert"]

_NUM_DIMS = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}


def _replacement(native: internals.NativeBatchNorm, preset: str | None) -> BatchNorm:
    # nn.BatchNorm1d takes (N, C) and (N, C, L): no fixed rank. PyTorch's eps and
    # momentum already mean what unorm's do, so they carry over as they are.
    num_dims = _NUM_DIMS.get(type(native))
    cls = SyncBatchNorm if isinstance(native, nn.SyncBatchNorm) else BatchNorm
    extra: dict[str, Any] = {}
    if isinstance(native, nn.SyncBatchNorm):
        extra["process_group"] = native.process_group
    ref = native.weight if native.weight is not None else native.running_mean
    layer = cls(
        native.num_features,
        num_dims,
        eps=native.eps,
        momentum=native.momentum,
        affine=native.affine,
        bias=native.bias is not None or not native.affine,  # nn.BatchNorm*d(bias=False)
        track_running_stats=native.track_running_stats,
        preset=preset,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
        **extra,
    )
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(native, name), getattr(layer, name)
            if src is not None and dst is not None:
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(native, name), getattr(layer, name)
            if src is not None and dst is not None:
                dst.copy_(src)
    layer.train(native.training)
    return layer


def _frozen_replacement(native: nn.Module, preset: str | None) -> BatchNorm:
    """unorm's frozen :class:`BatchNorm` computing what a torchvision-style
    ``FrozenBatchNorm2d`` computes: its buffers as fixed ``weight`` and ``bias``, its eps as
    stored (none before pytorch/vision#2169, i.e. 0)."""
    buffers = native._buffers
    weight, bias = buffers["weight"], buffers["bias"]
    assert weight is not None and bias is not None
    layer = BatchNorm(
        int(weight.shape[0]),
        4 if type(native).__name__.endswith("2d") else None,
        eps=float(getattr(native, "eps", 0.0)),
        preset=preset,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = buffers[name], getattr(layer, name)
            assert src is not None and dst is not None
            dst.copy_(src)
    for p in (layer.weight, layer.bias):
        assert p is not None
        p.requires_grad_(False)
    layer.frozen = True
    return layer


def convert(module: nn.Module, preset: str | None = "torch") -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by
    unorm's :class:`BatchNorm` / :class:`SyncBatchNorm`, keeping parameters, running
    statistics, ``requires_grad``, device, dtype and train/eval mode.

    A frozen BatchNorm in the style of torchvision's ``FrozenBatchNorm2d`` (buffers
    ``weight``, ``bias``, ``running_mean``, ``running_var`` and its ``eps``) becomes a frozen
    :class:`BatchNorm` (``SPEC.md`` section 8) with those values, ``weight`` and ``bias``
    fixed, computing the same numbers.

    ``preset="torch"`` (default) keeps the model computing exactly what it did;
    ``preset=None`` moves it to the canonical convention (non-finite guard on) with its
    own ``eps`` and ``momentum``. Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, it
    returns the converted module (a new object when ``module`` itself is a BatchNorm).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> type(convert(net)[1]).__name__
        'BatchNorm'
    """
    if isinstance(module, internals.NativeBatchNorm):
        return _replacement(module, preset)
    if is_frozen_native(module):
        return _frozen_replacement(module, preset)
    for name, child in list(module.named_children()):
        converted = convert(child, preset)
        if converted is not child:
            setattr(module, name, converted)
    return module

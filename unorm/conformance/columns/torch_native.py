"""The PyTorch native column: ``torch.nn.BatchNorm1d/2d/3d`` under the case's settings.

The layer gets the case's values as PyTorch's own arguments (``eps``, ``momentum``,
``affine``, ``track_running_stats``); what it cannot be told (the non-finite guard, the
variance estimator, ...) is PyTorch's, i.e. the ``torch`` preset's. A feature axis other
than 1 is handled the way a PyTorch user does it: move it to 1 and back. Departures are
labelled by the suite, never counted as failures of unorm.

Example:
    >>> from unorm.conformance.adapter import LayerConfig
    >>> create().native_spec(LayerConfig(3, 4, 1, "float32")).skip_nonfinite
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unorm.conformance.adapter import LayerConfig, SyncResult, Unsupported
from unorm.conformance.columns import torch as _torch
from unorm.spec import BatchNormSpec

__all__ = ["TorchNativeAdapter", "create"]


class TorchNativeAdapter(_torch.TorchBase):
    """``torch.nn.BatchNorm*d`` driven with native arguments."""

    name = "torch-native"
    native = True
    absent: frozenset[str] = frozenset()

    def native_spec(self, config: LayerConfig) -> BatchNormSpec:
        spec = config.spec()
        if spec.renorm:
            raise Unsupported("nn.BatchNorm*d has no Batch Renormalization (renorm=True)")
        if spec.virtual_batch_size is not None:
            raise Unsupported("nn.BatchNorm*d has no ghost batches (virtual_batch_size)")
        if spec.center and not spec.scale:
            raise Unsupported("nn.BatchNorm*d has no shift without a scale (affine, bias)")
        native = BatchNormSpec.from_native(
            "torch",
            eps=spec.eps,
            momentum=spec.momentum,
            affine=spec.scale,
            bias=spec.center or not spec.scale,
            track_running_stats=spec.track_running_stats,
        )
        return native.replace(axis=spec.axis)

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Any:
        spec = self.native_spec(config)
        nn = _torch.torch().nn
        if config.ndim > 5:
            raise Unsupported("nn.BatchNorm*d takes inputs of rank 2 to 5")
        cls = {4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(config.ndim, nn.BatchNorm1d)
        norm = cls(
            config.num_features,
            eps=spec.eps,
            momentum=spec.momentum,
            affine=spec.scale,
            bias=spec.center or not spec.scale,
            track_running_stats=spec.track_running_stats,
        )
        axis = config.axis % config.ndim if config.ndim >= 2 else 1
        module = norm if axis == 1 else _ChannelsFirst(norm, axis)
        return self.built(module, norm, config, gamma, beta)

    def sync_bn_step(
        self,
        config: LayerConfig,
        gamma: np.ndarray,
        beta: np.ndarray,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
        strategy: str = "replicas",
    ) -> SyncResult:
        # nn.SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"),
        # under DistributedDataParallel too.
        raise Unsupported("nn.SyncBatchNorm runs on GPU only; the suite runs on CPU")


def _ChannelsFirst(norm: Any, axis: int) -> Any:
    nn: Any = _torch.torch().nn

    class ChannelsFirst(nn.Module):
        """Moves the feature axis to 1 for the native layer, and back."""

        def __init__(self) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: Any) -> Any:
            return self.norm(x.movedim(axis, 1)).movedim(1, axis)

    return ChannelsFirst()


def create() -> TorchNativeAdapter:
    """The adapter the suite loads."""
    return TorchNativeAdapter()

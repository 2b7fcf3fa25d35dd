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

    #: The native fold (named when it raises).
    fold_tool = "torch.nn.utils.fusion.fuse_conv_bn_eval / fuse_linear_bn_eval"
    #: What ``torch.optim.swa_utils.update_bn`` does instead of the exact statistics.
    recalibrate_rule = (
        "torch.optim.swa_utils.update_bn averages the per-batch statistics (momentum=None: "
        "each batch weighs 1 whatever its size, and the spread of the batch means is left "
        "out, facebookresearch/pycls#93)"
    )

    def bn_freeze(self, layer: _torch.Built, trainable: bool) -> _torch.Built:
        """Frozen the way torchvision's ``FrozenBatchNorm2d`` is: the layer kept in eval
        mode whatever its model's mode (running statistics, no update); ``weight`` and
        ``bias`` fixed (``requires_grad=False``) unless ``trainable``."""
        for p in layer.norm.parameters():
            p.requires_grad_(trainable)
        return _torch.Built(_EvalAlways(layer.module), layer.norm, layer.dtype)

    def bn_recalibrate(self, layer: _torch.Built, batches: Sequence[np.ndarray]) -> Any:
        """``torch.optim.swa_utils.update_bn`` over the batches."""
        tensors = [_torch.to_tensor(b, layer.dtype) for b in batches]
        _torch.torch().optim.swa_utils.update_bn(tensors, layer.module)
        return self.bn_state(layer)

    def fold_eval(self, config: Any, inputs: Any) -> Any:
        """``torch.nn.utils.fusion.fuse_conv_bn_eval`` (``transpose=True`` for a
        transposed convolution) or ``fuse_linear_bn_eval`` on the producer and
        ``nn.BatchNorm*d`` in eval mode."""
        from unorm.conformance.after import FoldValues

        fusion = _torch.torch().nn.utils.fusion
        producer = _torch.build_producer(config, inputs).eval()
        norm = _torch.load_bn(_torch.native_norm(config), inputs).eval()
        if config.kind == "dense":
            fused, tool = fusion.fuse_linear_bn_eval(producer, norm), "fuse_linear_bn_eval"
        else:
            transpose = config.kind == "conv_transpose"
            fused = fusion.fuse_conv_bn_eval(producer, norm, transpose=transpose)
            tool = "fuse_conv_bn_eval" + ("(transpose=True)" if transpose else "")
        with _torch.torch().no_grad():
            y = fused(_torch.to_tensor(inputs.x))
        return FoldValues(_torch.to_numpy(y), 0, f"torch.nn.utils.fusion.{tool}")


def _EvalAlways(module: Any) -> Any:
    nn: Any = _torch.torch().nn

    class EvalAlways(nn.Module):
        """Keeps its BatchNorm in eval mode whatever mode it is put in (frozen)."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            self.inner.eval()
            return self

        def forward(self, x: Any) -> Any:
            return self.inner(x)

    return EvalAlways()


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

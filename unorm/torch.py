"""unorm for PyTorch: BatchNorm, cross-replica BatchNorm and AGC following ``SPEC.md``.

Imports PyTorch and nothing of the other frameworks.

- :class:`BatchNorm`: drop-in for ``nn.BatchNorm1d/2d/3d`` (same state-dict keys), with
  ``preset="torch"`` reproducing them exactly and the canonical convention by default.
- :class:`SyncBatchNorm`: the same over ``torch.distributed``, merging per-rank
  statistics exactly (uneven and empty ranks give the single-process result).
- :func:`convert`: swap a model's native BatchNorm layers for unorm's.
- :func:`fold`, :func:`recalibrate`, :func:`freeze`: BatchNorm after training (``SPEC.md``
  section 8): fold it into the layer before it, recompute its running statistics from
  data, or make it always normalise with them.
- :func:`adaptive_clip_grad_`, :class:`AGC`, :func:`final_classifier`,
  :func:`unit_axes_of`: Adaptive Gradient Clipping with output-unit axes taken from each
  parameter's layer.
- :class:`ScaledStdConv2d` (and 1d/3d): Scaled Weight Standardisation for
  normalizer-free networks.
- :func:`export_checkpoint`, :func:`load_checkpoint`: the framework-neutral checkpoint
  (:mod:`unorm.port`).

Example:
    >>> import torch
    >>> from unorm.torch import BatchNorm, AGC, final_classifier
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), BatchNorm(6, num_dims=2),
    ...                           torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> opt = AGC(torch.optim.SGD(net.parameters(), lr=0.1), net,
    ...           exclude=final_classifier(net))
    >>> net(torch.randn(8, 4)).pow(2).mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

from ._torch.accumulate import accumulate
from ._torch.after_training import FoldEntry, FoldError, FoldWarning, fold, freeze, recalibrate
from ._torch.agc import AGC, adaptive_clip_grad_, final_classifier, unit_axes_of
from ._torch.batchnorm import BatchNorm
from ._torch.convert import convert
from ._torch.port import export_checkpoint, load_checkpoint
from ._torch.sync import SyncBatchNorm
from ._torch.ws import ScaledStdConv1d, ScaledStdConv2d, ScaledStdConv3d

__all__ = [
    "AGC",
    "BatchNorm",
    "FoldEntry",
    "FoldError",
    "FoldWarning",
    "ScaledStdConv1d",
    "ScaledStdConv2d",
    "ScaledStdConv3d",
    "SyncBatchNorm",
    "accumulate",
    "adaptive_clip_grad_",
    "convert",
    "export_checkpoint",
    "final_classifier",
    "fold",
    "freeze",
    "load_checkpoint",
    "recalibrate",
    "unit_axes_of",
]

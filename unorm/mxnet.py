"""unorm for MXNet Gluon 1.9: BatchNorm and Adaptive Gradient Clipping with SPEC.md's meaning.

Importing this module registers the ``unorm_batchnorm`` operator, so import it before
loading an exported model (``SymbolBlock.imports``) that contains unorm layers.

- :class:`BatchNorm`: a Gluon ``HybridBlock``; running statistics are updated in the
  training forward pass (MXNet's CPU kernel updates them in backward), fed the unbiased
  variance, guarded against non-finite batches, computed accurately. ``preset="mxnet"``
  has ``gluon.nn.BatchNorm``'s semantics (update only when backward runs).
- :class:`SyncBatchNorm`: the cross-device form, with the exact count-weighted merge.
- :func:`adaptive_clip_grad` and :class:`AGC`: AGC of the effective gradient (after the
  all-reduce and after ``rescale_grad = 1/batch_size``), per output unit of each layer.
- :class:`ScaledStdConv2D` (and 1D/3D): ``gluon.nn.Conv2D`` (``Conv1D``, ``Conv3D``) with
  Scaled Weight Standardisation and a learnable gain; hybridizes and exports.
- :func:`final_classifier`: the classifier to exclude from AGC.
- :func:`convert`: replace the ``gluon.nn.BatchNorm`` layers of a model, keeping state.
- :func:`fold`, :func:`recalibrate`, :func:`freeze`: BatchNorm after training
  (``SPEC.md`` section 8): fold it into the layer before it, recompute its running
  statistics from data, or make it always normalise with them.

Example:
    >>> import mxnet as mx
    >>> from mxnet import autograd, gluon
    >>> from unorm.mxnet import AGC, BatchNorm, final_classifier
    >>> net = gluon.nn.HybridSequential()
    >>> net.add(gluon.nn.Dense(8, in_units=4), BatchNorm(8), gluon.nn.Dense(2, in_units=8))
    >>> net.initialize()
    >>> trainer = AGC(gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}),
    ...               net, exclude=[final_classifier(net)])
    >>> with autograd.record():
    ...     loss = net(mx.nd.ones((3, 4))).sum()
    >>> loss.backward()
    >>> trainer.step(batch_size=3)
"""

from __future__ import annotations

from ._core.after_training import FoldEntry, FoldError, FoldWarning
from ._mxnet.accumulate import accumulate
from ._mxnet.after_training import fold, freeze, recalibrate
from ._mxnet.agc import AGC, adaptive_clip_grad, final_classifier, unit_axes_of
from ._mxnet.batchnorm import BatchNorm, SyncBatchNorm
from ._mxnet.convert import convert
from ._mxnet.port import export_checkpoint, load_checkpoint
from ._mxnet.ws import ScaledStdConv1D, ScaledStdConv2D, ScaledStdConv3D

__all__ = [
    "AGC",
    "BatchNorm",
    "FoldEntry",
    "FoldError",
    "FoldWarning",
    "ScaledStdConv1D",
    "ScaledStdConv2D",
    "ScaledStdConv3D",
    "SyncBatchNorm",
    "accumulate",
    "adaptive_clip_grad",
    "convert",
    "export_checkpoint",
    "final_classifier",
    "fold",
    "freeze",
    "load_checkpoint",
    "recalibrate",
    "unit_axes_of",
]

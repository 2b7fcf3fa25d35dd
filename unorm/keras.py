"""unorm for Keras 3: BatchNorm, cross-replica BatchNorm and AGC following ``SPEC.md``.

Imports Keras (and TensorFlow where the TensorFlow backend needs it), nothing of the other
frameworks. The layer and the optimizer are written with ``keras.ops``; cross-replica
statistics (``synchronized=True``) and ``update_on="backward"`` need the TensorFlow
backend, everything else also runs on the JAX and torch backends.

- :class:`BatchNorm`: drop-in for ``keras.layers.BatchNormalization`` (same weight names),
  canonical settings by default, ``preset="keras"`` reproducing Keras's layer exactly,
  ``synchronized=True`` for exact cross-replica statistics under ``tf.distribute``.
- :class:`ScaledStdConv2D` (and 1D/3D): ``keras.layers.Conv2D`` (``Conv1D``, ``Conv3D``)
  with Scaled Weight Standardisation and a learnable gain, for normalizer-free networks.
- :func:`convert`: a copy of a model with its BatchNormalization layers swapped for
  unorm's, weights carried over.
- :func:`fold`, :func:`recalibrate`, :func:`freeze`: BatchNorm after training (``SPEC.md``
  section 8): fold it into the layer before it, recompute its moving statistics from
  data, or make it always normalise with them.
- :class:`AGC`, :func:`adaptive_clip_grad`, :func:`final_classifier`,
  :func:`unit_axes_of`: Adaptive Gradient Clipping as a Keras optimizer wrapper and as a
  function, with output-unit axes read from each variable's layer.

Example:
    >>> import keras
    >>> from unorm.keras import AGC, BatchNorm, final_classifier
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), BatchNorm(),
    ...                           keras.layers.ReLU(), keras.layers.Dense(2)])
    >>> opt = AGC(keras.optimizers.SGD(0.1), model, exclude=final_classifier(model))
    >>> model.compile(optimizer=opt, loss="mse")
"""

from __future__ import annotations

from ._core.after_training import FoldEntry, FoldError, FoldWarning
from ._keras.accumulate import accumulate
from ._keras.after_training import fold, freeze, recalibrate
from ._keras.agc import AGC, adaptive_clip_grad
from ._keras.batchnorm import BatchNorm
from ._keras.convert import convert
from ._keras.layout import final_classifier, unit_axes_of
from ._keras.port import export_checkpoint, load_checkpoint
from ._keras.ws import ScaledStdConv1D, ScaledStdConv2D, ScaledStdConv3D

__all__ = [
    "AGC",
    "BatchNorm",
    "FoldEntry",
    "FoldError",
    "FoldWarning",
    "ScaledStdConv1D",
    "ScaledStdConv2D",
    "ScaledStdConv3D",
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

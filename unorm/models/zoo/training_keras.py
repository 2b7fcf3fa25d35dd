"""One training step and eval-mode logits for a zoo model in Keras 3.

Both take channels-first NumPy images, as every framework's zoo helpers do, and
transpose them to the channels-last layout the models are built for.

Example:
    >>> import keras
    >>> from unorm.models.zoo.data import batch
    >>> net = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3),
    ...                         keras.layers.BatchNormalization(), keras.layers.Flatten(),
    ...                         keras.layers.Dense(10)])
    >>> x, y = batch(0, image_size=8)
    >>> loss = train_step(net, x, y)
    >>> evaluate(net, x).shape
    (4, 10)
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ...keras import recalibrate as _recalibrate

__all__ = ["evaluate", "recalibrate", "train_step"]


def _channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def train_step(model: Any, x: np.ndarray, y: np.ndarray, lr: float = 0.01) -> float:
    """One plain SGD step (learning rate ``lr``) on the mean softmax cross-entropy of
    ``model``'s logits for channels-first images ``x`` and int labels ``y``, in training
    mode; returns the loss before the update. The model is compiled for it (eagerly:
    one step is not worth tracing a graph of a ResNet-50), replacing any earlier
    compilation with another learning rate."""
    if getattr(model, "_unorm_zoo_lr", None) != lr:
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=lr),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=True,
        )
        model._unorm_zoo_lr = lr
    return float(model.train_on_batch(_channels_last(x), y))


def evaluate(model: Any, x: np.ndarray) -> np.ndarray:
    """``model``'s inference-mode logits for channels-first images ``x``, as NumPy."""
    logits: np.ndarray = np.asarray(model(_channels_last(x), training=False))
    return logits


def recalibrate(model: Any, x: np.ndarray) -> None:
    """Set every BatchNorm's moving statistics to the exact statistics of its input on
    channels-first images ``x`` (:func:`unorm.keras.recalibrate`), so that a few training
    steps start from statistics a model of the data would have, not 0 and 1."""
    _recalibrate(model, [_channels_last(x)])

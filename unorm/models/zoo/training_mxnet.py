"""One training step and eval-mode logits for a zoo model in MXNet Gluon.

Both take channels-first NumPy images, as every framework's zoo helpers do.

Example:
    >>> from mxnet import gluon
    >>> from unorm.models.zoo.data import batch
    >>> net = gluon.nn.HybridSequential()
    >>> net.add(gluon.nn.Conv2D(2, 3), gluon.nn.BatchNorm(), gluon.nn.Dense(10))
    >>> net.initialize()
    >>> x, y = batch(0, image_size=8)
    >>> loss = train_step(net, x, y)
    >>> evaluate(net, x).shape
    (4, 10)
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from ...mxnet import recalibrate as _recalibrate

__all__ = ["evaluate", "recalibrate", "train_step"]


def train_step(model: Any, x: np.ndarray, y: np.ndarray, lr: float = 0.01) -> float:
    """One plain SGD step (learning rate ``lr``) on the mean softmax cross-entropy of
    ``model``'s logits for channels-first images ``x`` and int labels ``y``, in training
    mode (``autograd.record``); returns the loss before the update."""
    params = {name: p for name, p in model.collect_params().items() if p.grad_req != "null"}
    trainer = gluon.Trainer(params, "sgd", {"learning_rate": lr, "wd": 0.0, "momentum": 0.0})
    images = mx.nd.array(x, dtype="float32")
    labels = mx.nd.array(y, dtype="float32")
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(model(images), labels).mean()
    loss.backward()
    # The loss is already the batch mean: step(1) applies its gradient unscaled, as
    # PyTorch's and Keras's SGD apply the gradient of their mean loss.
    trainer.step(1)
    return float(loss.asscalar())


def evaluate(model: Any, x: np.ndarray) -> np.ndarray:
    """``model``'s inference-mode logits for channels-first images ``x``, as NumPy."""
    with autograd.predict_mode():
        logits: np.ndarray = model(mx.nd.array(x, dtype="float32")).asnumpy()
    return logits


def recalibrate(model: Any, x: np.ndarray) -> None:
    """Set every BatchNorm's running statistics to the exact statistics of its input on
    channels-first images ``x`` (:func:`unorm.mxnet.recalibrate`), so that a few training
    steps start from statistics a model of the data would have, not 0 and 1."""
    _recalibrate(model, [mx.nd.array(x, dtype="float32")])

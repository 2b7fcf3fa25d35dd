"""The seed networks in MXNet Gluon 1.9, built with unorm's layers (channels-first inputs).

The same networks as :mod:`unorm.models.torch`, layer for layer and in the same layouts,
so a checkpoint exported from one loads into the other (:mod:`unorm._mxnet.port`).
Every layer is given its input size, so parameters have their shapes (and values) as soon
as the network is built, before the first call.

Example:
    >>> import mxnet as mx
    >>> net = MODELS["lenet_bn"][0]()
    >>> net(mx.nd.zeros((2, 1, 28, 28))).shape
    (2, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from ..mxnet import AGC, BatchNorm, ScaledStdConv2D, final_classifier
from ..progress import ProgressBar
from .nf import SIGMOID_GAMMA
from .training import Recipe, batch_indices

__all__ = [
    "MODELS",
    "ScaledSigmoid",
    "lenet",
    "lenet_bn",
    "lenet_nf",
    "predict",
    "seed",
    "train",
]


def lenet_bn(preset: str | None = None) -> Any:
    """LeNet with BatchNorm after every Conv and hidden Dense (``unorm.models``), as an
    initialised ``gluon.nn.HybridSequential`` on channels-first ``(N, 1, 28, 28)`` inputs,
    10 logits. ``preset`` configures every BatchNorm (None: canonical).

    Example:
        >>> net = lenet_bn()
        >>> [type(block).__name__ for block in net][:4]
        ['Conv2D', 'BatchNorm', 'Activation', 'MaxPool2D']
        >>> net[1].spec.eps, lenet_bn("mxnet")[1].spec.preset
        (1e-05, 'mxnet')
    """
    nn = gluon.nn
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(
            nn.Conv2D(6, kernel_size=5, in_channels=1),
            BatchNorm(6, num_dims=4, preset=preset),
            nn.Activation("sigmoid"),
            nn.MaxPool2D(pool_size=2, strides=2),
            nn.Conv2D(16, kernel_size=5, in_channels=6),
            BatchNorm(16, num_dims=4, preset=preset),
            nn.Activation("sigmoid"),
            nn.MaxPool2D(pool_size=2, strides=2),
            nn.Flatten(),
            nn.Dense(120, in_units=256),
            BatchNorm(120, num_dims=2, preset=preset),
            nn.Activation("sigmoid"),
            nn.Dense(84, in_units=120),
            BatchNorm(84, num_dims=2, preset=preset),
            nn.Activation("sigmoid"),
            nn.Dense(10, in_units=84),
        )
    net.initialize()
    return net


def lenet() -> Any:
    """LeNet without any normalisation (the BatchNorm layers of :func:`lenet_bn` removed),
    initialised."""
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        for block in lenet_bn()._children.values():
            if not isinstance(block, BatchNorm):
                net.add(block)
    return net


class ScaledSigmoid(gluon.HybridBlock):  # type: ignore[misc]
    """``gamma * sigmoid(x)`` with ``gamma = 1 / std(sigmoid(z))``, ``z ~ N(0, 1)``
    (:data:`unorm.models.nf.SIGMOID_GAMMA`): keeps unit-variance signals at unit variance."""

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return F.sigmoid(x) * SIGMOID_GAMMA


def lenet_nf(style: str = "deepmind") -> Any:
    """Normalizer-free LeNet, as in :mod:`unorm.models.torch`: no BatchNorm, Scaled WS
    convolutions (``style``), scaled sigmoids; train it with AGC. Initialised.

    Example:
        >>> net = lenet_nf()
        >>> net(mx.nd.zeros((2, 1, 28, 28))).shape
        (2, 10)
    """
    nn = gluon.nn
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(
            ScaledStdConv2D(6, 5, in_channels=1, style=style),
            ScaledSigmoid(),
            nn.MaxPool2D(pool_size=2, strides=2),
            ScaledStdConv2D(16, 5, in_channels=6, style=style),
            ScaledSigmoid(),
            nn.MaxPool2D(pool_size=2, strides=2),
            nn.Flatten(),
            nn.Dense(120, in_units=256),
            ScaledSigmoid(),
            nn.Dense(84, in_units=120),
            ScaledSigmoid(),
            nn.Dense(10, in_units=84),
        )
    net.initialize()
    return net


def seed(n: int) -> None:
    """Seed MXNet's generator and NumPy's, which draw a fresh network's initial weights."""
    mx.random.seed(n)
    np.random.seed(n)


#: The seed networks by name, with the shape of one input (without the batch axis).
MODELS: dict[str, tuple[Callable[..., Any], tuple[int, ...]]] = {
    "lenet_bn": (lenet_bn, (1, 28, 28))
}


def _trainer(net: Any, recipe: Recipe) -> Any:
    """Plain SGD, optionally wrapped in AGC with the final classifier left unclipped."""
    sgd = gluon.Trainer(
        net.collect_params(),
        "sgd",
        {"learning_rate": recipe.lr, "momentum": 0.0, "wd": 0.0},
        update_on_kvstore=False,  # AGC clips between the all-reduce and the update
    )
    if not recipe.agc:
        return sgd
    return AGC(sgd, net, clipping=recipe.clipping, exclude=[final_classifier(net)])


def train(
    net: Any, x: np.ndarray, y: np.ndarray, recipe: Recipe, progress: ProgressBar | None = None
) -> list[float]:
    """Train ``net`` on ``(x, y)`` (channels-first float32 images, int labels) with
    ``recipe``; return the loss of every step (the mean cross-entropy, before that step's
    update)."""
    trainer = _trainer(net, recipe)
    cross_entropy = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    batches = batch_indices(len(y), recipe.batch_size, recipe.steps, recipe.seed)
    for step, idx in enumerate(batches):
        images = mx.nd.array(x[idx], dtype="float32")
        labels = mx.nd.array(y[idx], dtype="float32")
        with autograd.record():
            loss = cross_entropy(net(images), labels).mean()
        loss.backward()
        # The loss is already the batch mean: step(1) applies its gradient unscaled
        # (rescale_grad = 1), as PyTorch's SGD applies the gradient of its mean loss.
        trainer.step(1)
        losses.append(float(loss.asscalar()))
        if progress is not None:
            progress.update(step + 1, f"mxnet: loss {losses[-1]:.4f}")
    return losses


def predict(net: Any, x: np.ndarray) -> np.ndarray:
    """Inference-mode logits of ``net`` for channels-first images ``x``."""
    with autograd.predict_mode():
        logits: np.ndarray = net(mx.nd.array(x, dtype="float32")).asnumpy()
    return logits

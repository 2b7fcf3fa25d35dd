"""The seed networks in Keras 3, built with unorm's layers (channels-last inputs).

The same networks as :mod:`unorm.models.torch`, layer for layer, so that a checkpoint
exported from one loads into the other (:func:`unorm.keras.load_checkpoint`).

A model saved by Keras itself loads back into these networks the usual way, then goes
on to the neutral checkpoint::

    model = keras.saving.load_model("lenet.keras")  # import unorm.keras first
    # or: model = lenet_bn(); model.load_weights("lenet.weights.h5")
    unorm.port.save(unorm.keras.export_checkpoint(model), "lenet.safetensors")

Example:
    >>> import numpy as np
    >>> net = MODELS["lenet_bn"][0]()
    >>> tuple(net(np.zeros((2, 28, 28, 1), "float32")).shape)
    (2, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from ..keras import AGC, BatchNorm, ScaledStdConv2D, final_classifier
from ..progress import ProgressBar
from .nf import SIGMOID_GAMMA
from .training import Recipe, batch_indices

__all__ = ["MODELS", "lenet", "lenet_bn", "lenet_nf", "predict", "seed", "train"]


def lenet_bn(preset: str | None = None) -> Any:
    """LeNet with BatchNorm after every Conv and hidden Dense (``unorm.models``), as a
    ``keras.Sequential`` on channels-last ``(28, 28, 1)`` inputs, 10 logits.

    ``preset`` configures every BatchNorm (None: canonical). Layers have fixed names
    (``conv1``, ``bn1``, ..., ``fc3``), so checkpoints and messages read the same from
    one build to the next.

    Example:
        >>> net = lenet_bn()
        >>> [layer.name for layer in net.layers if layer.weights][:3]
        ['conv1', 'bn1', 'conv2']
        >>> net.get_layer("bn1").spec.eps, lenet_bn("keras").get_layer("bn1").spec.eps
        (1e-05, 0.001)
    """
    layers = keras.layers

    def block(index: int) -> list[Any]:
        # BatchNorm on the last (channels) axis, then the sigmoid, as in the torch model.
        return [
            BatchNorm(preset=preset, name=f"bn{index}"),
            layers.Activation("sigmoid", name=f"sigmoid{index}"),
        ]

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(6, 5, name="conv1"),
            *block(1),
            layers.MaxPooling2D(pool_size=2, strides=2, name="pool1"),
            layers.Conv2D(16, 5, name="conv2"),
            *block(2),
            layers.MaxPooling2D(pool_size=2, strides=2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(120, name="fc1"),
            *block(3),
            layers.Dense(84, name="fc2"),
            *block(4),
            layers.Dense(10, name="fc3"),
        ],
        name="lenet_bn",
    )


def seed(n: int) -> None:
    """Seed Keras's generators (Python's, NumPy's and the backend's), which draw a fresh
    network's initial weights."""
    keras.utils.set_random_seed(n)


#: The seed networks by name, with the shape of one input (without the batch axis).
MODELS: dict[str, tuple[Callable[..., Any], tuple[int, ...]]] = {
    "lenet_bn": (lenet_bn, (28, 28, 1))
}


def train(
    net: Any, x: np.ndarray, y: np.ndarray, recipe: Recipe, progress: ProgressBar | None = None
) -> list[float]:
    """Train ``net`` on ``(x, y)`` (channels-first images, as every framework's ``train``
    takes them; transposed here) with ``recipe``; return each step's loss before its
    update. A compiled ``train_on_batch`` keeps each step one graph call."""
    inner = keras.optimizers.SGD(learning_rate=recipe.lr)
    optimizer = (
        AGC(inner, net, clipping=recipe.clipping, exclude=final_classifier(net))
        if recipe.agc
        else inner
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    net.compile(optimizer=optimizer, loss=loss)
    images = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    losses = []
    batches = batch_indices(len(y), recipe.batch_size, recipe.steps, recipe.seed)
    for step, idx in enumerate(batches):
        losses.append(float(net.train_on_batch(images[idx], y[idx])))
        if progress is not None:
            progress.update(step + 1, f"keras: loss {losses[-1]:.4f}")
    return losses


def predict(net: Any, x: np.ndarray) -> np.ndarray:
    """Inference-mode logits of ``net`` for channels-first images ``x``."""
    images = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    logits: np.ndarray = np.asarray(net(images, training=False))
    return logits


def lenet() -> Any:
    """LeNet without any normalisation (the BatchNorm layers of :func:`lenet_bn` removed),
    the same layer names otherwise.

    Example:
        >>> [layer.name for layer in lenet().layers if layer.weights]
        ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
    """
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(6, 5, name="conv1"),
            layers.Activation("sigmoid", name="sigmoid1"),
            layers.MaxPooling2D(pool_size=2, strides=2, name="pool1"),
            layers.Conv2D(16, 5, name="conv2"),
            layers.Activation("sigmoid", name="sigmoid2"),
            layers.MaxPooling2D(pool_size=2, strides=2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(120, name="fc1"),
            layers.Activation("sigmoid", name="sigmoid3"),
            layers.Dense(84, name="fc2"),
            layers.Activation("sigmoid", name="sigmoid4"),
            layers.Dense(10, name="fc3"),
        ],
        name="lenet",
    )


def lenet_nf(style: str = "deepmind") -> Any:
    """Normalizer-free LeNet, as :func:`unorm.models.torch.lenet_nf`: no BatchNorm, Scaled
    WS convolutions (``style``), sigmoids scaled by :data:`~unorm.models.nf.SIGMOID_GAMMA`
    to keep unit variance, plain Dense layers; train it with AGC (the final classifier
    excluded), as :func:`train` does.

    Example:
        >>> net = lenet_nf()
        >>> [layer.name for layer in net.layers if layer.weights]
        ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
        >>> [w.name for w in net.get_layer("conv1").weights]
        ['kernel', 'bias', 'gain']
    """
    layers = keras.layers

    def act(index: int) -> list[Any]:
        # gamma * sigmoid(x) from two built-in layers: serialisable without custom code.
        return [
            layers.Activation("sigmoid", name=f"sigmoid{index}"),
            layers.Rescaling(SIGMOID_GAMMA, name=f"gamma{index}"),
        ]

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            ScaledStdConv2D(6, 5, style=style, name="conv1"),
            *act(1),
            layers.MaxPooling2D(pool_size=2, strides=2, name="pool1"),
            ScaledStdConv2D(16, 5, style=style, name="conv2"),
            *act(2),
            layers.MaxPooling2D(pool_size=2, strides=2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(120, name="fc1"),
            *act(3),
            layers.Dense(84, name="fc2"),
            *act(4),
            layers.Dense(10, name="fc3"),
        ],
        name="lenet_nf",
    )

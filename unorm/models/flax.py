"""The seed networks in Flax NNX, built with unorm's layers.

Channels-last inside (Flax's convolutions); :func:`train` and :func:`predict` take the
suite's channels-first images and transpose them, so the recipe and data are the other
frameworks'.

Example:
    >>> import jax.numpy as jnp
    >>> net = lenet_bn()
    >>> net(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..flax import BatchNorm, ScaledStdConv, agc, final_classifier
from ..progress import ProgressBar
from .nf import SIGMOID_GAMMA
from .training import Recipe, batch_indices

__all__ = ["MODELS", "lenet", "lenet_bn", "lenet_nf", "predict", "seed", "train"]

_SEED = [0]


def seed(n: int) -> None:
    """Seed the generator that draws a fresh network's initial weights (``nnx.Rngs``)."""
    _SEED[0] = n


def _pool(x: jax.Array) -> jax.Array:
    pooled: jax.Array = nnx.max_pool(x, (2, 2), strides=(2, 2))  # type: ignore[no-untyped-call]
    return pooled


class LeNet(nnx.Module):
    """LeNet (``unorm.models``) on 28x28x1 channels-last inputs, 10 logits; with a
    BatchNorm after every Conv and hidden Linear (``norm``), or normalizer-free (Scaled
    WS convolutions, scaled sigmoids: ``nf``), or neither."""

    def __init__(self, kind: str, preset: str | None, style: str, rngs: nnx.Rngs) -> None:
        self.kind = kind
        if kind == "nf":
            self.conv1: nnx.Conv = ScaledStdConv(1, 6, (5, 5), padding="VALID", style=style,
                                                 rngs=rngs)  # fmt: skip
            self.conv2: nnx.Conv = ScaledStdConv(6, 16, (5, 5), padding="VALID", style=style,
                                                 rngs=rngs)  # fmt: skip
        else:
            self.conv1 = nnx.Conv(1, 6, (5, 5), padding="VALID", rngs=rngs)
            self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(256, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, 10, rngs=rngs)
        norms = (6, 16, 120, 84) if kind == "norm" else ()
        self.norms = nnx.List([BatchNorm(n, preset=preset) for n in norms])

    def _act(self, x: jax.Array, i: int) -> jax.Array:
        if self.kind == "norm":
            x = self.norms[i](x)
        y = jax.nn.sigmoid(x)
        return y * SIGMOID_GAMMA if self.kind == "nf" else y

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of channels-last images ``x`` ``(N, 28, 28, 1)``."""
        x = _pool(self._act(self.conv1(x), 0))
        x = _pool(self._act(self.conv2(x), 1))
        # Flatten channels-first, as the other frameworks' LeNet does (ported weights).
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = self._act(self.fc1(x), 2)
        x = self._act(self.fc2(x), 3)
        return self.fc3(x)


def lenet_bn(preset: str | None = None) -> LeNet:
    """LeNet with BatchNorm after every Conv and hidden Linear; ``preset`` configures
    every BatchNorm (None: canonical)."""
    return LeNet("norm", preset, "deepmind", nnx.Rngs(_SEED[0]))


def lenet() -> LeNet:
    """LeNet without any normalisation."""
    return LeNet("plain", None, "deepmind", nnx.Rngs(_SEED[0]))


def lenet_nf(style: str = "deepmind") -> LeNet:
    """Normalizer-free LeNet: Scaled WS convolutions (``style``) and scaled sigmoids; train
    it with AGC (the final classifier excluded)."""
    return LeNet("nf", None, style, nnx.Rngs(_SEED[0]))


#: The seed networks by name, with the shape of one input in Flax's channels-last layout
#: (without the batch axis), as :func:`unorm._flax.port.export_model` takes it.
MODELS = {"lenet_bn": (lenet_bn, (28, 28, 1))}


def _nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def train(
    net: LeNet,
    x: np.ndarray,
    y: np.ndarray,
    recipe: Recipe,
    progress: ProgressBar | None = None,
) -> list[float]:
    """Train ``net`` on ``(x, y)`` (channels-first images, int labels) with ``recipe``
    (SGD, AGC first in the chain with the final classifier excluded); return the loss of
    every step (before that step's update)."""
    parts: list[Any] = []
    if recipe.agc:
        parts.append(agc(net, clipping=recipe.clipping, exclude=final_classifier(net)))
    tx = optax.chain(*parts, optax.sgd(recipe.lr))
    opt = nnx.Optimizer(net, tx, wrt=nnx.Param)
    net.train()  # type: ignore[no-untyped-call]

    @nnx.jit
    def step(model: LeNet, o: Any, xb: jax.Array, yb: jax.Array) -> Any:
        def loss_fn(m: LeNet) -> Any:
            logits = m(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        o.update(model, grads)
        return loss

    losses = []
    for i, idx in enumerate(batch_indices(len(y), recipe.batch_size, recipe.steps, recipe.seed)):
        losses.append(float(step(net, opt, _nhwc(x[idx]), jnp.asarray(y[idx]))))
        if progress is not None:
            progress.update(i + 1, f"flax: loss {losses[-1]:.4f}")
    return losses


def predict(net: LeNet, x: np.ndarray) -> np.ndarray:
    """Eval-mode logits of ``net`` for channels-first images ``x``."""
    net.eval()  # type: ignore[no-untyped-call]
    return np.asarray(net(_nhwc(x)))

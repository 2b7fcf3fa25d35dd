"""The seed networks in PyTorch, built with unorm's layers.

Example:
    >>> import torch
    >>> net = lenet_bn()
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._torch.ws import ScaledStdConv2d
from ..progress import ProgressBar
from ..torch import AGC, BatchNorm, final_classifier
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


def lenet_bn(preset: str | None = None) -> nn.Sequential:
    """LeNet with BatchNorm after every Conv and hidden Dense (``unorm.models``), 1x28x28
    inputs, 10 logits. ``preset`` configures every BatchNorm (None: canonical)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5),
        BatchNorm(6, num_dims=4, preset=preset),
        nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        BatchNorm(16, num_dims=4, preset=preset),
        nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(256, 120),
        BatchNorm(120, num_dims=2, preset=preset),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        BatchNorm(84, num_dims=2, preset=preset),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def lenet() -> nn.Sequential:
    """LeNet without any normalisation (the BatchNorm layers of :func:`lenet_bn` removed)."""
    return nn.Sequential(*[m for m in lenet_bn() if not isinstance(m, BatchNorm)])


class ScaledSigmoid(nn.Module):
    """``gamma * sigmoid(x)``, with ``gamma = 1 / std(sigmoid(z))`` for ``z ~ N(0, 1)``
    (:data:`unorm.models.nf.SIGMOID_GAMMA`): keeps unit-variance signals at unit variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * SIGMOID_GAMMA


def lenet_nf(style: str = "deepmind") -> nn.Sequential:
    """Normalizer-free LeNet: no BatchNorm, Scaled WS convolutions (``style``), scaled
    sigmoids; train it with AGC (the final classifier excluded)."""
    return nn.Sequential(
        ScaledStdConv2d(1, 6, kernel_size=5, style=style),
        ScaledSigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        ScaledStdConv2d(6, 16, kernel_size=5, style=style),
        ScaledSigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(256, 120),
        ScaledSigmoid(),
        nn.Linear(120, 84),
        ScaledSigmoid(),
        nn.Linear(84, 10),
    )


def seed(n: int) -> None:
    """Seed PyTorch's generator, which draws a fresh network's initial weights."""
    torch.manual_seed(n)


#: The seed networks by name, with the shape of one input (without the batch axis).
MODELS = {"lenet_bn": (lenet_bn, (1, 28, 28))}


def train(
    net: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    recipe: Recipe,
    progress: ProgressBar | None = None,
) -> list[float]:
    """Train ``net`` on ``(x, y)`` (channels-first images, int labels) with ``recipe``;
    return the loss of every step (before that step's update)."""
    inner = torch.optim.SGD(net.parameters(), lr=recipe.lr)
    opt: torch.optim.Optimizer = (
        AGC(inner, net, clipping=recipe.clipping, exclude=final_classifier(net))
        if recipe.agc
        else inner
    )
    net.train()
    losses = []
    batches = batch_indices(len(y), recipe.batch_size, recipe.steps, recipe.seed)
    for step, idx in enumerate(batches):
        opt.zero_grad()
        loss = F.cross_entropy(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(step + 1, f"torch: loss {losses[-1]:.4f}")
    return losses


def predict(net: nn.Module, x: np.ndarray) -> np.ndarray:
    """Eval-mode logits of ``net`` for channels-first images ``x``."""
    net.eval()
    with torch.no_grad():
        logits: np.ndarray = net(torch.from_numpy(x)).numpy()
    return logits

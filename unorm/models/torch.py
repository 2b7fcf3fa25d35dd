"""The seed networks in PyTorch, built with unorm's layers.

Example:
    >>> import torch
    >>> net = lenet_bn()
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from torch import nn

from ..torch import BatchNorm

__all__ = ["MODELS", "lenet_bn"]


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


#: The seed networks by name, with the shape of one input (without the batch axis).
MODELS = {"lenet_bn": (lenet_bn, (1, 28, 28))}

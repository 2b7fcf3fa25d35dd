"""``keras.applications.ResNet50`` in PyTorch, layer for layer, with unorm's BatchNorm (the
zoo's counterpart of :func:`unorm.models.zoo.sources_keras.keras_resnet50`).

The modules carry Keras's layer names (``conv1_pad``, ``conv2_block1_0_conv``,
``predictions``...) and are registered in the order Keras creates the layers (a block's
projection shortcut ``_0`` first), so ports and messages read the same on both sides;
:mod:`unorm.models.zoo.resnet_plans` lists what they compute. Keras's v1 ResNet differs
from ``transformers``' in the places a port must keep: biased convolutions, the stride in
the first 1x1 convolution of a block, zero padding (``ZeroPadding2D``) before the stem and
before the max pooling, ``"SAME"`` only at stride 1 (symmetric for a 3x3 kernel). Every
BatchNorm is :class:`unorm.torch.BatchNorm` with ``preset="keras"``, eps 1.001e-5 and
momentum ``1 - 0.99`` (Keras's 0.99 weighs the old value), so a freshly built model
already trains as the source does (the biased variance fed to the moving variance), and a
loaded one takes the source's settings from the checkpoint.

Example:
    >>> import torch
    >>> net = keras_resnet50(num_labels=10, image_size=64)
    >>> net(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 10])
    >>> net.conv1_bn.spec.preset, net.conv1_bn.spec.eps
    ('keras', 1.001e-05)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...torch import BatchNorm
from .resnet_plans import (
    KERAS_RESNET_EPS,
    KERAS_RESNET_MOMENTUM,
    KerasBlock,
    KerasConv,
    keras_resnet50_plan,
)

__all__ = ["KerasResNet50", "keras_resnet50"]


def _batchnorm(channels: int) -> BatchNorm:
    return BatchNorm(
        channels, num_dims=4, preset="keras", eps=KERAS_RESNET_EPS, momentum=KERAS_RESNET_MOMENTUM
    )


class KerasResNet50(nn.Module):
    """``keras.applications.ResNet50(weights=None, classifier_activation=None)`` on
    channels-first ``(N, 3, H, W)`` images: every Keras layer with weights (and the
    padding, pooling and activations) as a module of the same name, ``forward`` returning
    the logits.

    Example:
        >>> net = KerasResNet50(num_labels=3)
        >>> net.conv2_block1_1_conv.stride, net.conv2_block1_2_conv.padding
        ((1, 1), (1, 1))
    """

    def __init__(self, num_labels: int = 10) -> None:
        super().__init__()
        self._plan = keras_resnet50_plan()
        stem = self._plan.stem
        self.conv1_pad = nn.ZeroPad2d(stem.padding)
        self.conv1_conv = nn.Conv2d(
            stem.in_channels, stem.out_channels, stem.kernel, stride=stem.stride, bias=True
        )
        self.conv1_bn = _batchnorm(stem.out_channels)
        self.conv1_relu = nn.ReLU()
        self.pool1_pad = nn.ZeroPad2d(1)
        self.pool1_pool = nn.MaxPool2d(3, stride=2)
        for stack in self._plan.stacks:
            for block in stack.blocks:
                self._add_block(block)
        self.predictions = nn.Linear(self._plan.features, num_labels)

    def _add_conv(self, conv: KerasConv) -> None:
        self.add_module(
            conv.name,
            nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel,
                stride=conv.stride,
                padding=conv.padding,
                bias=True,
            ),
        )
        self.add_module(conv.bn_name, _batchnorm(conv.out_channels))
        if conv.activation:
            self.add_module(conv.relu_name, nn.ReLU())

    def _add_block(self, block: KerasBlock) -> None:
        # residual_block_v1 creates the projection shortcut before the main path.
        if block.shortcut is not None:
            self._add_conv(block.shortcut)
        for conv in block.convs:
            self._add_conv(conv)
        self.add_module(f"{block.name}_out", nn.ReLU())

    def _conv(self, x: torch.Tensor, conv: KerasConv) -> torch.Tensor:
        x = getattr(self, conv.bn_name)(getattr(self, conv.name)(x))
        return getattr(self, conv.relu_name)(x) if conv.activation else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of channels-first images ``x``."""
        x = self.conv1_relu(self.conv1_bn(self.conv1_conv(self.conv1_pad(x))))
        # Zeros, not -inf, before the max pooling, as Keras pads (the same maximum after
        # the ReLU).
        x = self.pool1_pool(self.pool1_pad(x))
        for stack in self._plan.stacks:
            for block in stack.blocks:
                shortcut = x if block.shortcut is None else self._conv(x, block.shortcut)
                for conv in block.convs:
                    x = self._conv(x, conv)
                x = getattr(self, f"{block.name}_out")(shortcut + x)  # Add([shortcut, x])
        x = x.mean(dim=(2, 3))  # GlobalAveragePooling2D ("avg_pool")
        out: torch.Tensor = self.predictions(x)
        return out


def keras_resnet50(num_labels: int = 10, image_size: int = 64) -> Any:
    """``keras.applications.ResNet50`` as :class:`KerasResNet50` for ``(N, 3,
    image_size, image_size)`` images, ``num_labels`` logits (defaults: the zoo's 10 and
    64; the network takes any size of at least 32, as Keras's does).

    Example:
        >>> sum(isinstance(m, BatchNorm) for m in keras_resnet50().modules())
        53
    """
    del image_size  # nothing in the network depends on it
    return KerasResNet50(num_labels)

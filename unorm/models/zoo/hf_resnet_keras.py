"""``transformers``' ResNet-18 and ResNet-50 in Keras 3, layer for layer, with unorm's
BatchNorm (the zoo's counterparts of :mod:`unorm.models.zoo.sources_torch`).

Each builder returns a functional ``keras.Model`` on channels-last ``(image_size,
image_size, 3)`` images that computes ``ResNetForImageClassification``'s logits
(:mod:`unorm.models.zoo.resnet_plans` lists what that is). Every layer is named by the
path of the source's module it stands for (``resnet.encoder.stages.1.layers.0.shortcut
.convolution``), so messages and ``mapping=`` read the same on both sides; the layers the
source has no module for are named after the module they pad or follow
(``....padding``, ``....add``). PyTorch pads symmetrically, TensorFlow's ``"same"`` does
not at stride 2, so every convolution here is ``"valid"`` after an explicit
``ZeroPadding2D`` of the source's ``kernel // 2``. Every BatchNorm is
:class:`unorm.keras.BatchNorm` with ``preset="torch"`` and the source's eps 1e-5 and
momentum 0.1, so a freshly built model already trains as the source does, and a loaded
one takes the source's settings from the checkpoint.

Keras orders a functional model's layers by their depth in the graph, not by creation, so
their order is not the source's registration order (which puts a block's shortcut
first): ports pair the layers along the data flow.

Example:
    >>> net = resnet18(num_labels=10, image_size=64)
    >>> net.output_shape
    (None, 10)
    >>> net.get_layer("resnet.embedder.embedder.normalization").spec.preset
    'torch'
"""

from __future__ import annotations

from typing import Any

import keras

from ...keras import BatchNorm
from .resnet_plans import HF_RESNET_EPS, HF_RESNET_MOMENTUM, HFBlock, HFConv, hf_resnet_plan

__all__ = ["resnet18", "resnet50"]

_L = keras.layers


def _conv_layer(x: Any, conv: HFConv, name: str) -> Any:
    """``ResNetConvLayer`` (also ``ResNetShortCut``, whose kernel 1 pads nothing):
    symmetric zero padding, the convolution without bias, BatchNorm, ReLU."""
    if conv.padding:
        x = _L.ZeroPadding2D(conv.padding, name=f"{name}.padding")(x)
    x = _L.Conv2D(
        conv.out_channels,
        conv.kernel,
        strides=conv.stride,
        padding="valid",
        use_bias=False,
        # transformers' _init_weights: kaiming_normal_(mode="fan_out", nonlinearity="relu")
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal"
        ),
        name=f"{name}.convolution",
    )(x)
    x = BatchNorm(
        preset="torch", eps=HF_RESNET_EPS, momentum=HF_RESNET_MOMENTUM, name=f"{name}.normalization"
    )(x)
    if conv.activation:
        x = _L.ReLU(name=f"{name}.activation")(x)
    return x


def _block(x: Any, block: HFBlock, name: str) -> Any:
    """``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``: ``layer`` plus the shortcut (a
    projection where the block changes channels or stride, else the input), then ReLU.
    The shortcut is created first, as the source registers it."""
    residual = x
    if block.shortcut:
        projection = HFConv(block.in_channels, block.out_channels, 1, block.stride, False)
        residual = _conv_layer(x, projection, f"{name}.shortcut")
    for index, conv in enumerate(block.convs):
        x = _conv_layer(x, conv, f"{name}.layer.{index}")
    x = _L.Add(name=f"{name}.add")([x, residual])  # hidden_state += residual
    return _L.ReLU(name=f"{name}.activation")(x)


def _build(name: str, num_labels: int, image_size: int) -> Any:
    plan = hf_resnet_plan(name)
    inputs = keras.Input((image_size, image_size, 3), name="pixel_values")
    x = _conv_layer(inputs, plan.embedder, "resnet.embedder.embedder")
    # MaxPool2d(3, 2, padding=1) pads with -inf; zeros give the same maximum here, since
    # its input comes out of a ReLU (>= 0) and every window holds real values.
    x = _L.ZeroPadding2D(1, name="resnet.embedder.pooler.padding")(x)
    x = _L.MaxPooling2D(3, strides=2, padding="valid", name="resnet.embedder.pooler")(x)
    for s, stage in enumerate(plan.stages):
        for b, block in enumerate(stage.blocks):
            x = _block(x, block, f"resnet.encoder.stages.{s}.layers.{b}")
    # AdaptiveAvgPool2d((1, 1)), then the classifier's Flatten and Linear.
    x = _L.GlobalAveragePooling2D(keepdims=True, name="resnet.pooler")(x)
    x = _L.Flatten(name="classifier.0")(x)
    logits = _L.Dense(num_labels, name="classifier.1")(x)
    return keras.Model(inputs, logits, name=name)


def resnet18(num_labels: int = 10, image_size: int = 64) -> Any:
    """``transformers``' ResNet-18 (basic blocks, depths [2, 2, 2, 2], hidden sizes
    [64, 128, 256, 512]) as a functional ``keras.Model`` on ``(image_size, image_size,
    3)`` images, ``num_labels`` logits (defaults: the zoo's 10 and 64).

    Example:
        >>> sum(isinstance(la, BatchNorm) for la in resnet18().layers)
        20
    """
    return _build("resnet18", num_labels, image_size)


def resnet50(num_labels: int = 10, image_size: int = 64) -> Any:
    """``transformers``' ResNet-50 (``ResNetConfig()``: bottleneck blocks, depths
    [3, 4, 6, 3], hidden sizes [256, 512, 1024, 2048], the stride in each block's 3x3
    convolution) as a functional ``keras.Model`` on ``(image_size, image_size, 3)``
    images, ``num_labels`` logits (defaults: the zoo's 10 and 64).

    Example:
        >>> sum(isinstance(la, BatchNorm) for la in resnet50().layers)
        53
    """
    return _build("resnet50", num_labels, image_size)

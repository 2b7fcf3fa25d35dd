"""``transformers``' MobileNetV2 in Keras 3: the counterpart of
``MobileNetV2ForImageClassification(MobileNetV2Config(num_labels, image_size))``.

Layer for layer the source's function: TensorFlow "same" padding as the source applies it
(an explicit, possibly asymmetric ``ZeroPadding2D`` before each convolution, none of
Keras's own padding), depthwise 3x3 convolutions as ``DepthwiseConv2D``, ReLU6, the input
added only in the blocks of stride 1 whose channels stay, the 1x1 convolution to 1280,
average pooling, dropout 0.8 and the classifier. Every BatchNorm is unorm's with the
source's settings: ``preset="torch"``, eps 1e-3 and momentum 0.997, PyTorch's weight of
the **new** batch statistic as ``nn.BatchNorm2d(momentum=0.997)`` takes it (so the
running statistics follow the last batch closely, as they do in the source).

Example:
    >>> import numpy as np
    >>> net = mobilenet_v2(num_labels=10, image_size=64)
    >>> net(np.zeros((1, 64, 64, 3), np.float32)).shape
    TensorShape([1, 10])
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from ...keras import BatchNorm
from .plans import (
    MOBILENET_V2_DROPOUT,
    MOBILENET_V2_EPS,
    MOBILENET_V2_MOMENTUM,
    Conv,
    mobilenet_v2_plan,
)

__all__ = ["mobilenet_v2"]


def _conv_layer(x: Any, conv: Conv, prefix: str, activation: bool) -> Any:
    """The source's ``MobileNetV2ConvLayer``: TF padding, convolution, BatchNorm and,
    where ``activation``, ReLU6."""
    name = f"{prefix}.{conv.name}"
    if any(conv.pad[0]) or any(conv.pad[1]):
        x = layers.ZeroPadding2D(conv.pad, name=f"{name}.pad")(x)
    if conv.depthwise:
        x = layers.DepthwiseConv2D(
            conv.kernel,
            conv.stride,
            padding="valid",
            use_bias=False,
            name=f"{name}.convolution",
        )(x)
    else:
        x = layers.Conv2D(
            conv.out_channels,
            conv.kernel,
            conv.stride,
            padding="valid",
            groups=conv.groups,
            use_bias=False,
            name=f"{name}.convolution",
        )(x)
    x = BatchNorm(
        axis=-1,
        preset="torch",
        eps=MOBILENET_V2_EPS,
        momentum=MOBILENET_V2_MOMENTUM,
        name=f"{name}.normalization",
    )(x)
    if activation:
        x = layers.ReLU(max_value=6.0, name=f"{name}.relu6")(x)
    return x


def mobilenet_v2(num_labels: int = 10, image_size: int = 64) -> Any:
    """A functional ``keras.Model`` on ``(image_size, image_size, 3)`` images giving
    ``num_labels`` logits, computing what ``transformers``'
    ``MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=num_labels,
    image_size=image_size))`` computes on ``(N, 3, image_size, image_size)`` images.

    The source pads each convolution in ``forward`` from the size it is given; this
    model has that padding fixed for ``image_size`` inputs (its input shape). Layers are
    named after the source's modules (``mobilenet_v2.layer.3.conv_3x3.normalization``)
    and created in the order the source registers them.

    Example:
        >>> net = mobilenet_v2(num_labels=5, image_size=32)
        >>> net.output_shape
        (None, 5)
    """
    plan = mobilenet_v2_plan(image_size)
    inputs = keras.Input((image_size, image_size, 3), name="pixel_values")
    x = inputs
    for conv in plan.stem:
        x = _conv_layer(x, conv, "mobilenet_v2.conv_stem", conv.name != "reduce_1x1")
    for i, block in enumerate(plan.blocks):
        residual = x
        for conv in block.convs:
            x = _conv_layer(x, conv, f"mobilenet_v2.layer.{i}", conv.name != "reduce_1x1")
        if block.residual:
            x = layers.Add(name=f"mobilenet_v2.layer.{i}.add")([residual, x])
    x = _conv_layer(x, plan.head, "mobilenet_v2", activation=True)
    x = layers.GlobalAveragePooling2D(name="mobilenet_v2.pooler")(x)
    x = layers.Dropout(MOBILENET_V2_DROPOUT, name="dropout")(x)
    logits = layers.Dense(num_labels, name="classifier")(x)
    return keras.Model(inputs, logits, name="mobilenet_v2")

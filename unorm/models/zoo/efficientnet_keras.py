"""``efficientnet_pytorch``'s EfficientNet-B0 in Keras 3: the counterpart of
``EfficientNet.from_name('efficientnet-b0', num_classes=..., image_size=...,
drop_connect_rate=0)``.

Layer for layer the source's function: ``Conv2dStaticSamePadding``'s padding, fixed from
``image_size`` when the model is built (an explicit, possibly asymmetric
``ZeroPadding2D`` before each convolution that needs one; none of Keras's own padding,
which is computed from the input it is given), MBConv blocks (1x1 expansion, depthwise
convolution, squeeze and excitation with biased 1x1 convolutions, 1x1 projection, the
input added where stride and channels allow), swish written as the source computes it
(``x * sigmoid(x)``), the 1x1 head convolution to 1280, average pooling, dropout 0.2 and
the classifier. Stochastic depth is off, as in the source built with
``drop_connect_rate=0``. Every BatchNorm is unorm's with the source's settings:
``preset="torch"``, eps 1e-3 and momentum 0.01 (``nn.BatchNorm2d(momentum=1 - 0.99)``,
TensorFlow's decay 0.99 turned into PyTorch's weight of the new batch statistic).

Example:
    >>> import numpy as np
    >>> net = efficientnet_b0(num_labels=10, image_size=64)
    >>> net(np.zeros((1, 64, 64, 3), np.float32)).shape
    TensorShape([1, 10])
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from ...keras import BatchNorm
from .plans import (
    EFFICIENTNET_DROPOUT,
    EFFICIENTNET_EPS,
    EFFICIENTNET_MOMENTUM,
    Conv,
    efficientnet_b0_plan,
)

__all__ = ["efficientnet_b0"]


def _swish(x: Any, name: str) -> Any:
    # The source's MemoryEfficientSwish is i * sigmoid(i); a product of two layers (not
    # Keras's fused silu) so that the data flow has the multiplication the source's has.
    return layers.Multiply(name=f"{name}.swish")(
        [x, layers.Activation("sigmoid", name=f"{name}.sigmoid")(x)]
    )


def _conv(x: Any, conv: Conv, prefix: str) -> Any:
    """A ``Conv2dStaticSamePadding``: its fixed zero padding, then the convolution."""
    name = f"{prefix}{conv.name}"
    if any(conv.pad[0]) or any(conv.pad[1]):
        x = layers.ZeroPadding2D(conv.pad, name=f"{name}.static_padding")(x)
    if conv.depthwise:
        return layers.DepthwiseConv2D(
            conv.kernel, conv.stride, padding="valid", use_bias=conv.bias, name=name
        )(x)
    return layers.Conv2D(
        conv.out_channels,
        conv.kernel,
        conv.stride,
        padding="valid",
        groups=conv.groups,
        use_bias=conv.bias,
        name=name,
    )(x)


def _bn(x: Any, name: str) -> Any:
    return BatchNorm(
        axis=-1, preset="torch", eps=EFFICIENTNET_EPS, momentum=EFFICIENTNET_MOMENTUM, name=name
    )(x)


def efficientnet_b0(num_labels: int = 10, image_size: int = 64) -> Any:
    """A functional ``keras.Model`` on ``(image_size, image_size, 3)`` images giving
    ``num_labels`` logits, computing what ``efficientnet_pytorch``'s
    ``EfficientNet.from_name('efficientnet-b0', num_classes=num_labels,
    image_size=image_size, drop_connect_rate=0)`` computes on ``(N, 3, image_size,
    image_size)`` images. Layers are named after the source's modules
    (``_blocks.3._depthwise_conv``) and created in the order the source registers them.

    Example:
        >>> net = efficientnet_b0(num_labels=5, image_size=32)
        >>> net.output_shape
        (None, 5)
    """
    plan = efficientnet_b0_plan(image_size)
    inputs = keras.Input((image_size, image_size, 3), name="inputs")
    x = _swish(_bn(_conv(inputs, plan.stem, ""), "_bn0"), "_bn0")
    for i, block in enumerate(plan.blocks):
        prefix = f"_blocks.{i}."
        skip = x
        if block.expand is not None:
            x = _swish(_bn(_conv(x, block.expand, prefix), f"{prefix}_bn0"), f"{prefix}_bn0")
        x = _swish(_bn(_conv(x, block.depthwise, prefix), f"{prefix}_bn1"), f"{prefix}_bn1")
        squeezed = layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}_se_pool")(x)
        squeezed = _swish(_conv(squeezed, block.se_reduce, prefix), f"{prefix}_se_reduce")
        squeezed = _conv(squeezed, block.se_expand, prefix)
        gate = layers.Activation("sigmoid", name=f"{prefix}_se_gate")(squeezed)
        x = layers.Multiply(name=f"{prefix}_se_scale")([gate, x])  # sigmoid(s) * x
        x = _bn(_conv(x, block.project, prefix), f"{prefix}_bn2")
        if block.skip:
            x = layers.Add(name=f"{prefix}skip")([x, skip])  # x + inputs
    x = _swish(_bn(_conv(x, plan.head, ""), "_bn1"), "_bn1")
    x = layers.GlobalAveragePooling2D(name="_avg_pooling")(x)
    x = layers.Dropout(EFFICIENTNET_DROPOUT, name="_dropout")(x)
    logits = layers.Dense(num_labels, name="_fc")(x)
    return keras.Model(inputs, logits, name="efficientnet_b0")

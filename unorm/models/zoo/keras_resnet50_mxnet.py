"""``keras.applications.ResNet50`` in MXNet Gluon, layer for layer, with unorm's BatchNorm
(the zoo's counterpart of :func:`unorm.models.zoo.sources_keras.keras_resnet50`).

The blocks carry Keras's layer names (``conv1_conv``, ``conv2_block1_0_conv``,
``predictions``...) and are registered in the order Keras creates the layers (a block's
projection shortcut ``_0`` first), so ports and messages read the same on both sides;
:mod:`unorm.models.zoo.resnet_plans` lists what they compute: biased convolutions, the
stride in the first 1x1 convolution of a block, zero padding before the stem (folded into
its convolution: the same arithmetic) and before the max pooling (``ZeroPadding2D``, zeros
and not the -inf Gluon's pooling pads with), ``"SAME"`` only at stride 1 (symmetric for a
3x3 kernel), global average pooling and ``Dense``. Every BatchNorm is
:class:`unorm.mxnet.BatchNorm` with ``preset="keras"``, eps 1.001e-5 and momentum
``1 - 0.99`` (Keras's 0.99 weighs the old value): a freshly built model already trains as
the source does (statistics updated in the forward pass, the biased variance fed), and a
loaded one takes the source's settings from the checkpoint.

The builder returns an initialised, hybridizable ``HybridBlock`` for ``(N, 3,
image_size, image_size)`` images whose parameter shapes are realised by one call.

Example:
    >>> import mxnet as mx
    >>> net = keras_resnet50(num_labels=10, image_size=64)
    >>> net(mx.nd.zeros((2, 3, 64, 64))).shape
    (2, 10)
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from ...mxnet import BatchNorm
from .resnet_plans import (
    KERAS_RESNET_EPS,
    KERAS_RESNET_MOMENTUM,
    KerasBlock,
    KerasConv,
    keras_resnet50_plan,
)

__all__ = ["KerasResNet50", "ZeroPadding2D", "keras_resnet50"]

_NN = gluon.nn


class ZeroPadding2D(gluon.HybridBlock):
    """Keras's ``ZeroPadding2D(padding)`` on channels-first maps: ``padding`` zeros on
    every side of both spatial axes.

    Example:
        >>> pad = ZeroPadding2D(1)
        >>> pad(mx.nd.ones((1, 1, 2, 2))).shape
        (1, 1, 4, 4)
    """

    def __init__(self, padding: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._width = (0, 0, 0, 0, padding, padding, padding, padding)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return F.pad(x, mode="constant", constant_value=0.0, pad_width=self._width)


class KerasResNet50(gluon.HybridBlock):
    """``keras.applications.ResNet50(weights=None, classifier_activation=None)`` on
    channels-first ``(N, 3, H, W)`` images: every Keras layer with weights (and the
    padding, pooling and activations) as a child block of the same name, returning the
    logits.

    Example:
        >>> net = KerasResNet50(num_labels=3)
        >>> net.conv2_block1_1_conv._kwargs["stride"], net.conv2_block1_2_conv._kwargs["pad"]
        ((1, 1), (1, 1))
    """

    def __init__(self, num_labels: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._plan = keras_resnet50_plan()
        with self.name_scope():
            # conv1_pad's 3 zeros on each side, folded into the stem's convolution.
            self._add_conv(self._plan.stem)
            self.pool1_pad = ZeroPadding2D(1)
            self.pool1_pool = _NN.MaxPool2D(pool_size=3, strides=2)
            for stack in self._plan.stacks:
                for block in stack.blocks:
                    self._add_block(block)
            self.predictions = _NN.Dense(num_labels, in_units=self._plan.features)

    def _add_conv(self, conv: KerasConv) -> None:
        layer = _NN.Conv2D(
            conv.out_channels,
            conv.kernel,
            strides=conv.stride,
            padding=conv.padding,
            use_bias=True,
            in_channels=conv.in_channels,
        )
        setattr(self, conv.name, layer)  # registers the child under Keras's name
        bn = BatchNorm(
            conv.out_channels,
            num_dims=4,
            preset="keras",
            eps=KERAS_RESNET_EPS,
            momentum=KERAS_RESNET_MOMENTUM,
        )
        setattr(self, conv.bn_name, bn)
        if conv.activation:
            setattr(self, conv.relu_name, _NN.Activation("relu"))

    def _add_block(self, block: KerasBlock) -> None:
        # residual_block_v1 creates the projection shortcut before the main path.
        if block.shortcut is not None:
            self._add_conv(block.shortcut)
        for conv in block.convs:
            self._add_conv(conv)
        setattr(self, f"{block.name}_out", _NN.Activation("relu"))

    def _conv(self, x: Any, conv: KerasConv) -> Any:
        x = getattr(self, conv.bn_name)(getattr(self, conv.name)(x))
        return getattr(self, conv.relu_name)(x) if conv.activation else x

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self._conv(x, self._plan.stem)
        x = self.pool1_pool(self.pool1_pad(x))
        for stack in self._plan.stacks:
            for block in stack.blocks:
                shortcut = x if block.shortcut is None else self._conv(x, block.shortcut)
                for conv in block.convs:
                    x = self._conv(x, conv)
                x = getattr(self, f"{block.name}_out")(F.elemwise_add(shortcut, x))
        x = F.mean(x, axis=(2, 3))  # GlobalAveragePooling2D ("avg_pool")
        return self.predictions(x)


def keras_resnet50(num_labels: int = 10, image_size: int = 64) -> Any:
    """``keras.applications.ResNet50`` as an initialised :class:`KerasResNet50` for
    ``(N, 3, image_size, image_size)`` images, ``num_labels`` logits (defaults: the zoo's
    10 and 64).

    Example:
        >>> net = keras_resnet50()
        >>> net.conv1_bn.spec.preset, net.conv1_bn.spec.eps
        ('keras', 1.001e-05)
    """
    net = KerasResNet50(num_labels)
    # Keras's default kernel initializer, glorot_uniform, is Xavier's average uniform.
    net.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3.0))
    net(mx.nd.zeros((1, 3, image_size, image_size)))  # inference mode: no statistics move
    return net

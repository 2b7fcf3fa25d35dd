"""``efficientnet_pytorch``'s EfficientNet-B0 in MXNet Gluon: the counterpart of
``EfficientNet.from_name('efficientnet-b0', num_classes=..., image_size=...,
drop_connect_rate=0)``.

Layer for layer the source's function: ``Conv2dStaticSamePadding``'s padding, fixed from
``image_size`` when the block is built (explicit zero padding, possibly asymmetric:
:class:`~unorm.models.zoo.layers_mxnet.SameConv`), MBConv blocks (1x1 expansion,
depthwise convolution, squeeze and excitation with biased 1x1 convolutions, 1x1
projection, the input added where stride and channels allow), swish as ``x *
sigmoid(x)``, the 1x1 head convolution to 1280, average pooling, flatten, dropout 0.2 and
the classifier; stochastic depth off, as the source built with ``drop_connect_rate=0``.
Every BatchNorm is unorm's with the source's settings: ``preset="torch"``, eps 1e-3 and
momentum 0.01 (``nn.BatchNorm2d(momentum=1 - 0.99)``, PyTorch's weight of the new batch
statistic).

Example:
    >>> import mxnet as mx
    >>> net = efficientnet_b0(num_labels=10, image_size=64)
    >>> net(mx.nd.zeros((1, 3, 64, 64))).shape
    (1, 10)
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from ...mxnet import BatchNorm
from .layers_mxnet import SameConv, swish
from .plans import (
    EFFICIENTNET_DROPOUT,
    EFFICIENTNET_EPS,
    EFFICIENTNET_MOMENTUM,
    EfficientNetBlock,
    efficientnet_b0_plan,
)

__all__ = ["EfficientNet", "MBConvBlock", "efficientnet_b0"]


def _bn(channels: int) -> BatchNorm:
    return BatchNorm(
        channels, axis=1, preset="torch", eps=EFFICIENTNET_EPS, momentum=EFFICIENTNET_MOMENTUM
    )


class MBConvBlock(gluon.HybridBlock):  # type: ignore[misc]
    """The source's ``MBConvBlock`` from a plan's block: children ``_expand_conv`` and
    ``_bn0`` (where the expand ratio is not 1), ``_depthwise_conv``, ``_bn1``,
    ``_se_reduce``, ``_se_expand``, ``_project_conv``, ``_bn2``, in its order."""

    def __init__(self, block: EfficientNetBlock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._skip = block.skip
        self._expand = block.expand is not None
        with self.name_scope():
            if block.expand is not None:
                self._expand_conv = SameConv(block.expand)
                self._bn0 = _bn(block.expand.out_channels)
            self._depthwise_conv = SameConv(block.depthwise)
            self._bn1 = _bn(block.depthwise.out_channels)
            self._se_reduce = SameConv(block.se_reduce)
            self._se_expand = SameConv(block.se_expand)
            self._project_conv = SameConv(block.project)
            self._bn2 = _bn(block.project.out_channels)

    def hybrid_forward(self, F: Any, inputs: Any) -> Any:
        x = inputs
        if self._expand:
            x = swish(F, self._bn0(self._expand_conv(x)))
        x = swish(F, self._bn1(self._depthwise_conv(x)))
        squeezed = F.mean(x, axis=(2, 3), keepdims=True)  # adaptive_avg_pool2d(x, 1)
        squeezed = self._se_expand(swish(F, self._se_reduce(squeezed)))
        x = F.broadcast_mul(F.sigmoid(squeezed), x)
        x = self._bn2(self._project_conv(x))
        return x + inputs if self._skip else x


class EfficientNet(gluon.HybridBlock):  # type: ignore[misc]
    """EfficientNet-B0 for ``image_size`` images (see :func:`efficientnet_b0`): children
    ``_conv_stem``, ``_bn0``, ``_blocks`` (16 :class:`MBConvBlock`), ``_conv_head``,
    ``_bn1``, ``_dropout``, ``_fc``, registered in the source's order."""

    def __init__(self, num_labels: int, image_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        plan = efficientnet_b0_plan(image_size)
        with self.name_scope():
            self._conv_stem = SameConv(plan.stem)
            self._bn0 = _bn(plan.stem.out_channels)
            self._blocks = gluon.nn.HybridSequential()
            for block in plan.blocks:
                self._blocks.add(MBConvBlock(block))
            self._conv_head = SameConv(plan.head)
            self._bn1 = _bn(plan.head.out_channels)
            self._avg_pooling = gluon.nn.GlobalAvgPool2D()
            self._flatten = gluon.nn.Flatten()
            self._dropout = gluon.nn.Dropout(EFFICIENTNET_DROPOUT)
            self._fc = gluon.nn.Dense(num_labels, in_units=plan.head.out_channels)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = swish(F, self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = swish(F, self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._flatten(self._avg_pooling(x))))


def efficientnet_b0(num_labels: int = 10, image_size: int = 64) -> EfficientNet:
    """An initialised :class:`EfficientNet` (shapes realised by one call) computing what
    ``efficientnet_pytorch``'s ``EfficientNet.from_name('efficientnet-b0',
    num_classes=num_labels, image_size=image_size, drop_connect_rate=0)`` computes on
    ``(N, 3, image_size, image_size)`` images; its padding is fixed for ``image_size``
    as the source's is (another size is a ``ValueError`` when it runs imperatively).

    Example:
        >>> net = efficientnet_b0(num_labels=5, image_size=32)
        >>> net.hybridize()
        >>> net(mx.nd.zeros((2, 3, 32, 32))).shape
        (2, 5)
    """
    net = EfficientNet(num_labels, image_size)
    # PyTorch's default kernel initializer, the source's (kaiming_uniform with a=sqrt(5):
    # uniform within 1/sqrt(fan_in)). Gluon's default, uniform within 0.07 whatever the
    # fan-in, leaves this deep a network with activations of ~1e4 and channel variances of
    # ~1e-4, where float32 rounding alone moves the logits by more than 1e-4 of their scale.
    net.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=1.0 / 3.0))
    net(mx.nd.zeros((1, 3, image_size, image_size)))  # realise every shape
    return net

"""``transformers``' MobileNetV2 in MXNet Gluon: the counterpart of
``MobileNetV2ForImageClassification(MobileNetV2Config(num_labels, image_size))``.

Layer for layer the source's function: TensorFlow "same" padding as the source applies it
(explicit zero padding, possibly asymmetric, before each convolution:
:class:`~unorm.models.zoo.layers_mxnet.SameConv`), depthwise 3x3 convolutions as grouped
``Conv2D``, ReLU6, the input added only in the blocks of stride 1 whose channels stay,
the 1x1 convolution to 1280, average pooling, flatten, dropout 0.8 and the classifier.
Every BatchNorm is unorm's with the source's settings: ``preset="torch"``, eps 1e-3 and
momentum 0.997, PyTorch's weight of the **new** batch statistic as
``nn.BatchNorm2d(momentum=0.997)`` takes it.

Example:
    >>> import mxnet as mx
    >>> net = mobilenet_v2(num_labels=10, image_size=64)
    >>> net(mx.nd.zeros((1, 3, 64, 64))).shape
    (1, 10)
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from ...mxnet import BatchNorm
from .layers_mxnet import SameConv
from .plans import (
    MOBILENET_V2_DROPOUT,
    MOBILENET_V2_EPS,
    MOBILENET_V2_MOMENTUM,
    Conv,
    mobilenet_v2_plan,
)

__all__ = ["MobileNetV2", "mobilenet_v2"]


class ConvLayer(gluon.HybridBlock):  # type: ignore[misc]
    """The source's ``MobileNetV2ConvLayer``: TF-padded ``convolution``, unorm's
    BatchNorm ``normalization`` and, where ``activation``, ReLU6."""

    def __init__(self, conv: Conv, activation: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._activation = activation
        with self.name_scope():
            self.convolution = SameConv(conv)
            self.normalization = BatchNorm(
                conv.out_channels,
                axis=1,
                preset="torch",
                eps=MOBILENET_V2_EPS,
                momentum=MOBILENET_V2_MOMENTUM,
            )

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.normalization(self.convolution(x))
        return F.clip(x, 0.0, 6.0) if self._activation else x  # ReLU6


class Stage(gluon.HybridBlock):  # type: ignore[misc]
    """Three :class:`ConvLayer` (the stem's ``first_conv``, ``conv_3x3``, ``reduce_1x1``
    or a block's ``expand_1x1``, ``conv_3x3``, ``reduce_1x1``), the last without
    activation, the input added where ``residual`` (``residual + features``)."""

    def __init__(self, convs: tuple[Conv, ...], residual: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._residual = residual
        with self.name_scope():
            self.convs = gluon.nn.HybridSequential()
            for conv in convs:
                self.convs.add(ConvLayer(conv, activation=conv.name != "reduce_1x1"))

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        out = self.convs(x)
        return x + out if self._residual else out


class MobileNetV2(gluon.HybridBlock):  # type: ignore[misc]
    """MobileNetV2 for ``image_size`` images (see :func:`mobilenet_v2`): children
    ``conv_stem``, ``layer`` (16 blocks), ``conv_1x1``, ``dropout``, ``classifier``,
    registered in the source's order."""

    def __init__(self, num_labels: int, image_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        plan = mobilenet_v2_plan(image_size)
        with self.name_scope():
            self.conv_stem = Stage(plan.stem, residual=False)
            self.layer = gluon.nn.HybridSequential()
            for block in plan.blocks:
                self.layer.add(Stage(block.convs, residual=block.residual))
            self.conv_1x1 = ConvLayer(plan.head, activation=True)
            self.pooler = gluon.nn.GlobalAvgPool2D()
            self.flatten = gluon.nn.Flatten()
            self.dropout = gluon.nn.Dropout(MOBILENET_V2_DROPOUT)
            self.classifier = gluon.nn.Dense(num_labels, in_units=plan.head.out_channels)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.conv_1x1(self.layer(self.conv_stem(x)))
        return self.classifier(self.dropout(self.flatten(self.pooler(x))))


def mobilenet_v2(num_labels: int = 10, image_size: int = 64) -> MobileNetV2:
    """An initialised :class:`MobileNetV2` (shapes realised by one call) computing what
    ``transformers``' ``MobileNetV2ForImageClassification(MobileNetV2Config(
    num_labels=num_labels, image_size=image_size))`` computes on ``(N, 3, image_size,
    image_size)`` images. The source pads in ``forward`` from the size it is given; this
    block has that padding fixed for ``image_size`` (another size is a ``ValueError``
    when it runs imperatively).

    Example:
        >>> net = mobilenet_v2(num_labels=5, image_size=32)
        >>> net.hybridize()
        >>> net(mx.nd.zeros((2, 3, 32, 32))).shape
        (2, 5)
    """
    net = MobileNetV2(num_labels, image_size)
    # PyTorch's default kernel initializer, the source's (kaiming_uniform with a=sqrt(5):
    # uniform within 1/sqrt(fan_in)). Gluon's default, uniform within 0.07 whatever the
    # fan-in, leaves this deep a network with activations of ~1e4 and channel variances of
    # ~1e-4, where float32 rounding alone moves the logits by more than 1e-4 of their scale.
    net.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=1.0 / 3.0))
    net(mx.nd.zeros((1, 3, image_size, image_size)))  # realise every shape
    return net

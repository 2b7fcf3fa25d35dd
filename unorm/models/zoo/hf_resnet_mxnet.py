"""``transformers``' ResNet-18 and ResNet-50 in MXNet Gluon, block for block, with unorm's
BatchNorm (the zoo's counterparts of :mod:`unorm.models.zoo.sources_torch`).

The blocks are the source's modules under the same names and in the same registration
order (``ResNetEmbeddings`` -> :class:`Embeddings`, ``ResNetConvLayer`` ->
:class:`ConvLayer`, a block's ``shortcut`` before its ``layer``...), so the port's paths
(``resnet.encoder.stages.1.layers.0.shortcut.convolution``) and its order read as the
source's; :mod:`unorm.models.zoo.resnet_plans` lists what they compute. Gluon's layouts
and padding are PyTorch's (channels-first, symmetric ``kernel // 2``, max pooling padded
with -inf), so each layer is the source's with the same arguments. Every BatchNorm is
:class:`unorm.mxnet.BatchNorm` with ``preset="torch"`` and the source's eps 1e-5 and
momentum 0.1: a freshly built model already trains as the source does (running
statistics updated in the forward pass, the unbiased variance fed), and a loaded one takes
the source's settings from the checkpoint.

Each builder returns an initialised, hybridizable ``HybridBlock`` for ``(N, 3,
image_size, image_size)`` images whose parameter shapes are realised by one call.

Example:
    >>> import mxnet as mx
    >>> net = resnet18(num_labels=10, image_size=64)
    >>> net(mx.nd.zeros((2, 3, 64, 64))).shape
    (2, 10)
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from ...mxnet import BatchNorm
from .resnet_plans import (
    HF_RESNET_EPS,
    HF_RESNET_MOMENTUM,
    HFBlock,
    HFConv,
    HFStage,
    hf_resnet_plan,
)

__all__ = [
    "ConvLayer",
    "Embeddings",
    "Encoder",
    "Layer",
    "ResNetForImageClassification",
    "ResNetModel",
    "Stage",
    "resnet18",
    "resnet50",
]

_NN = gluon.nn


class ConvLayer(gluon.HybridBlock):
    """``ResNetConvLayer`` (and ``ResNetShortCut``, whose kernel 1 pads nothing):
    ``convolution`` (no bias, symmetric padding ``kernel // 2``), ``normalization``,
    then ReLU where the plan says so.

    Example:
        >>> layer = ConvLayer(HFConv(3, 8, 3, 2))
        >>> layer.initialize()
        >>> layer(mx.nd.zeros((1, 3, 8, 8))).shape
        (1, 8, 4, 4)
    """

    def __init__(self, conv: HFConv, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.convolution = _NN.Conv2D(
                conv.out_channels,
                conv.kernel,
                strides=conv.stride,
                padding=conv.padding,
                use_bias=False,
                in_channels=conv.in_channels,
            )
            self.normalization = BatchNorm(
                conv.out_channels,
                num_dims=4,
                preset="torch",
                eps=HF_RESNET_EPS,
                momentum=HF_RESNET_MOMENTUM,
            )
            self.activation = _NN.Activation("relu") if conv.activation else None

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.normalization(self.convolution(x))
        return x if self.activation is None else self.activation(x)


class Layer(gluon.HybridBlock):
    """``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``: ``shortcut`` (a projection
    :class:`ConvLayer` where the block changes channels or stride, else the identity),
    registered first as in the source, ``layer`` (its convolutions), their sum, ReLU."""

    def __init__(self, block: HFBlock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            projection = HFConv(block.in_channels, block.out_channels, 1, block.stride, False)
            self.shortcut = ConvLayer(projection) if block.shortcut else None
            self.layer = _NN.HybridSequential()
            with self.layer.name_scope():
                self.layer.add(*(ConvLayer(conv) for conv in block.convs))
            self.activation = _NN.Activation("relu")

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.activation(F.elemwise_add(self.layer(x), residual))


class Stage(gluon.HybridBlock):
    """``ResNetStage``: its blocks in ``layers``."""

    def __init__(self, blocks: tuple[HFBlock, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.layers = _NN.HybridSequential()
            with self.layers.name_scope():
                self.layers.add(*(Layer(block) for block in blocks))

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.layers(x)


class Embeddings(gluon.HybridBlock):
    """``ResNetEmbeddings``: ``embedder`` (7x7 :class:`ConvLayer`, stride 2) and
    ``pooler`` (max pooling 3, stride 2, padding 1, which Gluon pads with -inf as PyTorch
    does)."""

    def __init__(self, conv: HFConv, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.embedder = ConvLayer(conv)
            self.pooler = _NN.MaxPool2D(pool_size=3, strides=2, padding=1)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.pooler(self.embedder(x))


class Encoder(gluon.HybridBlock):
    """``ResNetEncoder``: its :class:`Stage` blocks in ``stages``, run in order."""

    def __init__(self, stages: tuple[HFStage, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.stages = _NN.HybridSequential()
            with self.stages.name_scope():
                self.stages.add(*(Stage(stage.blocks) for stage in stages))

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.stages(x)


class ResNetModel(gluon.HybridBlock):
    """``ResNetModel``: ``embedder``, ``encoder`` (its ``stages``) and ``pooler`` (average
    pooling to 1x1)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        plan = hf_resnet_plan(name)
        with self.name_scope():
            self.embedder = Embeddings(plan.embedder)
            self.encoder = Encoder(plan.stages)
            self.pooler = _NN.GlobalAvgPool2D()

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.pooler(self.encoder(self.embedder(x)))


class ResNetForImageClassification(gluon.HybridBlock):
    """``ResNetForImageClassification``: ``resnet`` (:class:`ResNetModel`) and
    ``classifier`` (``Flatten``, then a ``Dense`` from the last hidden size), returning
    the logits.

    Example:
        >>> net = ResNetForImageClassification("resnet18", num_labels=3)
        >>> net.initialize()
        >>> net(mx.nd.zeros((1, 3, 32, 32))).shape
        (1, 3)
    """

    def __init__(self, name: str, num_labels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        features = hf_resnet_plan(name).features
        with self.name_scope():
            self.resnet = ResNetModel(name)
            self.classifier = _NN.HybridSequential()
            with self.classifier.name_scope():
                self.classifier.add(_NN.Flatten(), _NN.Dense(num_labels, in_units=features))

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.classifier(self.resnet(x))


def _build(name: str, num_labels: int, image_size: int) -> Any:
    net = ResNetForImageClassification(name, num_labels)
    # transformers' _init_weights: kaiming_normal_(mode="fan_out") for the convolutions;
    # Xavier's "out" factor with magnitude 2 and a Gaussian is that distribution.
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2.0))
    net(mx.nd.zeros((1, 3, image_size, image_size)))  # inference mode: no statistics move
    return net


def resnet18(num_labels: int = 10, image_size: int = 64) -> Any:
    """``transformers``' ResNet-18 (basic blocks, depths [2, 2, 2, 2], hidden sizes
    [64, 128, 256, 512]), an initialised Gluon ``HybridBlock`` for ``(N, 3, image_size,
    image_size)`` images, ``num_labels`` logits (defaults: the zoo's 10 and 64).

    Example:
        >>> net = resnet18()
        >>> type(net.resnet.encoder.stages[1].layers[0].shortcut.normalization).__name__
        'BatchNorm'
    """
    return _build("resnet18", num_labels, image_size)


def resnet50(num_labels: int = 10, image_size: int = 64) -> Any:
    """``transformers``' ResNet-50 (``ResNetConfig()``: bottleneck blocks, depths
    [3, 4, 6, 3], hidden sizes [256, 512, 1024, 2048], the stride in each block's 3x3
    convolution), an initialised Gluon ``HybridBlock`` for ``(N, 3, image_size,
    image_size)`` images, ``num_labels`` logits (defaults: the zoo's 10 and 64).

    Example:
        >>> net = resnet50()
        >>> [c.convolution._kwargs["stride"] for c in net.resnet.encoder.stages[1].layers[0].layer]
        [(1, 1), (2, 2), (1, 1)]
    """
    return _build("resnet50", num_labels, image_size)

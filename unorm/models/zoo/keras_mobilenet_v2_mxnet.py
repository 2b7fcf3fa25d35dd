"""``keras.applications.MobileNetV2`` in MXNet Gluon: the zoo's ``keras_mobilenet_v2``
counterpart, layer for layer.

The source (``keras.applications.MobileNetV2(weights=None, alpha=1.0,
classifier_activation=None)``, :func:`unorm.models.zoo.sources_keras.keras_mobilenet_v2`)
is a stem convolution, 17 inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1
projection; the first block has no expansion; a residual Add where the stride is 1 and the
channels stay), a 1x1 convolution to 1280 channels, global average pooling and a Dense.
What has to match exactly, and is written out here:

- Padding. The stem is a stride-2 3x3 convolution with TensorFlow's ``"same"`` padding,
  asymmetric on even inputs (the extra row and column at the bottom and right); each
  stride-2 depthwise convolution is ``"valid"`` after Keras's ``ZeroPadding2D`` of
  ``imagenet_utils.correct_pad``. Gluon's convolutions pad symmetrically, so both are an
  explicit :class:`ZeroPadding2D` of ``(before, after)`` zeros computed from the spatial
  size the layer sees: the model is built for one ``image_size`` (as the Keras model is)
  and refuses other sizes. Stride-1 ``"same"`` 3x3 convolutions pad 1 on every side.
- Convolutions without bias, ReLU6 (Keras's ``ReLU(6.0)``: a clip to ``[0, 6]``), Keras's
  depthwise kernel ``(kh, kw, C, 1)`` as a ``Conv2D`` with ``groups=C``.
- Every BatchNorm is :class:`unorm.mxnet.BatchNorm` with ``preset="keras"``, eps 1e-3 and
  Keras's momentum 0.999 (the weight of the old value; unorm's momentum ``1 - 0.999``), so
  a freshly built model trains its statistics as the Keras one does.
- Channel counts from Keras's ``_make_divisible`` at ``alpha=1.0``.

Blocks are created in the order Keras creates its layers. The builder returns an
initialised, hybridizable ``HybridBlock`` whose parameter shapes are realised by one call.

Example:
    >>> import mxnet as mx
    >>> net = keras_mobilenet_v2(num_labels=10, image_size=64)
    >>> net(mx.nd.zeros((2, 3, 64, 64))).shape
    (2, 10)
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from ...mxnet import BatchNorm

__all__ = ["InvertedResidual", "KerasMobileNetV2", "ZeroPadding2D", "keras_mobilenet_v2"]

_NN = gluon.nn

#: Keras's BatchNormalization settings in MobileNetV2 (momentum in Keras's convention).
KERAS_EPS = 1e-3
KERAS_MOMENTUM = 0.999

#: (filters, stride, expansion) of the 17 inverted residual blocks, in Keras's order.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (16, 1, 1),
    (24, 2, 6),
    (24, 1, 6),
    (32, 2, 6),
    (32, 1, 6),
    (32, 1, 6),
    (64, 2, 6),
    (64, 1, 6),
    (64, 1, 6),
    (64, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (160, 2, 6),
    (160, 1, 6),
    (160, 1, 6),
    (320, 1, 6),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Keras MobileNetV2's channel rounding: ``v`` to the nearest multiple of
    ``divisor`` (at least ``divisor``), one ``divisor`` more where that would lose more
    than 10%.

    Example:
        >>> make_divisible(32 * 1.0), make_divisible(20)
        (32, 24)
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's ``"same"`` padding of one spatial axis as ``(before, after)``: the
    output has ``ceil(size / stride)`` positions and the odd row or column, if any, goes
    after.

    Example:
        >>> same_padding(64, 3, 2), same_padding(65, 3, 2), same_padding(8, 3, 1)
        ((0, 1), (1, 1), (1, 1))
    """
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def correct_pad(size: int, kernel: int) -> tuple[int, int]:
    """Keras's ``imagenet_utils.correct_pad`` for one spatial axis of known ``size``:
    ``(kernel // 2 - 1 + size % 2, kernel // 2)``, the ``(before, after)`` zero padding
    Keras puts before a stride-2 ``"valid"`` convolution.

    Example:
        >>> correct_pad(32, 3), correct_pad(33, 3)
        ((0, 1), (1, 1))
    """
    return kernel // 2 - (1 - size % 2), kernel // 2


def _bn(channels: int) -> BatchNorm:
    # Keras's momentum weighs the old value; unorm's the new one.
    return BatchNorm(
        channels, num_dims=4, preset="keras", eps=KERAS_EPS, momentum=1.0 - KERAS_MOMENTUM
    )


class ZeroPadding2D(gluon.HybridBlock):
    """Keras's ``ZeroPadding2D(((before, after), (before, after)))`` on channels-first
    maps: ``before`` zeros above and left, ``after`` below and right (square maps).

    Example:
        >>> ZeroPadding2D((0, 1))(mx.nd.ones((1, 1, 2, 2))).shape
        (1, 1, 3, 3)
    """

    def __init__(self, pads: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        before, after = pads
        self._width = (0, 0, 0, 0, before, after, before, after)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return F.pad(x, mode="constant", constant_value=0.0, pad_width=self._width)


def _relu6(F: Any, x: Any) -> Any:
    return F.clip(x, 0.0, 6.0)  # Keras's ReLU(6.0)


class InvertedResidual(gluon.HybridBlock):
    """Keras MobileNetV2's ``_inverted_res_block``: 1x1 expansion (none in block 0),
    :class:`ZeroPadding2D` of ``correct_pad`` and a ``"valid"`` 3x3 depthwise convolution
    where the stride is 2 (padding 1 on every side where it is 1), 1x1 projection, each
    convolution followed by a BatchNorm, ReLU6 after the first two, and the input added
    where the stride is 1 and the channels stay.

    Args:
        in_channels: channels of the block's input.
        filters, stride, expansion: the block's row of :data:`BLOCKS`.
        block_id: its index (0 has no expansion, as in Keras).
        size: the side of the square map the block reads (for the padding).

    Example:
        >>> block = InvertedResidual(16, 24, 2, 6, block_id=1, size=32)
        >>> block.initialize()
        >>> block(mx.nd.zeros((1, 16, 32, 32))).shape
        (1, 24, 16, 16)
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        stride: int,
        expansion: int,
        block_id: int,
        size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        out_channels = make_divisible(int(filters * 1.0), 8)
        hidden = expansion * in_channels if block_id else in_channels
        self._expands = bool(block_id)
        with self.name_scope():
            if block_id:
                self.expand = _NN.Conv2D(hidden, 1, use_bias=False, in_channels=in_channels)
                self.expand_bn = _bn(hidden)
            # Keras: ZeroPadding2D(correct_pad) + "valid" for stride 2, "same" for stride 1.
            pads = correct_pad(size, 3) if stride == 2 else same_padding(size, 3, 1)
            self.pad = ZeroPadding2D(pads)
            self.depthwise = _NN.Conv2D(
                hidden, 3, strides=stride, groups=hidden, use_bias=False, in_channels=hidden
            )
            self.depthwise_bn = _bn(hidden)
            self.project = _NN.Conv2D(out_channels, 1, use_bias=False, in_channels=hidden)
            self.project_bn = _bn(out_channels)
        self.residual = in_channels == out_channels and stride == 1
        self.out_channels = out_channels
        self.out_size = (size + pads[0] + pads[1] - 3) // stride + 1

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        h = x
        if self._expands:
            h = _relu6(F, self.expand_bn(self.expand(h)))
        h = _relu6(F, self.depthwise_bn(self.depthwise(self.pad(h))))
        h = self.project_bn(self.project(h))
        return F.elemwise_add(x, h) if self.residual else h


class KerasMobileNetV2(gluon.HybridBlock):
    """``keras.applications.MobileNetV2(alpha=1.0, include_top=True)`` in Gluon on
    ``(N, 3, image_size, image_size)`` images, raw logits (no softmax).

    Args:
        num_labels: classifier outputs (Keras's ``classes``).
        image_size: the square input side the model is built for; the paddings depend on
            it, so other sizes raise (at least 32, Keras's minimum): a ``ValueError`` when
            called imperatively, MXNet's shape-inference error inside a graph.

    Example:
        >>> net = KerasMobileNetV2(num_labels=3, image_size=32)
        >>> net.initialize()
        >>> net(mx.nd.zeros((1, 3, 32, 32))).shape
        (1, 3)
    """

    def __init__(self, num_labels: int = 10, image_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 (as Keras's), got {image_size}")
        self.image_size = image_size
        stem = make_divisible(32 * 1.0, 8)
        pads = same_padding(image_size, 3, 2)
        size = (image_size + pads[0] + pads[1] - 3) // 2 + 1
        with self.name_scope():
            # The stem's "same" stride-2 padding: asymmetric on an even side.
            self.pad = ZeroPadding2D(pads)
            self.conv1 = _NN.Conv2D(stem, 3, strides=2, use_bias=False, in_channels=3)
            self.bn_conv1 = _bn(stem)
            self.blocks = _NN.HybridSequential()
            channels = stem
            for block_id, (filters, stride, expansion) in enumerate(BLOCKS):
                block = InvertedResidual(channels, filters, stride, expansion, block_id, size)
                self.blocks.add(block)
                channels, size = block.out_channels, block.out_size
            self.conv_1 = _NN.Conv2D(1280, 1, use_bias=False, in_channels=channels)
            self.conv_1_bn = _bn(1280)
            self.predictions = _NN.Dense(num_labels, in_units=1280)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        side = self.image_size
        if isinstance(x, mx.nd.NDArray):
            if tuple(x.shape[2:]) != (side, side):
                raise ValueError(
                    f"KerasMobileNetV2 was built for {side}x{side} inputs, got {x.shape}"
                )
        else:
            # Inside a graph: broadcast_like fails shape inference unless H, W == side
            # (the paddings below were computed for that size); the result is x itself.
            fits = F.broadcast_like(F.zeros((1, 1, side, side)), x)
            x = F.where(fits, x, x)
        h = _relu6(F, self.bn_conv1(self.conv1(self.pad(x))))
        h = self.blocks(h)
        h = _relu6(F, self.conv_1_bn(self.conv_1(h)))
        return self.predictions(F.mean(h, axis=(2, 3)))  # GlobalAveragePooling2D


def keras_mobilenet_v2(num_labels: int = 10, image_size: int = 64) -> Any:
    """``keras.applications.MobileNetV2`` as an initialised :class:`KerasMobileNetV2`
    for ``(N, 3, image_size, image_size)`` images, ``num_labels`` logits (defaults: the
    zoo's 10 and 64).

    Example:
        >>> net = keras_mobilenet_v2()
        >>> net.bn_conv1.spec.preset, net.bn_conv1.spec.eps
        ('keras', 0.001)
    """
    net = KerasMobileNetV2(num_labels, image_size)
    # Keras's default kernel initializer, glorot_uniform, is Xavier's average uniform.
    net.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3.0))
    net(mx.nd.zeros((1, 3, image_size, image_size)))  # inference mode: no statistics move
    return net

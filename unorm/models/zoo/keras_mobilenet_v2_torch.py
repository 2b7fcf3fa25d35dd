"""``keras.applications.MobileNetV2`` in PyTorch: the zoo's ``keras_mobilenet_v2``
counterpart, layer for layer.

The source (``keras.applications.MobileNetV2(weights=None, alpha=1.0,
classifier_activation=None)``, :func:`unorm.models.zoo.sources_keras.keras_mobilenet_v2`)
is a stem convolution, 17 inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1
projection; the first block has no expansion; a residual Add where the stride is 1 and the
channels stay), a 1x1 convolution to 1280 channels, global average pooling and a Dense.
What has to match exactly, and is written out here:

- Padding. The stem is a stride-2 3x3 convolution with TensorFlow's ``"same"`` padding,
  which is asymmetric on even inputs (the extra row and column at the bottom and right);
  each stride-2 depthwise convolution is ``"valid"`` after Keras's ``ZeroPadding2D`` of
  ``imagenet_utils.correct_pad`` (``(k // 2 - 1 + size % 2, k // 2)`` per axis: on an
  even side one row on top less). Both are computed from the spatial size the layer sees,
  so the model is built for one ``image_size`` (as the Keras model is) and refuses other
  sizes. Stride-1 ``"same"`` 3x3 convolutions pad 1 on every side, symmetric.
- Convolutions without bias, ReLU6 (Keras's ``ReLU(6.0)``), Keras's depthwise kernel
  ``(kh, kw, C, 1)`` as a grouped ``nn.Conv2d`` with ``groups=C`` (the neutral checkpoint
  holds both as a grouped convolution).
- Every BatchNorm is :class:`unorm.torch.BatchNorm` with ``preset="keras"``, eps 1e-3 and
  Keras's momentum 0.999 (the weight of the old value; unorm's momentum ``1 - 0.999``), so
  a freshly built model trains its statistics as the Keras one does.
- Channel counts from Keras's ``_make_divisible`` at ``alpha=1.0``.

Layers are created in the order Keras creates them.

Example:
    >>> import torch
    >>> net = keras_mobilenet_v2(num_labels=10, image_size=64)
    >>> tuple(net.eval()(torch.zeros(2, 3, 64, 64)).shape)
    (2, 10)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unorm.torch import BatchNorm

__all__ = ["KerasMobileNetV2", "keras_mobilenet_v2"]

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
    adjust = 1 - size % 2
    return kernel // 2 - adjust, kernel // 2


def _bn(channels: int) -> BatchNorm:
    # Keras's momentum weighs the old value; unorm's the new one.
    return BatchNorm(
        channels, num_dims=4, preset="keras", eps=KERAS_EPS, momentum=1.0 - KERAS_MOMENTUM
    )


def _pad_module(pads: tuple[int, int]) -> nn.ZeroPad2d:
    # nn.ZeroPad2d takes (left, right, top, bottom); the maps here are square.
    return nn.ZeroPad2d((pads[0], pads[1], pads[0], pads[1]))


class InvertedResidual(nn.Module):
    """Keras MobileNetV2's ``_inverted_res_block``: 1x1 expansion (none in block 0),
    ZeroPadding2D of ``correct_pad`` and a ``"valid"`` 3x3 depthwise convolution where
    the stride is 2 (``"same"``, padding 1, where it is 1), 1x1 projection, each
    convolution followed by a BatchNorm, ReLU6 after the first two, and the input added
    where the stride is 1 and the channels stay.

    Args:
        in_channels: channels of the block's input.
        filters, stride, expansion: the block's row of :data:`BLOCKS`.
        block_id: its index (0 has no expansion, as in Keras).
        size: the side of the square map the block reads (for the padding).

    Example:
        >>> block = InvertedResidual(16, 24, 2, 6, block_id=1, size=32)
        >>> tuple(block.eval()(torch.zeros(1, 16, 32, 32)).shape)
        (1, 24, 16, 16)
    """

    def __init__(
        self, in_channels: int, filters: int, stride: int, expansion: int, block_id: int, size: int
    ) -> None:
        super().__init__()
        out_channels = make_divisible(int(filters * 1.0), 8)
        hidden = expansion * in_channels if block_id else in_channels
        self.expand: nn.Conv2d | None = None
        self.expand_bn: BatchNorm | None = None
        if block_id:
            self.expand = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.expand_bn = _bn(hidden)
        # Keras: ZeroPadding2D(correct_pad) + "valid" for stride 2, "same" for stride 1.
        pads = correct_pad(size, 3) if stride == 2 else same_padding(size, 3, 1)
        self.pad = _pad_module(pads)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, groups=hidden, bias=False)
        self.depthwise_bn = _bn(hidden)
        self.project = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = _bn(out_channels)
        self.residual = in_channels == out_channels and stride == 1
        self.out_channels = out_channels
        self.out_size = (size + pads[0] + pads[1] - 3) // stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on ``(N, C, H, W)`` maps."""
        h = x
        if self.expand is not None and self.expand_bn is not None:
            h = F.relu6(self.expand_bn(self.expand(h)))
        h = F.relu6(self.depthwise_bn(self.depthwise(self.pad(h))))
        h = self.project_bn(self.project(h))
        return x + h if self.residual else h


class KerasMobileNetV2(nn.Module):
    """``keras.applications.MobileNetV2(alpha=1.0, include_top=True)`` in PyTorch on
    ``(N, 3, image_size, image_size)`` images, raw logits (no softmax).

    Args:
        num_labels: classifier outputs (Keras's ``classes``).
        image_size: the square input side the model is built for; the paddings depend on
            it, so other sizes raise (at least 32, Keras's minimum).

    Example:
        >>> net = KerasMobileNetV2(num_labels=3, image_size=32)
        >>> tuple(net.eval()(torch.zeros(1, 3, 32, 32)).shape)
        (1, 3)
    """

    def __init__(self, num_labels: int = 10, image_size: int = 64) -> None:
        super().__init__()
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 (as Keras's), got {image_size}")
        self.image_size = image_size
        stem = make_divisible(32 * 1.0, 8)
        # The stem's "same" stride-2 padding: asymmetric on an even side.
        self.pad = _pad_module(same_padding(image_size, 3, 2))
        self.conv1 = nn.Conv2d(3, stem, 3, stride=2, bias=False)
        self.bn_conv1 = _bn(stem)
        size = (image_size + sum(same_padding(image_size, 3, 2)) - 3) // 2 + 1
        blocks = []
        channels = stem
        for block_id, (filters, stride, expansion) in enumerate(BLOCKS):
            block = InvertedResidual(channels, filters, stride, expansion, block_id, size)
            blocks.append(block)
            channels, size = block.out_channels, block.out_size
        self.blocks = nn.Sequential(*blocks)
        self.conv_1 = nn.Conv2d(channels, 1280, 1, bias=False)
        self.conv_1_bn = _bn(1280)
        self.predictions = nn.Linear(1280, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``(N, 3, image_size, image_size)`` images."""
        # The paddings were computed for one size: any other would be silently wrong.
        # (Two asserts, no `and`: torch.fx traces them, so the port reads the data flow.)
        message = f"KerasMobileNetV2 was built for {self.image_size}x{self.image_size} inputs"
        torch._assert(x.shape[2] == self.image_size, message)
        torch._assert(x.shape[3] == self.image_size, message)
        h = F.relu6(self.bn_conv1(self.conv1(self.pad(x))))
        h = self.blocks(h)
        h = F.relu6(self.conv_1_bn(self.conv_1(h)))
        return self.predictions(h.mean(dim=(2, 3)))  # GlobalAveragePooling2D


def keras_mobilenet_v2(num_labels: int = 10, image_size: int = 64) -> KerasMobileNetV2:
    """The zoo builder (:func:`unorm.models.zoo.build`): :class:`KerasMobileNetV2`.

    Example:
        >>> keras_mobilenet_v2(num_labels=10, image_size=64).predictions.out_features
        10
    """
    return KerasMobileNetV2(num_labels=num_labels, image_size=image_size)

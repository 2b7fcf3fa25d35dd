"""Framework-free plans of the zoo's MobileNetV2 and EfficientNet-B0, and the TensorFlow
"same" padding arithmetic their PyTorch sources write.

:func:`mobilenet_v2_plan` and :func:`efficientnet_b0_plan` list each convolution with the
numbers its source computes when it builds the network (channels, kernel, stride, groups,
the padding for an input of ``image_size``), so that the Keras and MXNet counterparts are
built from one table.

TensorFlow's "same" padding is asymmetric: where the total padding along an axis is
odd, the extra row or column goes after (bottom, right). PyTorch's and MXNet's own padding is
symmetric, so the sources pad explicitly before a convolution with no padding, and their
counterparts here do the same, with these numbers. The padding functions return
``(before, after)`` for one spatial axis.

Example:
    >>> [c.name for c in mobilenet_v2_plan(64).stem]
    ['first_conv', 'conv_3x3', 'reduce_1x1']
    >>> tf_padding(64, kernel=3, stride=2)
    (0, 1)
    >>> static_same_padding(64, kernel=3, stride=2)
    (0, 1)
    >>> tf_padding(32, kernel=3, stride=1)
    (1, 1)
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "Conv",
    "EfficientNetBlock",
    "EfficientNetPlan",
    "InvertedResidual",
    "MobileNetV2Plan",
    "efficientnet_b0_plan",
    "make_divisible",
    "mobilenet_v2_plan",
    "output_size",
    "static_same_padding",
    "tf_padding",
]


def tf_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """``transformers``' ``apply_tf_padding`` (MobileNetV1/V2) for an input of ``size``
    along one axis: total ``max(kernel - stride, 0)`` where ``size`` is a multiple of
    ``stride``, else ``max(kernel - size % stride, 0)``, split with the odd one after,
    each side then multiplied by ``dilation`` (as that function does).

    Example:
        >>> tf_padding(7, kernel=3, stride=2)
        (1, 1)
    """
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    before = total // 2
    return before * dilation, (total - before) * dilation


def static_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """``efficientnet_pytorch``'s ``Conv2dStaticSamePadding`` for an input of ``size``
    along one axis, fixed when the layer is built: the output is ``ceil(size / stride)``
    and the total padding ``max((out - 1) * stride + (kernel - 1) * dilation + 1 - size,
    0)``, split with the odd one after.

    Example:
        >>> static_same_padding(32, kernel=5, stride=2)
        (1, 2)
    """
    out = output_size(size, stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def output_size(size: int, stride: int) -> int:
    """A "same"-padded layer's output size, ``ceil(size / stride)``
    (``efficientnet_pytorch``'s ``calculate_output_image_size``).

    Example:
        >>> output_size(7, 2)
        4
    """
    return math.ceil(size / stride)


@dataclasses.dataclass(frozen=True)
class Conv:
    """One convolution of a plan (square kernel, no dilation).

    Attributes:
        name: the source's name for the layer (its module attribute).
        in_channels, out_channels, kernel, stride: as the source's ``nn.Conv2d``.
        groups: ``in_channels`` for a depthwise convolution, else 1.
        pad: ``((top, bottom), (left, right))`` zero padding applied before it.
        in_size: the side of its (square) input for the plan's ``image_size``, for
            which ``pad`` is computed.
        bias: whether it adds a bias (only the squeeze-and-excitation convolutions do).
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    in_size: int
    bias: bool = False

    @property
    def depthwise(self) -> bool:
        """One filter per input channel (``groups == in_channels == out_channels``)."""
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``min_value``,
    default ``divisor``), one more ``divisor`` where rounding lost over 10 %: the channel
    rounding of MobileNetV2 (``transformers``' ``make_divisible``) and EfficientNet
    (``efficientnet_pytorch``'s ``round_filters`` at width 1.0).

    Example:
        >>> make_divisible(16 * 6), make_divisible(10)
        (96, 16)
    """
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


# -- MobileNetV2 (transformers, MobileNetV2Config()) --------------------------------------

#: MobileNetV2Config()'s settings the counterparts are built for.
MOBILENET_V2_EPS = 1e-3  # layer_norm_eps
MOBILENET_V2_MOMENTUM = 0.997  # nn.BatchNorm2d(momentum=0.997): PyTorch's new-value weight
MOBILENET_V2_DROPOUT = 0.8  # classifier_dropout_prob
_MNV2_CHANNELS = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
_MNV2_STRIDES = [2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
_MNV2_EXPAND = 6.0
_MNV2_OUTPUT_STRIDE = 32
_MNV2_HEAD = 1280


@dataclasses.dataclass(frozen=True)
class InvertedResidual:
    """One MobileNetV2 inverted residual block: ``expand_1x1`` (ReLU6), ``conv_3x3``
    (depthwise, ReLU6), ``reduce_1x1`` (no activation), the input added where
    ``residual``."""

    convs: tuple[Conv, Conv, Conv]
    residual: bool


@dataclasses.dataclass(frozen=True)
class MobileNetV2Plan:
    """``transformers``' ``MobileNetV2ForImageClassification(MobileNetV2Config())``:
    the stem (``first_conv``, ``conv_3x3``, ``reduce_1x1``; the first layer is the
    expansion, so there is no ``expand_1x1``), 16 blocks, the 1x1 ``conv_1x1`` (ReLU6),
    average pooling, dropout ``MOBILENET_V2_DROPOUT``, the classifier. Every convolution
    is followed by a BatchNorm; every one but the ``reduce_1x1`` ones by ReLU6."""

    stem: tuple[Conv, Conv, Conv]
    blocks: tuple[InvertedResidual, ...]
    head: Conv


def _tf_pad(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    side = tf_padding(size, kernel, stride)
    return side, side


def mobilenet_v2_plan(image_size: int) -> MobileNetV2Plan:
    """The plan of ``MobileNetV2Config(image_size=image_size)`` (depth multiplier 1.0,
    channels divisible by 8, expand ratio 6, output stride 32, ``tf_padding``): the
    source pads in ``forward`` from the size it is given, so the padding here is the one
    for ``image_size`` inputs.

    Example:
        >>> plan = mobilenet_v2_plan(64)
        >>> len(plan.blocks), plan.head.out_channels, plan.stem[0].pad
        (16, 1280, ((0, 1), (0, 1)))
    """
    size = image_size

    def conv(name: str, cin: int, cout: int, kernel: int, stride: int, groups: int) -> Conv:
        nonlocal size
        made = Conv(name, cin, cout, kernel, stride, groups, _tf_pad(size, kernel, stride), size)
        size = output_size(size, stride)  # (size + pad - kernel) // stride + 1
        return made

    first = make_divisible(32)
    channels = [make_divisible(c) for c in _MNV2_CHANNELS]
    stem = (
        conv("first_conv", 3, first, 3, 2, 1),
        conv("conv_3x3", first, first, 3, 1, first),
        conv("reduce_1x1", first, channels[0], 1, 1, 1),
    )
    blocks = []
    current = 2
    for i, stride in enumerate(_MNV2_STRIDES):
        # Past the output stride the source turns strides into dilation; at 32, the
        # default, that happens only for the stride-1 blocks after it, a dilation of 1.
        if current == _MNV2_OUTPUT_STRIDE:
            if stride != 1:
                raise ValueError("output_stride below 32 needs dilated convolutions")
        else:
            current *= stride
        cin, cout = channels[i], channels[i + 1]
        wide = make_divisible(round(cin * _MNV2_EXPAND))
        convs = (
            conv("expand_1x1", cin, wide, 1, 1, 1),
            conv("conv_3x3", wide, wide, 3, stride, wide),
            conv("reduce_1x1", wide, cout, 1, 1, 1),
        )
        blocks.append(InvertedResidual(convs, residual=stride == 1 and cin == cout))
    # finegrained_output keeps 1280 only for depth multipliers below 1; at 1.0 the head
    # is make_divisible(1280 * 1.0), the same number.
    head = conv("conv_1x1", channels[-1], make_divisible(_MNV2_HEAD), 1, 1, 1)
    return MobileNetV2Plan(stem, tuple(blocks), head)


# -- EfficientNet-B0 (efficientnet_pytorch) ------------------------------------------------

#: EfficientNet-B0's global parameters the counterparts are built for.
EFFICIENTNET_EPS = 1e-3  # batch_norm_epsilon
EFFICIENTNET_MOMENTUM = 1 - 0.99  # nn.BatchNorm2d(momentum=1 - batch_norm_momentum)
EFFICIENTNET_DROPOUT = 0.2  # dropout_rate
# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage, the
# block strings 'r1_k3_s11_e1_i32_o16_se0.25', ... of efficientnet-b0, SE ratio 0.25.
_B0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_B0_SE_RATIO = 0.25
_B0_STEM = 32
_B0_HEAD = 1280


@dataclasses.dataclass(frozen=True)
class EfficientNetBlock:
    """One MBConv block: ``expand`` (``_expand_conv`` + ``_bn0`` + swish; None at expand
    ratio 1), ``depthwise`` (``_depthwise_conv`` + ``_bn1`` + swish), squeeze and
    excitation (average pool, ``se_reduce`` with bias, swish, ``se_expand`` with bias,
    sigmoid, times the map), ``project`` (``_project_conv`` + ``_bn2``), the input added
    where ``skip``."""

    expand: Conv | None
    depthwise: Conv
    se_reduce: Conv
    se_expand: Conv
    project: Conv
    skip: bool


@dataclasses.dataclass(frozen=True)
class EfficientNetPlan:
    """``EfficientNet.from_name('efficientnet-b0', image_size=...)``: ``_conv_stem`` +
    ``_bn0`` + swish, 16 MBConv blocks, ``_conv_head`` + ``_bn1`` + swish, average
    pooling, dropout ``EFFICIENTNET_DROPOUT``, ``_fc``."""

    stem: Conv
    blocks: tuple[EfficientNetBlock, ...]
    head: Conv


def efficientnet_b0_plan(image_size: int) -> EfficientNetPlan:
    """The plan of ``efficientnet-b0`` built for ``image_size`` (width and depth 1.0, so
    ``round_filters`` and ``round_repeats`` keep the table's numbers): every padding is
    ``Conv2dStaticSamePadding``'s, fixed from the size each layer's input has for
    ``image_size`` images, as the source fixes it at construction.

    Example:
        >>> plan = efficientnet_b0_plan(64)
        >>> len(plan.blocks), plan.blocks[0].expand, plan.blocks[1].se_reduce.out_channels
        (16, None, 4)
    """

    def conv(
        name: str,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        size: int,
        groups: int = 1,
        bias: bool = False,
    ) -> Conv:
        side = static_same_padding(size, kernel, stride)
        return Conv(name, cin, cout, kernel, stride, groups, (side, side), size, bias)

    stem_out = make_divisible(_B0_STEM)
    stem = conv("_conv_stem", 3, stem_out, 3, 2, image_size)
    size = output_size(image_size, 2)
    blocks = []
    for repeats, kernel, stride, ratio, cin, cout in _B0_STAGES:
        cin, cout = make_divisible(cin), make_divisible(cout)
        for r in range(repeats):
            # Repeats keep the output size: the stage's stride and input only come first.
            first_in, s = (cin, stride) if r == 0 else (cout, 1)
            wide = first_in * ratio
            squeezed = max(1, int(first_in * _B0_SE_RATIO))  # of the block's input filters
            expand = None if ratio == 1 else conv("_expand_conv", first_in, wide, 1, 1, size)
            depthwise = conv("_depthwise_conv", wide, wide, kernel, s, size, groups=wide)
            size = output_size(size, s)
            blocks.append(
                EfficientNetBlock(
                    expand=expand,
                    depthwise=depthwise,
                    se_reduce=conv("_se_reduce", wide, squeezed, 1, 1, 1, bias=True),
                    se_expand=conv("_se_expand", squeezed, wide, 1, 1, 1, bias=True),
                    project=conv("_project_conv", wide, cout, 1, 1, size),
                    skip=s == 1 and first_in == cout,
                )
            )
    head = conv(
        "_conv_head", make_divisible(_B0_STAGES[-1][5]), make_divisible(_B0_HEAD), 1, 1, size
    )
    return EfficientNetPlan(stem, tuple(blocks), head)

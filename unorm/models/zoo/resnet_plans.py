"""Framework-free plans of the zoo's ResNets: ``transformers``' ResNet-18/50 and
``keras.applications.ResNet50``, one table each, from which every counterpart is built.

The two families differ where ports go wrong silently:

- ``transformers`` (``modeling_resnet.py``): convolutions without bias, padding
  ``kernel // 2`` on both sides; the stem's max pooling pads with -inf (PyTorch's
  ``MaxPool2d(3, 2, padding=1)``); a projection shortcut (1x1 convolution + BatchNorm)
  only where the channels or the stride change; in a bottleneck the stride sits in the
  3x3 convolution unless ``downsample_in_bottleneck``; BatchNorm eps 1e-5, PyTorch's
  momentum 0.1 (the new value's weight); average pooling to ``(C, 1, 1)``, then
  ``Flatten`` and ``Linear``.
- ``keras.applications`` (``resnet.py``, v1): biased convolutions, the stride in the
  first 1x1 convolution of a block, explicit ``ZeroPadding2D`` before the 7x7 stem and
  before the max pooling (zeros, not -inf: the same maximum after a ReLU), every block of
  a stack's first position with a projection shortcut, BatchNorm eps 1.001e-5 and Keras's
  momentum 0.99 (the old value's weight), ``GlobalAveragePooling2D`` then ``Dense``.

Example:
    >>> [len(s.blocks) for s in hf_resnet_plan("resnet50").stages]
    [3, 4, 6, 3]
    >>> hf_resnet_plan("resnet18").stages[1].blocks[0].shortcut
    True
    >>> [c.stride for c in hf_resnet_plan("resnet50").stages[1].blocks[0].convs]
    [1, 2, 1]
    >>> keras_resnet50_plan().stacks[0].blocks[0].convs[0].name
    'conv2_block1_1_conv'
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "HF_RESNET_EPS",
    "HF_RESNET_MOMENTUM",
    "KERAS_RESNET_EPS",
    "KERAS_RESNET_MOMENTUM",
    "HFBlock",
    "HFConv",
    "HFResNetPlan",
    "HFStage",
    "KerasBlock",
    "KerasConv",
    "KerasResNetPlan",
    "KerasStack",
    "hf_resnet_plan",
    "keras_resnet50_plan",
]

# -- transformers' ResNet -------------------------------------------------------------------

#: ``nn.BatchNorm2d``'s defaults, which every ``transformers`` ResNet BatchNorm keeps.
HF_RESNET_EPS = 1e-5
HF_RESNET_MOMENTUM = 0.1  # PyTorch's momentum: the new batch statistic's weight


@dataclasses.dataclass(frozen=True)
class HFConv:
    """One ``ResNetConvLayer`` (or a shortcut's convolution): ``nn.Conv2d(bias=False,
    padding=kernel // 2)``, ``nn.BatchNorm2d``, then ReLU where ``activation``.

    Attributes:
        in_channels, out_channels, kernel, stride: as the source's ``nn.Conv2d``.
        activation: a ReLU follows the BatchNorm (the last convolution of a block and
            the shortcut have none).
    """

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    activation: bool = True

    @property
    def padding(self) -> int:
        """The symmetric zero padding of the source's convolution (``kernel // 2``; a
        shortcut has none, and its kernel of 1 gives 0 too)."""
        return self.kernel // 2


@dataclasses.dataclass(frozen=True)
class HFBlock:
    """One ``ResNetBasicLayer`` or ``ResNetBottleNeckLayer``: ``layer`` (the
    convolutions ``convs``, in order), added to the input or, where ``shortcut``, to
    ``ResNetShortCut`` (1x1 convolution with the block's stride + BatchNorm) of it, then
    ReLU. The source registers ``shortcut`` before ``layer`` and runs it after."""

    convs: tuple[HFConv, ...]
    shortcut: bool
    in_channels: int
    out_channels: int
    stride: int


@dataclasses.dataclass(frozen=True)
class HFStage:
    """One ``ResNetStage``: its blocks (``layers``), the first one changing channels or
    stride."""

    blocks: tuple[HFBlock, ...]


@dataclasses.dataclass(frozen=True)
class HFResNetPlan:
    """``ResNetForImageClassification(config)``: the stem (``embedder``: 7x7 convolution
    with stride 2, BatchNorm, ReLU; ``pooler``: max pooling 3, stride 2, padding 1), the
    stages of the encoder, average pooling to 1x1, ``Flatten`` and ``Linear`` from
    ``hidden_sizes[-1]`` features."""

    embedder: HFConv
    stages: tuple[HFStage, ...]
    features: int


#: The configurations of :mod:`unorm.models.zoo.sources_torch`: ``layer_type``,
#: ``depths``, ``hidden_sizes`` (``embedding_size`` 64, ``downsample_in_first_stage`` and
#: ``downsample_in_bottleneck`` False: ``ResNetConfig``'s defaults).
_HF_CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)),
}
_HF_EMBEDDING = 64
_HF_REDUCTION = 4  # ResNetBottleNeckLayer's default


def _hf_block(
    layer_type: str, cin: int, cout: int, stride: int, downsample_in_bottleneck: bool
) -> HFBlock:
    if layer_type == "basic":
        convs: tuple[HFConv, ...] = (
            HFConv(cin, cout, 3, stride),
            HFConv(cout, cout, 3, 1, activation=False),
        )
    else:
        reduced = cout // _HF_REDUCTION
        first, middle = (stride, 1) if downsample_in_bottleneck else (1, stride)
        convs = (
            HFConv(cin, reduced, 1, first),
            HFConv(reduced, reduced, 3, middle),
            HFConv(reduced, cout, 1, 1, activation=False),
        )
    return HFBlock(convs, cin != cout or stride != 1, cin, cout, stride)


def hf_resnet_plan(
    name: str, downsample_in_first_stage: bool = False, downsample_in_bottleneck: bool = False
) -> HFResNetPlan:
    """The plan of the zoo's ``name`` (``"resnet18"`` or ``"resnet50"``), as
    ``ResNetEncoder`` and ``ResNetStage`` build it: stage 0 reads the stem's 64 channels
    with stride 1 (2 where ``downsample_in_first_stage``), every later stage starts with
    stride 2; only a stage's first block changes channels or stride.

    Raises ``ValueError`` naming the choices for another ``name``.

    Example:
        >>> plan = hf_resnet_plan("resnet18")
        >>> plan.embedder.kernel, plan.embedder.padding, plan.features
        (7, 3, 512)
    """
    if name not in _HF_CONFIGS:
        raise ValueError(f"name must be one of {sorted(_HF_CONFIGS)}, got {name!r}")
    layer_type, depths, hidden = _HF_CONFIGS[name]
    stages = []
    cin = _HF_EMBEDDING
    for index, (depth, cout) in enumerate(zip(depths, hidden, strict=True)):
        stride = 2 if index > 0 or downsample_in_first_stage else 1
        blocks = [_hf_block(layer_type, cin, cout, stride, downsample_in_bottleneck)]
        blocks += [
            _hf_block(layer_type, cout, cout, 1, downsample_in_bottleneck) for _ in range(depth - 1)
        ]
        stages.append(HFStage(tuple(blocks)))
        cin = cout
    return HFResNetPlan(HFConv(3, _HF_EMBEDDING, 7, 2), tuple(stages), hidden[-1])


# -- keras.applications.ResNet50 -----------------------------------------------------------

#: ``keras.applications.ResNet50``'s BatchNorm settings: eps 1.001e-5, Keras's default
#: momentum 0.99 (the old value's weight), which is 1 - 0.99 in unorm's convention.
KERAS_RESNET_EPS = 1.001e-5
KERAS_RESNET_MOMENTUM = 1.0 - 0.99  # as BatchNormSpec.from_native("keras") computes it


@dataclasses.dataclass(frozen=True)
class KerasConv:
    """One biased ``Conv2D`` of ``keras.applications.ResNet50`` and its BatchNorm.

    Attributes:
        name: the Keras layer name of the convolution (``conv2_block1_1_conv``); its
            BatchNorm's ends in ``_bn`` instead of ``_conv``, its ReLU in ``_relu``.
        in_channels, out_channels, kernel, stride: as the layer's.
        padding: symmetric zero padding of its input: 1 for the 3x3 convolutions
            (``"SAME"`` at stride 1 is symmetric for an odd kernel), 3 for the stem
            (``conv1_pad``, a layer of its own before the ``"valid"`` convolution), 0
            for the other ``"valid"`` ones.
        activation: a ReLU follows the BatchNorm.
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    activation: bool

    @property
    def bn_name(self) -> str:
        """The Keras name of the BatchNorm after it."""
        return self.name[: -len("_conv")] + "_bn"

    @property
    def relu_name(self) -> str:
        """The Keras name of the ReLU after the BatchNorm (where ``activation``)."""
        return self.name[: -len("_conv")] + "_relu"


@dataclasses.dataclass(frozen=True)
class KerasBlock:
    """``residual_block_v1``: ``shortcut`` (``{name}_0_conv`` with the block's stride +
    BatchNorm; None: the identity), created first, then ``convs`` (``_1`` 1x1 with the
    stride, ``_2`` 3x3, ``_3`` 1x1 to 4x the filters), ``Add([shortcut, x])``
    (``{name}_add``) and ReLU (``{name}_out``)."""

    name: str
    shortcut: KerasConv | None
    convs: tuple[KerasConv, KerasConv, KerasConv]


@dataclasses.dataclass(frozen=True)
class KerasStack:
    """``stack_residual_blocks_v1``: the first block with a projection shortcut."""

    blocks: tuple[KerasBlock, ...]


@dataclasses.dataclass(frozen=True)
class KerasResNetPlan:
    """``ResNet50(weights=None)``: ``conv1_pad`` (3), ``conv1_conv`` (7x7, stride 2),
    ``conv1_bn``, ``conv1_relu``, ``pool1_pad`` (1), ``pool1_pool`` (3, stride 2,
    valid), the stacks ``conv2`` to ``conv5``, ``avg_pool`` (global average) and
    ``predictions`` (``Dense`` from ``features``)."""

    stem: KerasConv
    stacks: tuple[KerasStack, ...]
    features: int


# (filters, blocks, stride of the first block) of conv2 .. conv5 in ResNet50's stack_fn.
_KERAS_STACKS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def keras_resnet50_plan() -> KerasResNetPlan:
    """The plan of ``keras.applications.ResNet50``, with Keras's layer names.

    Example:
        >>> plan = keras_resnet50_plan()
        >>> [len(s.blocks) for s in plan.stacks], plan.stem.padding, plan.features
        ([3, 4, 6, 3], 3, 2048)
    """
    stem = KerasConv("conv1_conv", 3, 64, 7, 2, 3, True)
    stacks = []
    cin = 64
    for index, (filters, count, stride1) in enumerate(_KERAS_STACKS):
        blocks = []
        for b in range(1, count + 1):
            name = f"conv{index + 2}_block{b}"
            stride = stride1 if b == 1 else 1
            shortcut = (
                KerasConv(f"{name}_0_conv", cin, 4 * filters, 1, stride, 0, False)
                if b == 1
                else None
            )
            convs = (
                KerasConv(f"{name}_1_conv", cin, filters, 1, stride, 0, True),
                KerasConv(f"{name}_2_conv", filters, filters, 3, 1, 1, True),
                KerasConv(f"{name}_3_conv", filters, 4 * filters, 1, 1, 0, False),
            )
            blocks.append(KerasBlock(name, shortcut, convs))
            cin = 4 * filters
        stacks.append(KerasStack(tuple(blocks)))
    return KerasResNetPlan(stem, tuple(stacks), cin)

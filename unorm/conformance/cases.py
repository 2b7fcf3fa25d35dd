"""The conformance cases, declared once and framework-free.

Every case is a frozen dataclass with a unique ``name`` and a fixed ``seed`` (the CRC-32
of its name, so the same name always draws the same inputs). Inputs are generated in
NumPy (:mod:`conformance.data`); expected values come from :mod:`unorm.reference` at run
time (:mod:`conformance.expected`). Five kinds:

- :class:`BatchNormCase`: a layer built from a preset and settings, driven through a
  sequence of steps (``train`` = training forward and backward, ``forward`` = training
  forward only, ``eval`` = inference forward and backward); outputs, gradients and buffers
  are compared after every step.
- :class:`AGCCase`: named parameters of known layer kinds, given in a *logical* layout
  (below) that each adapter transforms into its framework's layout.
- :class:`SyncCase`: cross-replica BatchNorm over uneven (and empty) shards, compared with
  the reference on the concatenated batch.
- :class:`ErrorCase`: a bad input or setting that must raise ``ValueError`` everywhere.
- :class:`WSCase`: a 2-D convolution with Scaled Weight Standardisation
  (``ScaledStdConv2d`` / ``ScaledStdConv2D``): output and gradients with respect to the
  input, weight, gain and bias; or, for bad sizes (``fan_in`` 0), the ``ValueError``.
  Inputs are channels-first ``(N, C, H, W)`` and weights ``(O, C/groups, kh, kw)`` (the
  logical ``conv`` layout); each adapter moves them into its framework's layout.

Logical AGC layouts (unit axes in :data:`LOGICAL_UNIT_AXES`): ``dense`` ``(out, in)``,
``conv`` ``(out, in, *k)``, ``conv_transpose`` ``(in, out, *k)``, ``depthwise_conv``
``(in, multiplier, *k)`` (output channel ``i * multiplier + m``), ``embedding``
``(rows, dim)``. Parameters of rank <= 1 are one unit.

Example:
    >>> case = get_case("bn/rank4/axis-first")
    >>> case.shape, case.spec().axis
    ((4, 3, 5, 4), 1)
    >>> len({c.name for c in all_cases()}) == len(all_cases())
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from unorm._core.layer_kinds import LOGICAL_UNIT_AXES
from unorm._core.registry import plugins_in_order
from unorm.spec import PRESETS, BatchNormSpec, ScaledWSSpec

__all__ = [
    "FOLD_PRODUCERS",
    "LOGICAL_UNIT_AXES",
    "MODE_SETTINGS",
    "PUBLIC_SETTINGS",
    "SYNC_STRATEGIES",
    "AGCCase",
    "AGCParam",
    "AfterCase",
    "BatchNormCase",
    "Case",
    "Data",
    "ErrorCase",
    "FoldCase",
    "Step",
    "SyncCase",
    "WSCase",
    "all_cases",
    "get_case",
    "seed_of",
    "select",
]

StepMode = Literal["train", "forward", "eval"]
#: How a masked case's mask keeps values (:func:`conformance.data.batchnorm_mask`):
#: ``partial`` drops about a third of the positions (every feature keeps several),
#: ``nothing`` keeps no value, ``feature`` keeps nothing of feature 0 (a mask along the
#: feature axis, which must not be the last one).
MaskRecipe = Literal["partial", "nothing", "feature"]

#: Message fragments of the error cases (what the message names, what it expected).
_ONE_VALUE = "more than 1 value per channel"
_CLIPPING = ("clipping", "> 0")
_EPS = ("eps", ">= 0")

#: Settings a case may give on top of its preset: the ones every backend's public
#: constructor takes (unorm.torch folds ``center``/``scale`` into ``affine``).
PUBLIC_SETTINGS = ("eps", "momentum", "center", "scale", "track_running_stats")
#: Settings of the BatchNorm training modes (SPEC.md section 2, *Batch Renormalization*,
#: *Ghost batches*) that the ``renorm/...`` and ``ghost/...`` cases give: every backend's
#: unorm constructor takes them (the bounds as its one ``renorm_clipping`` dictionary,
#: ``adapter.constructor_settings``).
MODE_SETTINGS = (
    "renorm",
    "renorm_rmax",
    "renorm_rmin",
    "renorm_dmax",
    "renorm_momentum",
    "virtual_batch_size",
    "ghost_running",
)


def seed_of(name: str) -> int:
    """The fixed seed of a case: the CRC-32 of its name (stable across processes).

    Example:
        >>> seed_of("bn/rank2")
        3598769915
    """
    return zlib.crc32(name.encode())


@dataclasses.dataclass(frozen=True)
class Step:
    """One call of the layer: its mode and, optionally, a non-finite value in its batch.

    ``nonfinite`` puts a NaN or +inf at the first position of feature 0.
    """

    mode: StepMode
    nonfinite: Literal["nan", "inf"] | None = None


@dataclasses.dataclass(frozen=True)
class Data:
    """How a BatchNorm case draws its inputs: normal(``loc``, ``scale``), or all ``loc``."""

    loc: float = 0.0
    scale: float = 1.0
    constant: bool = False


TRAIN_EVAL = (Step("train"), Step("eval"))
SEQUENCE = (Step("train"), Step("train"), Step("train"), Step("eval"))


@dataclasses.dataclass(frozen=True)
class BatchNormCase:
    """A BatchNorm layer driven through ``steps``; compared after every step.

    ``mask`` (SPEC.md section 2, *Masked batches*) gives every step a mask in Keras's
    form, ``x.shape[:-1]``, broadcast over the last axis; only columns whose layers take
    a mask run such a case.

    Example:
        >>> BatchNormCase("bn/x", shape=(4, 3), settings=(("eps", 0.1),)).spec().eps
        0.1
    """

    name: str
    shape: tuple[int, ...]
    axis: int = 1
    dtype: str = "float32"
    preset: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    steps: tuple[Step, ...] = TRAIN_EVAL
    data: Data = Data()
    seed: int = -1
    mask: MaskRecipe | None = None
    kind: str = dataclasses.field(default="batchnorm", init=False)

    def __post_init__(self) -> None:
        if self.seed == -1:
            object.__setattr__(self, "seed", seed_of(self.name))

    def spec(self) -> BatchNormSpec:
        """The case's settings in unorm's convention."""
        return BatchNormSpec.from_preset(self.preset, axis=self.axis, **dict(self.settings))

    @property
    def num_features(self) -> int:
        """``C``, the size of the feature axis."""
        return self.shape[self.axis]


@dataclasses.dataclass(frozen=True)
class AGCParam:
    """One parameter: its owning layer, that layer's kind, its role and logical shape.

    ``recipe`` says how weight and gradient are drawn (:mod:`conformance.data`).
    """

    layer: str
    kind: str
    role: str
    shape: tuple[int, ...]
    recipe: str = "mixed"

    @property
    def name(self) -> str:
        """``layer.role``, the parameter's name as a PyTorch module would give it."""
        return f"{self.layer}.{self.role}"


@dataclasses.dataclass(frozen=True)
class AGCCase:
    """AGC over a few named parameters; ``exclude`` names parameters left unclipped.

    With ``error`` the settings are invalid (``clipping <= 0``, ``eps < 0``, non-finite;
    ``SPEC.md`` section 5, edge case 8; an ``exclude`` or ``unit_axes`` entry naming no
    parameter, a ``unit_axes`` of the wrong kind or out of range) and every backend must
    raise ``ValueError`` whose message holds every fragment of ``message`` (what it names
    and what it expected). ``unit_axes`` is given to the backend as it is;
    ``unit_axes_by_name`` as a mapping from parameter names to axes.
    """

    name: str
    params: tuple[AGCParam, ...]
    dtype: str = "float32"
    clipping: float = 0.01
    eps: float = 1e-3
    exclude: tuple[str, ...] = ()
    unit_axes: Any = None
    unit_axes_by_name: tuple[tuple[str, Any], ...] = ()
    error: bool = False
    message: tuple[str, ...] = ()
    seed: int = -1
    kind: str = dataclasses.field(default="agc", init=False)

    def __post_init__(self) -> None:
        if self.seed == -1:
            object.__setattr__(self, "seed", seed_of(self.name))


#: How a cross-replica case's replicas run (:attr:`SyncCase.strategy`): ``replicas`` each
#: column's own way (one gloo process per replica, ``MirroredStrategy`` over logical CPUs,
#: one ``mx.cpu(k)`` each, a mapped axis); ``ddp`` PyTorch's ``DistributedDataParallel``
#: over one gloo process per replica; ``multi-worker`` TensorFlow's
#: ``MultiWorkerMirroredStrategy``, one worker process per replica on 127.0.0.1;
#: ``data-parallel`` ``keras.distribution.DataParallel`` on Keras's JAX backend, one host
#: device per replica, each shard padded to the longest and masked.
SYNC_STRATEGIES = ("replicas", "ddp", "multi-worker", "data-parallel")


@dataclasses.dataclass(frozen=True)
class SyncCase:
    """Cross-replica BatchNorm: one training step over ``shards`` (batch sizes per replica).

    ``shape`` is the shape of one sample (features and spatial axes, batch excluded);
    ``axis`` indexes the full input (batch first). ``strategy`` (one of
    :data:`SYNC_STRATEGIES`) is how the replicas run; a column that cannot run it reports
    the case unsupported.
    """

    name: str
    shards: tuple[int, ...]
    shape: tuple[int, ...]
    axis: int = 1
    dtype: str = "float32"
    preset: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    strategy: str = "replicas"
    seed: int = -1
    kind: str = dataclasses.field(default="sync", init=False)

    def __post_init__(self) -> None:
        if self.strategy not in SYNC_STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: one of {SYNC_STRATEGIES}")
        if self.seed == -1:
            object.__setattr__(self, "seed", seed_of(self.name))

    def spec(self) -> BatchNormSpec:
        """The case's settings in unorm's convention."""
        return BatchNormSpec.from_preset(self.preset, axis=self.axis, **dict(self.settings))

    @property
    def num_features(self) -> int:
        """``C``, the size of the feature axis."""
        return (0, *self.shape)[self.axis]


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    """A layer with ``num_features`` features fed ``shape`` inputs of ``dtype`` in a
    training forward pass: must raise ``error``.

    ``preset`` may name no preset at all (the error is then raised when the layer is
    built). The state after the failed call must equal the state before it. On unorm's
    own columns the message must hold every fragment of ``message`` (what it names and
    what it expected: the same mistake gives the same message on every backend); the
    native columns' messages are their frameworks'.
    """

    name: str
    shape: tuple[int, ...]
    num_features: int
    axis: int = 1
    dtype: str = "float32"
    preset: str | None = None
    error: str = "ValueError"
    message: tuple[str, ...] = ()
    seed: int = -1
    kind: str = dataclasses.field(default="error", init=False)

    def __post_init__(self) -> None:
        if self.seed == -1:
            object.__setattr__(self, "seed", seed_of(self.name))


@dataclasses.dataclass(frozen=True)
class WSCase:
    """A ``ScaledStdConv`` 2-D convolution (stride 1, no dilation) on one batch.

    ``padding`` is ``"valid"`` or ``"same"`` (odd kernels only: symmetric). Weights are
    drawn ``normal(0.5, 1) * weight_scale`` (an offset, so that the mean subtraction
    matters; a small scale puts ``var * fan_in`` under deepmind's floor); with
    ``constant_unit`` output channel 0 has one value everywhere (``var = 0``). With
    ``error`` the sizes are bad (``fan_in`` 0) and every backend must raise ``ValueError``.

    Example:
        >>> case = WSCase("ws/x", 4, 6, (1, 3), groups=2)
        >>> case.weight_shape, case.output_shape, case.spec().eps
        ((6, 2, 1, 3), (2, 6, 6, 4), 0.0001)
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    groups: int = 1
    style: str = "deepmind"
    eps: float | None = None
    padding: Literal["valid", "same"] = "valid"
    batch: int = 2
    size: tuple[int, int] = (6, 6)
    dtype: str = "float32"
    weight_scale: float = 1.0
    constant_unit: bool = False
    error: bool = False
    seed: int = -1
    kind: str = dataclasses.field(default="ws", init=False)

    def __post_init__(self) -> None:
        if self.seed == -1:
            object.__setattr__(self, "seed", seed_of(self.name))

    def spec(self) -> ScaledWSSpec:
        """The case's Scaled WS settings (the style's eps when ``eps`` is None)."""
        return ScaledWSSpec(style=self.style, eps=self.eps)  # type: ignore[arg-type]

    @property
    def pads(self) -> tuple[int, int]:
        """Zero padding on each side of H and W."""
        if self.padding == "valid":
            return (0, 0)
        return (self.kernel[0] // 2, self.kernel[1] // 2)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(N, C, H, W)``."""
        return (self.batch, self.in_channels, *self.size)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """``(O, C/groups, kh, kw)``, the logical ``conv`` layout."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """``(N, O, H_out, W_out)``."""
        (ph, pw), (kh, kw) = self.pads, self.kernel
        h, w = self.size
        return (self.batch, self.out_channels, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)


#: The producer layers of the ``fold/...`` cases (SPEC.md section 8, *Fold*) and their
#: layer kind: a 2-D convolution (grouped with ``groups > 1``), a depthwise one, a 2-D
#: transposed convolution (grouped too) and a dense layer.
FOLD_PRODUCERS = {
    "conv": "conv",
    "depthwise": "depthwise_conv",
    "conv_transpose": "conv_transpose",
    "dense": "dense",
}


@dataclasses.dataclass(frozen=True)
class FoldCase:
    """A producer layer followed by a BatchNorm with given running statistics, folded
    (SPEC.md section 8, *Fold*): the folded model's inference output against the
    reference's unfolded ``producer`` then inference BatchNorm.

    ``producer`` is a key of :data:`FOLD_PRODUCERS`; the input is ``(batch, in_channels,
    *size)`` channels-first (``(batch, in_channels)`` for ``dense``); the weight is drawn
    in the logical layout of the producer's kind (``conv (O, I/g, kh, kw)``,
    ``conv_transpose (I, O/g, kh, kw)``, ``depthwise_conv (I, M, kh, kw)``, ``dense
    (out, in)``; ``out_channels`` is ``I * M`` for ``depthwise``). ``native_bn`` puts the
    framework's own BatchNorm layer after the producer instead of unorm's (a unorm column
    folds either; a native column only ever has its own). Stride 1, no padding.

    Example:
        >>> case = get_case("fold/conv_transpose/grouped")
        >>> case.weight_shape, case.output_shape
        ((4, 3, 2, 2), (2, 6, 6, 6))
    """

    name: str
    producer: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (3, 3)
    groups: int = 1
    batch: int = 2
    size: tuple[int, int] = (5, 5)
    native_bn: bool = False
    bias: bool = True
    dtype: str = "float32"
    preset: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    seed: int = -1
    kind: str = dataclasses.field(default="fold", init=False)

    def __post_init__(self) -> None:
        if self.producer not in FOLD_PRODUCERS:
            raise ValueError(f"unknown producer {self.producer!r}: one of {list(FOLD_PRODUCERS)}")
        if self.seed == -1:
            object.__setattr__(self, "seed", seed_of(self.name))

    def spec(self) -> BatchNormSpec:
        """The BatchNorm's settings (channels-first: axis 1)."""
        return BatchNormSpec.from_preset(self.preset, axis=1, **dict(self.settings))

    @property
    def layer_kind(self) -> str:
        """The producer's layer kind (section 5's table)."""
        return FOLD_PRODUCERS[self.producer]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(N, C, H, W)``, or ``(N, in)`` for a dense producer."""
        if self.producer == "dense":
            return (self.batch, self.in_channels)
        return (self.batch, self.in_channels, *self.size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight in the logical layout of the producer's kind."""
        i, o, k = self.in_channels, self.out_channels, self.kernel
        if self.producer == "dense":
            return (o, i)
        if self.producer == "depthwise":
            return (i, o // i, *k)
        if self.producer == "conv_transpose":
            return (i, o // self.groups, *k)
        return (o, i // self.groups, *k)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The producer's (and the BatchNorm's) output, channels-first."""
        if self.producer == "dense":
            return (self.batch, self.out_channels)
        (h, w), (kh, kw) = self.size, self.kernel
        if self.producer == "conv_transpose":
            return (self.batch, self.out_channels, h + kh - 1, w + kw - 1)
        return (self.batch, self.out_channels, h - kh + 1, w - kw + 1)


#: What an :class:`AfterCase` does (SPEC.md section 8 and section 2, *Accumulated
#: micro-batches*).
AfterOp = Literal["recalibrate", "frozen", "accumulate"]


@dataclasses.dataclass(frozen=True)
class AfterCase:
    """A BatchNorm layer after (or across) training steps: ``recalibrate``, ``frozen`` or
    ``accumulate``. ``shape`` is one sample's shape (features and spatial axes, batch
    excluded, as :class:`SyncCase`); ``batches`` the batch sizes.

    - ``recalibrate``: one training step on a warm-up batch (so that the running statistics
      start elsewhere), then ``recalibrate`` over ``batches``: the running statistics
      against the exact statistics of all their samples (``reference.recalibrated_stats``).
      ``drift`` shifts batch ``k``'s mean by ``k * drift`` (the spread of the batch means
      that averaging per-batch variances leaves out, facebookresearch/pycls#93).
    - ``frozen``: one training step on a warm-up batch, then the layer frozen
      (``trainable`` scale and shift or fixed ones), then a training step per batch and an
      inference step: the inference formula with the warm-up's running statistics, which
      never change.
    - ``accumulate``: ``len(batches)`` training micro-batches inside one accumulation of
      ``steps`` calls per step (``steps`` 0: all of them in one step), then an inference
      step; ``nonfinite`` puts a NaN into that micro-batch (the guard skips its whole step).

    Example:
        >>> case = get_case("accumulate/uneven")
        >>> case.batches, case.spec().momentum
        ((5, 3, 2), 0.1)
    """

    name: str
    op: AfterOp
    batches: tuple[int, ...]
    shape: tuple[int, ...] = (3, 4)
    axis: int = 1
    dtype: str = "float32"
    preset: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    trainable: bool = False
    steps: int = 0
    nonfinite: int | None = None
    drift: float = 0.0
    seed: int = -1

    def __post_init__(self) -> None:
        if self.seed == -1:
            object.__setattr__(self, "seed", seed_of(self.name))

    @property
    def kind(self) -> str:
        """The case's kind: its ``op``."""
        return self.op

    def spec(self) -> BatchNormSpec:
        """The case's settings in unorm's convention."""
        return BatchNormSpec.from_preset(self.preset, axis=self.axis, **dict(self.settings))

    @property
    def num_features(self) -> int:
        """``C``, the size of the feature axis."""
        return (0, *self.shape)[self.axis]

    @property
    def per_step(self) -> int:
        """Micro-batches per accumulated step."""
        return self.steps or len(self.batches)


Case = BatchNormCase | AGCCase | SyncCase | ErrorCase | WSCase | FoldCase | AfterCase


def _s(**settings: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(settings.items()))


def _batchnorm_cases() -> list[BatchNormCase]:
    bn = BatchNormCase
    out = [
        # Ranks 2-5, feature axis first (channels-first) and last (channels-last).
        bn("bn/rank2", (8, 5)),
        bn("bn/rank3/axis-first", (4, 3, 7)),
        bn("bn/rank3/axis-last", (4, 7, 3), axis=-1),
        bn("bn/rank4/axis-first", (4, 3, 5, 4)),
        bn("bn/rank4/axis-last", (4, 5, 4, 3), axis=-1),
        bn("bn/rank5/axis-first", (2, 3, 3, 4, 2)),
        bn("bn/rank5/axis-last", (2, 3, 4, 2, 3), axis=-1),
        # Batch sizes: 1 (with spatial extent), 2, odd, large.
        bn("bn/batch1/axis-first", (1, 3, 4, 4)),
        bn("bn/batch1/axis-last", (1, 4, 4, 3), axis=-1),
        bn("bn/batch2/rank2", (2, 4)),
        bn("bn/batch2/rank4", (2, 3, 2, 2)),
        bn("bn/batch-odd", (7, 3, 3, 3)),
        bn("bn/batch-large/rank2", (1024, 16)),
        bn("bn/batch-large/rank4", (256, 8, 4, 4)),
        # Statistics that are hard to get right.
        bn("bn/constant", (6, 3, 2, 2), data=Data(loc=3.5, constant=True)),
        bn("bn/large-offset", (16, 4, 8, 8), data=Data(loc=1e4, scale=1.0)),
        bn("bn/tiny-variance", (16, 4, 4, 4), data=Data(loc=0.5, scale=1e-3)),
        # Settings.
        bn("bn/eps/0", (8, 3, 3), settings=_s(eps=0.0)),
        bn("bn/eps/1e-3", (8, 3, 3), settings=_s(eps=1e-3)),
        bn("bn/eps/0.1", (8, 3, 3), settings=_s(eps=0.1), data=Data(scale=0.2)),
        bn("bn/momentum/0", (8, 3, 3), settings=_s(momentum=0.0), steps=SEQUENCE),
        bn("bn/momentum/0.5", (8, 3, 3), settings=_s(momentum=0.5), steps=SEQUENCE),
        bn("bn/momentum/1", (8, 3, 3), settings=_s(momentum=1.0), steps=SEQUENCE),
        bn("bn/momentum/none", (8, 3, 3), settings=_s(momentum=None), steps=SEQUENCE),
        bn("bn/affine-off", (6, 3, 4), settings=_s(center=False, scale=False)),
        bn("bn/center-off", (6, 3, 4), settings=_s(center=False)),
        bn("bn/scale-off", (6, 3, 4), settings=_s(scale=False)),
        bn(
            "bn/running-stats-off",
            (6, 3, 4),
            settings=_s(track_running_stats=False),
            steps=(Step("train"), Step("eval"), Step("train"), Step("eval")),
        ),
        # Sequences: k training steps, then inference; buffers after every step.
        bn("bn/seq/train3-eval", (5, 4, 3, 3), steps=SEQUENCE),
        bn("bn/seq/axis-last", (5, 3, 3, 4), axis=-1, steps=SEQUENCE),
        bn(
            "bn/seq/forward-only",
            (6, 3, 5),
            steps=(Step("train"), Step("forward"), Step("forward"), Step("eval")),
        ),
        bn(
            "bn/seq/eval-first",
            (6, 3, 5),
            steps=(Step("eval"), Step("train"), Step("eval")),
        ),
        # An empty batch (SPEC.md section 2, *Empty batch*): an empty output, zero gamma
        # and beta gradients, no state change in the canonical convention.
        bn("bn/empty/rank2", (0, 3), steps=(Step("train"), Step("train"), Step("eval"))),
        bn("bn/empty/rank4", (0, 3, 2, 2), steps=(Step("train"), Step("eval"))),
        bn("bn/empty/spatial", (4, 3, 0), steps=(Step("train"), Step("eval"))),
        bn(
            "bn/empty/momentum-none",
            (0, 3, 2),
            settings=_s(momentum=None),
            steps=(Step("train"), Step("train"), Step("eval")),
        ),
        # A non-finite batch: the guard keeps every running statistic as it was.
        # A masked batch: statistics of the kept values, with the feature axis last (the
        # mask is the same for every feature) and first (a mask along the feature axis).
        bn("bn/masked/axis-last", (6, 4, 3), axis=-1, mask="partial", steps=SEQUENCE),
        bn("bn/masked/axis-first", (6, 3, 5), mask="partial", steps=SEQUENCE),
        bn(
            "bn/nonfinite/nan",
            (6, 3, 4),
            steps=(Step("train"), Step("train", "nan"), Step("train"), Step("eval")),
        ),
        bn(
            "bn/nonfinite/inf",
            (6, 3, 4),
            steps=(Step("train"), Step("train", "inf"), Step("train"), Step("eval")),
        ),
        bn(
            "bn/nonfinite/momentum-none",
            (6, 3, 4),
            settings=_s(momentum=None),
            steps=(Step("train"), Step("train", "nan"), Step("train"), Step("eval")),
        ),
    ]
    # Every preset: its whole sequence, a non-finite batch (no guard), and what it does
    # with one value per feature where it allows one (the keras and mxnet presets).
    for preset in (p.name for p in plugins_in_order()):
        out += [
            bn(
                f"bn/preset-{preset}/seq",
                (5, 3, 4, 4),
                preset=preset,
                steps=(Step("train"), Step("forward"), Step("train"), Step("eval")),
            ),
            bn(
                f"bn/preset-{preset}/axis-last",
                (5, 4, 4, 3),
                axis=-1,
                preset=preset,
                steps=SEQUENCE,
            ),
            bn(
                f"bn/preset-{preset}/nonfinite",
                (6, 3, 4),
                preset=preset,
                steps=(Step("train"), Step("train", "nan"), Step("eval")),
            ),
        ]
        # An empty batch as the framework's own layer treats it (empty_batch).
        out.append(
            bn(
                f"bn/preset-{preset}/empty",
                (0, 3, 2, 2),
                preset=preset,
                steps=(Step("train"), Step("train"), Step("eval")),
            )
        )
        if PRESETS[preset]["allow_single_value"]:
            out.append(bn(f"bn/preset-{preset}/single-value", (1, 3), preset=preset))
        if PRESETS[preset].get("fully_masked") == "zero":
            # A mask that keeps nothing, of the batch or of one feature, as its layer does.
            out += [
                bn(
                    f"bn/preset-{preset}/masked/nothing",
                    (6, 5, 3),
                    axis=-1,
                    preset=preset,
                    mask="nothing",
                    steps=(Step("train"), Step("train"), Step("eval")),
                ),
                bn(
                    f"bn/preset-{preset}/masked/feature",
                    (6, 3, 5),
                    preset=preset,
                    mask="feature",
                    steps=SEQUENCE,
                ),
            ]
    # Dtypes: float64, float16 and bfloat16 on a few shapes (float32 is everywhere above).
    for dtype in ("float64", "float16", "bfloat16"):
        out += [
            bn(f"bn/dtype/{dtype}/rank2", (8, 5), dtype=dtype),
            bn(f"bn/dtype/{dtype}/rank4/axis-first", (4, 3, 5, 4), dtype=dtype),
            bn(f"bn/dtype/{dtype}/rank4/axis-last", (4, 5, 4, 3), axis=-1, dtype=dtype),
            bn(f"bn/dtype/{dtype}/seq", (5, 4, 3, 3), dtype=dtype, steps=SEQUENCE),
        ]
    return out


def _renorm_cases() -> list[BatchNormCase]:
    """Batch Renormalization (SPEC.md section 2): the canonical form, clipped bounds that
    bite (a shifted, spread input against the initial renorm statistics 0 and 1), the
    guard, and every preset. A native column whose layer has Batch Renormalization runs
    it on them (the plug-in declares it); the others report them unsupported."""
    bn = BatchNormCase
    clipped = _s(renorm=True, renorm_rmax=1.5, renorm_rmin=0.7, renorm_dmax=0.3,
                 renorm_momentum=0.2)  # fmt: skip
    shifted = Data(loc=3.0, scale=2.0)
    train4 = (Step("train"), Step("train"), Step("train"), Step("train"), Step("eval"))
    return [
        bn("renorm/canonical", (6, 3, 4), settings=_s(renorm=True), steps=SEQUENCE),
        bn("renorm/clipped", (6, 3, 4), settings=clipped, steps=train4, data=shifted),
        bn("renorm/axis-last", (5, 4, 3), axis=-1, settings=clipped, steps=SEQUENCE),
        bn(
            "renorm/nonfinite",
            (6, 3, 4),
            settings=clipped,
            steps=(Step("train"), Step("train", "nan"), Step("train"), Step("eval")),
        ),
        bn("renorm/float64", (6, 3), dtype="float64", settings=clipped, steps=SEQUENCE),
    ] + [
        # Each preset's arithmetic (Keras's moving stddev, MXNet's update in backward).
        bn(
            f"renorm/preset-{p.name}",
            (6, 4, 3),
            axis=-1,
            preset=p.name,
            settings=clipped,
            steps=(Step("train"), Step("forward"), Step("train"), Step("train"), Step("eval")),
            data=shifted,
        )
        for p in plugins_in_order()
    ]


def _ghost_cases() -> list[BatchNormCase]:
    """Ghost batches (SPEC.md section 2): a batch that is a multiple of the group size,
    one that is not (the last group holds the remainder), the mean-of-groups feed, the
    feature axis last, and every preset. No native layer here has them."""
    bn = BatchNormCase
    train3 = (Step("train"), Step("forward"), Step("train"), Step("eval"))
    return [
        bn("ghost/multiple", (12, 3, 4), settings=_s(virtual_batch_size=4), steps=SEQUENCE),
        bn("ghost/remainder", (10, 3, 2), settings=_s(virtual_batch_size=4), steps=SEQUENCE),
        bn(
            "ghost/groups",
            (10, 3, 2),
            settings=_s(virtual_batch_size=4, ghost_running="groups"),
            steps=SEQUENCE,
        ),
        bn("ghost/axis-last", (8, 5, 3), axis=-1, settings=_s(virtual_batch_size=3)),
    ] + [
        bn(
            f"ghost/preset-{p.name}",
            (8, 3, 4),
            preset=p.name,
            settings=_s(virtual_batch_size=4, ghost_running="groups"),
            steps=train3,
        )
        for p in plugins_in_order()
    ]


def _fold_cases() -> list[FoldCase]:
    """Fold (SPEC.md section 8): every producer kind after unorm's BatchNorm and the
    framework's own, affine off, every preset (their eps), float64."""
    fc = FoldCase
    out = [
        fc("fold/conv2d", "conv", 3, 4),
        fc("fold/conv2d/native-bn", "conv", 3, 4, native_bn=True),
        fc("fold/conv2d/grouped", "conv", 4, 6, groups=2),
        fc("fold/conv2d/grouped/native-bn", "conv", 4, 6, groups=2, native_bn=True),
        fc("fold/conv2d/no-bias", "conv", 3, 4, kernel=(1, 3), bias=False),
        fc("fold/conv2d/affine-off", "conv", 3, 4, settings=_s(center=False, scale=False)),
        fc("fold/depthwise", "depthwise", 3, 6),
        fc("fold/depthwise/native-bn", "depthwise", 3, 6, native_bn=True),
        fc("fold/conv_transpose", "conv_transpose", 3, 4, kernel=(2, 2)),
        fc("fold/conv_transpose/native-bn", "conv_transpose", 3, 4, kernel=(2, 2), native_bn=True),
        # Groups 2: a rule that scales axis 1 of the (I, O/g, kh, kw) weight finds O/g
        # factors there (pytorch/pytorch#180995).
        fc("fold/conv_transpose/grouped", "conv_transpose", 4, 6, kernel=(2, 2), groups=2),
        fc(
            "fold/conv_transpose/grouped/native-bn",
            "conv_transpose",
            4,
            6,
            kernel=(2, 2),
            groups=2,
            native_bn=True,
        ),
        fc("fold/dense", "dense", 6, 4, batch=5),
        fc("fold/dense/native-bn", "dense", 6, 4, batch=5, native_bn=True),
        fc("fold/float64/conv2d", "conv", 3, 4, dtype="float64"),
        fc("fold/float64/dense", "dense", 6, 4, batch=5, dtype="float64"),
        # A float16 producer keeps float16: the fold in float64, rounded once.
        fc("fold/float16/conv2d", "conv", 3, 4, dtype="float16"),
    ]
    out += [fc(f"fold/preset-{p.name}", "conv", 3, 4, preset=p.name) for p in plugins_in_order()]
    return out


def _after_cases() -> list[AfterCase]:
    """Recalibrate, frozen (SPEC.md section 8) and accumulated micro-batches (section 2)."""
    ac = AfterCase
    presets = [p.name for p in plugins_in_order()]
    out = [
        ac("recalibrate/uneven", "recalibrate", (6, 6, 2)),
        ac("recalibrate/drift", "recalibrate", (4, 4, 4, 3), drift=1.5),
        ac("recalibrate/axis-last", "recalibrate", (5, 5, 3), shape=(4, 3), axis=-1),
        ac("recalibrate/rank2", "recalibrate", (7, 2), shape=(5,)),
        # An empty batch contributes nothing and is not counted.
        ac("recalibrate/empty-batch", "recalibrate", (5, 0, 4)),
        ac("recalibrate/float64", "recalibrate", (6, 3), dtype="float64", drift=0.5),
    ]
    out += [ac(f"recalibrate/preset-{p}", "recalibrate", (6, 4, 2), preset=p) for p in presets]
    out += [
        ac("frozen/fixed", "frozen", (6, 4)),
        ac("frozen/trainable", "frozen", (6, 4), trainable=True),
        ac("frozen/axis-last", "frozen", (5, 3), shape=(4, 3), axis=-1),
        ac("frozen/trainable/axis-last", "frozen", (5, 3), shape=(4, 3), axis=-1, trainable=True),
        # One value per feature is no error once frozen (no batch statistics).
        ac("frozen/one-value", "frozen", (6, 1), shape=(3,)),
        ac("frozen/float64", "frozen", (6, 4), dtype="float64", trainable=True),
    ]
    out += [ac(f"frozen/preset-{p}", "frozen", (6, 4), preset=p) for p in presets]
    out += [
        ac("accumulate/uneven", "accumulate", (5, 3, 2)),
        ac("accumulate/two-steps", "accumulate", (4, 2, 3, 5), steps=2),
        ac("accumulate/nan", "accumulate", (5, 3, 2), nonfinite=1),
        ac("accumulate/axis-last", "accumulate", (4, 3), shape=(2, 3), axis=-1),
        ac("accumulate/momentum-none", "accumulate", (3, 5, 2), settings=_s(momentum=None)),
        ac("accumulate/float64", "accumulate", (4, 3), dtype="float64"),
    ]
    out += [ac(f"accumulate/preset-{p}", "accumulate", (5, 3, 2), preset=p) for p in presets]
    return out


def _kernel(layer: str, kind: str, shape: tuple[int, ...], recipe: str = "mixed") -> AGCParam:
    return AGCParam(layer, kind, "weight", shape, recipe)


def _agc_cases() -> list[AGCCase]:
    ag = AGCCase
    out = [
        # Each layer kind at each rank it exists in, from the same logical weights.
        ag("agc/dense/rank2", (_kernel("fc", "dense", (6, 5)),)),
        ag("agc/conv/rank3", (_kernel("conv", "conv", (6, 3, 5)),)),
        ag("agc/conv/rank4", (_kernel("conv", "conv", (6, 3, 3, 3)),)),
        ag("agc/conv/rank5", (_kernel("conv", "conv", (5, 2, 3, 2, 2)),)),
        ag("agc/conv_transpose/rank3", (_kernel("up", "conv_transpose", (3, 6, 4)),)),
        ag("agc/conv_transpose/rank4", (_kernel("up", "conv_transpose", (3, 6, 3, 3)),)),
        ag("agc/conv_transpose/rank5", (_kernel("up", "conv_transpose", (2, 5, 2, 3, 2)),)),
        ag("agc/depthwise_conv/rank3", (_kernel("dw", "depthwise_conv", (3, 2, 5)),)),
        ag("agc/depthwise_conv/rank4", (_kernel("dw", "depthwise_conv", (3, 2, 3, 3)),)),
        ag("agc/embedding/rank2", (_kernel("emb", "embedding", (7, 4)),)),
        # Ranks 0 and 1: a scalar gain and a bias are one unit each.
        ag("agc/rank0", (AGCParam("gain", "dense", "gain", ()),)),
        ag("agc/rank1", (AGCParam("fc", "dense", "bias", (6,)),)),
        # A layer with weight and bias, and a small network of every kind together.
        ag(
            "agc/dense/weight-and-bias",
            (_kernel("fc", "dense", (4, 3)), AGCParam("fc", "dense", "bias", (4,))),
        ),
        ag(
            "agc/network",
            (
                _kernel("conv", "conv", (4, 3, 3, 3)),
                AGCParam("conv", "conv", "bias", (4,)),
                _kernel("dw", "depthwise_conv", (4, 2, 3, 3)),
                _kernel("up", "conv_transpose", (8, 3, 2, 2)),
                _kernel("emb", "embedding", (5, 3)),
                _kernel("fc", "dense", (2, 12)),
                AGCParam("fc", "dense", "bias", (2,)),
            ),
        ),
        # Zero weights (threshold clipping * eps), zero gradients, eps = 0.
        ag("agc/zero-weight", (_kernel("conv", "conv", (4, 3, 2, 2), "zero_weight"),)),
        ag("agc/zero-grad", (_kernel("conv", "conv", (4, 3, 2, 2), "zero_grad"),)),
        ag(
            "agc/zero-weight-eps0",
            (_kernel("fc", "dense", (4, 3), "zero_weight"),),
            eps=0.0,
        ),
        ag("agc/grad-floor", (_kernel("fc", "dense", (4, 3), "floor"),), eps=0.0),
        # Units exactly at, just above and just below the threshold (clipping = 0.5 keeps
        # the threshold exact in binary).
        ag("agc/threshold", (_kernel("fc", "dense", (4, 2), "threshold"),), clipping=0.5),
        ag(
            "agc/threshold/float64",
            (_kernel("fc", "dense", (4, 2), "threshold"),),
            clipping=0.5,
            dtype="float64",
        ),
        ag(
            "agc/threshold/conv_transpose",
            (_kernel("up", "conv_transpose", (2, 4, 1, 2), "threshold"),),
            clipping=0.5,
        ),
        # Non-finite gradients (and weights) leave their unit untouched.
        ag("agc/nonfinite-grad", (_kernel("conv", "conv", (5, 3, 2, 2), "nonfinite_grad"),)),
        ag("agc/nonfinite-weight", (_kernel("fc", "dense", (4, 3), "nonfinite_weight"),)),
        # The final classifier (weight and bias) excluded by name.
        ag(
            "agc/exclude-classifier",
            (
                _kernel("conv", "conv", (4, 3, 3, 3)),
                AGCParam("conv", "conv", "bias", (4,)),
                _kernel("fc", "dense", (3, 4)),
                AGCParam("fc", "dense", "bias", (3,)),
            ),
            exclude=("fc.weight", "fc.bias"),
        ),
        ag("agc/clipping-0.1", (_kernel("conv", "conv", (6, 3, 3, 3)),), clipping=0.1),
    ]
    for dtype in ("float64", "float16", "bfloat16"):
        out += [
            ag(f"agc/dtype/{dtype}/conv", (_kernel("conv", "conv", (6, 3, 3, 3)),), dtype=dtype),
            ag(f"agc/dtype/{dtype}/dense", (_kernel("fc", "dense", (6, 5)),), dtype=dtype),
        ]
    # Invalid settings must raise ValueError everywhere (SPEC.md section 5, edge case 8),
    # and so must excluding a parameter the model does not have (Excluded parameters).
    fc = (_kernel("fc", "dense", (4, 3)),)
    out += [
        ag(
            "agc/error/exclude-missing",
            fc,
            exclude=("head.weight",),
            error=True,
            message=("exclude names no parameter", "head.weight"),
        ),
        ag("agc/error/clipping-0", fc, clipping=0.0, error=True, message=_CLIPPING),
        ag("agc/error/clipping-negative", fc, clipping=-0.01, error=True, message=_CLIPPING),
        ag("agc/error/clipping-inf", fc, clipping=float("inf"), error=True, message=_CLIPPING),
        ag("agc/error/eps-negative", fc, eps=-1e-3, error=True, message=_EPS),
        ag("agc/error/eps-nan", fc, eps=float("nan"), error=True, message=_EPS),
        # unit_axes (SPEC.md section 5, Output-unit axes): one message per mistake.
        ag(
            "agc/error/unit-axes-missing",
            fc,
            unit_axes_by_name=(("head.weight", 0),),
            error=True,
            message=("unit_axes names no parameter", "head.weight"),
        ),
        ag(
            "agc/error/unit-axes-bool",
            fc,
            unit_axes=True,
            error=True,
            message=("unit_axes must be an int", "got True"),
        ),
        ag(
            "agc/error/unit-axes-out-of-range",
            fc,
            unit_axes_by_name=(("fc.weight", 5),),
            error=True,
            message=("unit_axes must be an integer in [-2, 2)", "got 5", "shape"),
        ),
        ag(
            "agc/error/unit-axes-repeated",
            fc,
            unit_axes_by_name=(("fc.weight", (0, -2)),),
            error=True,
            message=("unit_axes must name distinct axes", "(0, -2)"),
        ),
    ]
    return out


def _sync_cases() -> list[SyncCase]:
    return [
        SyncCase("sync/even", (4, 4), (3, 2, 2)),
        SyncCase("sync/uneven", (5, 1, 3), (3, 2, 2)),
        SyncCase("sync/empty-replica", (0, 6, 2), (3, 4)),
        SyncCase("sync/one-value-replicas", (1, 1, 1), (4,)),
        SyncCase("sync/axis-last", (3, 0, 5), (2, 2, 3), axis=-1),
        # The same without the empty replica, for frameworks that cannot hold one (MXNet 1.x).
        SyncCase("sync/axis-last-uneven", (3, 1, 5), (2, 2, 3), axis=-1),
        SyncCase("sync/float64", (2, 7), (3, 2), dtype="float64"),
        # One case per framework strategy (each starts processes: kept to one step).
        SyncCase("sync/ddp/uneven-empty", (3, 0, 5), (3, 2), strategy="ddp"),
        SyncCase("sync/multi-worker/uneven", (2, 5), (4, 3), axis=-1, strategy="multi-worker"),
        SyncCase(
            "sync/data-parallel/uneven-empty", (0, 5), (4, 3), axis=-1, strategy="data-parallel"
        ),
    ]


def _error_cases() -> list[ErrorCase]:
    return [
        ErrorCase("error/rank1", (3,), num_features=3, message=("rank", "(3,)")),
        ErrorCase("error/wrong-features", (4, 5), num_features=3, message=("3 features", "axis 1")),
        ErrorCase(
            "error/integer-input",
            (4, 3),
            num_features=3,
            dtype="int32",
            message=("floating-point dtype", "int32"),
        ),
        # The feature axis outside [-r, r) for the input's rank r (SPEC.md section 2,
        # *Errors*, item 3).
        ErrorCase(
            "error/axis-out-of-range", (4, 3), num_features=3, axis=2, message=("axis", "[-2, 2)")
        ),
        ErrorCase(
            "error/axis-out-of-range-negative",
            (2, 3, 4, 4),
            num_features=3,
            axis=-5,
            message=("axis", "[-4, 4)"),
        ),
        ErrorCase(
            "error/unknown-preset",
            (4, 3),
            num_features=3,
            preset="caffe",
            message=("preset", "'caffe'"),
        ),
        ErrorCase("error/one-value-per-feature", (1, 3), num_features=3, message=(_ONE_VALUE,)),
        ErrorCase("error/one-value-rank4", (1, 3, 1, 1), num_features=3, message=(_ONE_VALUE,)),
    ]


def _ws_cases() -> list[WSCase]:
    ws = WSCase
    out = []
    for style in ("deepmind", "timm"):
        out += [
            # Odd kernels (square and 1x3), groups 1 and 2, valid and same padding.
            ws(f"ws/{style}/k3", 3, 4, (3, 3), style=style),
            ws(f"ws/{style}/k5", 2, 3, (5, 5), style=style, size=(7, 7)),
            ws(f"ws/{style}/k1x3", 3, 4, (1, 3), style=style),
            ws(f"ws/{style}/groups2/k3", 4, 6, (3, 3), groups=2, style=style),
            ws(f"ws/{style}/groups2/k1x3", 4, 6, (1, 3), groups=2, style=style, size=(5, 7)),
            ws(f"ws/{style}/same/k3", 3, 4, (3, 3), style=style, padding="same"),
            ws(f"ws/{style}/same/groups2/k5", 4, 2, (5, 5), groups=2, style=style, padding="same"),
            ws(f"ws/{style}/k1x1", 5, 3, (1, 1), style=style, size=(3, 3)),
            # Where the styles' eps handling differs: var * fan_in ~3e-5, under deepmind's
            # floor (1e-4, gradient through the variance 0) and near timm's eps (1e-5).
            ws(f"ws/{style}/small-weights", 3, 4, (3, 3), style=style, weight_scale=1e-3),
            # A constant unit standardises to 0 (eps > 0) and still gets a gradient.
            ws(f"ws/{style}/constant-unit", 3, 4, (3, 3), style=style, constant_unit=True),
            ws(f"ws/{style}/float64/k3", 3, 4, (3, 3), style=style, dtype="float64"),
            ws(
                f"ws/{style}/float64/groups2/k1x3",
                4,
                6,
                (1, 3),
                groups=2,
                style=style,
                dtype="float64",
                weight_scale=1e-3,
            ),
        ]
    out += [
        # eps given explicitly (not the style's default), and eps = 0 on ordinary weights.
        ws("ws/deepmind/eps/1e-2", 3, 4, (3, 3), eps=1e-2, weight_scale=0.01),
        ws("ws/timm/eps/1e-3", 3, 4, (3, 3), style="timm", eps=1e-3, weight_scale=0.01),
        ws("ws/timm/eps/0", 3, 4, (3, 3), style="timm", eps=0.0),
        # Bad sizes: fan_in = (C/groups) * kh * kw = 0 must be a ValueError everywhere.
        ws("ws/error/zero-kernel", 3, 4, (0, 3), error=True),
        ws("ws/error/zero-kernel-width", 3, 4, (3, 0), style="timm", error=True),
        ws("ws/error/no-input-channels", 0, 4, (3, 3), error=True),
        ws("ws/error/fewer-channels-than-groups", 1, 4, (3, 3), groups=2, error=True),
    ]
    return out


_CASES: tuple[Case, ...] | None = None


def all_cases() -> tuple[Case, ...]:
    """Every declared case, in declaration order."""
    global _CASES
    if _CASES is None:
        _CASES = (
            *_batchnorm_cases(),
            *_renorm_cases(),
            *_ghost_cases(),
            *_agc_cases(),
            *_sync_cases(),
            *_error_cases(),
            *_ws_cases(),
            *_fold_cases(),
            *_after_cases(),
        )
    return _CASES


def get_case(name: str) -> Case:
    """The case called ``name``; ``KeyError`` if there is none."""
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(f"no conformance case is called {name!r}")


def select(
    patterns: Sequence[str] | None = None, cases: Iterable[Case] | None = None
) -> list[Case]:
    """Cases whose name matches any of the shell-style ``patterns`` (all when None).

    Example:
        >>> [c.name for c in select(["error/rank*"])]
        ['error/rank1']
    """
    pool = list(all_cases() if cases is None else cases)
    if not patterns:
        return pool
    return [c for c in pool if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]

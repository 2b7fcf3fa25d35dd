"""``ScaledStdConv1D/2D/3D``: Gluon convolutions with Scaled Weight Standardisation
(``SPEC.md`` section 6), for normalizer-free networks.

Each block is ``gluon.nn.Conv1D``, ``Conv2D`` or ``Conv3D`` with one more parameter,
``gain``, and its weight standardised per output channel (axis 0 of Gluon's
``(O, I/groups, *k)`` weight; of ``(O, *k, I/groups)`` with a channels-last layout) on
every call, written once in a mixin over the convolution's rank. Only MXNet's own
operators are used, so the blocks hybridize, export and re-import
(``SymbolBlock.imports``) without anything registered, and autograd differentiates
through the standardisation. unorm's AGC sees a convolution and clips the weight per
output channel; the gain, of rank 1, is one unit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import mxnet as mx
from mxnet import gluon

from ..spec import ScaledWSSpec
from . import internals

__all__ = ["ScaledStdConv1D", "ScaledStdConv2D", "ScaledStdConv3D"]

# Statistics of float16 weights are taken in float32: their variance would lose bits.
_NARROW = ("float16",)


def _fan_in_error(detail: str) -> ValueError:
    return ValueError(
        f"fan_in must be >= 1 for Scaled Weight Standardisation, got {detail} "
        "(a zero-size kernel or no input channels)"
    )


class _ScaledStd(gluon.HybridBlock):
    """What ``ScaledStdConv1D/2D/3D`` share: the gain, the settings, the checks, the
    forward.

    A mixin placed before a ``gluon.nn.Conv{1,2,3}D`` (the convolution's own constructor
    and ``hybrid_forward`` come next in the MRO); ``_rank`` is the number of spatial axes.
    It takes the convolution's own arguments, plus ``gain_init`` (1.0: the learnable
    per-output-channel gain's start), ``style`` (``"deepmind"``, canonical, or ``"timm"``)
    and ``eps`` (None: the style's, 1e-4 or 1e-5); see ``SPEC.md`` section 6.
    """

    _rank: ClassVar[int]

    def __init__(
        self,
        channels: int,
        kernel_size: Any,
        *args: Any,
        gain_init: float = 1.0,
        style: str = "deepmind",
        eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.ws = ScaledWSSpec(style=style, eps=eps)  # type: ignore[arg-type]
        sizes = (kernel_size,) * self._rank if isinstance(kernel_size, int) else tuple(kernel_size)
        if any(int(s) == 0 for s in sizes):
            raise _fan_in_error(f"kernel_size {sizes}")
        # Positionally: strides, padding, dilation, groups (the same for every rank).
        groups = int(kwargs.get("groups", args[3] if len(args) > 3 else 1))
        in_channels = int(kwargs.get("in_channels", 0))
        if in_channels and in_channels // groups == 0:
            raise _fan_in_error(f"in_channels={in_channels} in groups={groups}")
        super().__init__(channels, kernel_size, *args, **kwargs)
        self.gain_init = float(gain_init)
        with self.name_scope():
            self.gain = self.params.get(
                "gain",
                shape=(channels,),
                init=mx.init.Constant(self.gain_init),
                allow_deferred_init=True,
            )

    def forward(self, x: Any, *args: Any) -> Any:
        """Check the input's channels (what a deferred weight shape will be), then call."""
        if isinstance(x, mx.nd.NDArray):
            settings = internals.layer_arguments(self)
            channels = x.shape[settings["layout"].find("C")]
            if channels // settings["num_group"] == 0:
                raise _fan_in_error(
                    f"{channels} input channels in groups={settings['num_group']} "
                    f"(input shape {x.shape})"
                )
        return super().forward(x, *args)

    def standardized_weight(self, F: Any, weight: Any, gain: Any) -> Any:
        """Scaled WS of ``weight`` times ``gain``, per output channel (axis 0), with
        ``F`` ``mx.nd`` or ``mx.sym``: the weight this block convolves with."""
        dtype = self.weight.dtype
        narrow = getattr(dtype, "__name__", str(dtype)) in _NARROW
        w = F.cast(weight, dtype="float32") if narrow else weight
        axes = tuple(range(1, self._rank + 2))
        centred = F.broadcast_sub(w, F.mean(w, axis=axes, keepdims=True))
        # var * fan_in is the sum of squares: no fan_in needed for deepmind's floor.
        squares = F.sum(F.square(centred), axis=axes, keepdims=True)
        assert self.ws.eps is not None
        if self.ws.style == "deepmind":
            scale = F.rsqrt(F.maximum(squares, self.ws.eps))
        else:
            # (var + eps) * fan_in, fan_in counted in the graph: a deferred weight's shape
            # is unknown when a hybridized graph is built.
            fan_in = F.sum(F.ones_like(w), axis=axes, keepdims=True)
            scale = F.rsqrt(squares + fan_in * self.ws.eps)
        gain = F.cast(gain, dtype="float32") if narrow else gain
        scale = F.broadcast_mul(scale, F.reshape(gain, shape=(-1,) + (1,) * (self._rank + 1)))
        # MXNet infers shapes backwards through elementwise ops only, not through
        # broadcasts: adding zeros_like(w) lets a deferred weight take its shape from the
        # convolution (Gluon's deferred initialisation), hybridized or not.
        out = F.broadcast_mul(centred, scale) + F.zeros_like(w)
        return F.cast(out, dtype="float16") if narrow else out

    def hybrid_forward(
        self, F: Any, x: Any, weight: Any, gain: Any, bias: Any | None = None
    ) -> Any:
        """The convolution's forward with the standardised weight."""
        return super().hybrid_forward(F, x, self.standardized_weight(F, weight, gain), bias)

    def __repr__(self) -> str:
        base: str = super().__repr__()
        return f"{base[:-1]}, style={self.ws.style!r}, eps={self.ws.eps:g})"


class ScaledStdConv1D(_ScaledStd, gluon.nn.Conv1D):
    """``gluon.nn.Conv1D`` whose weight is standardised on every call (Scaled WS).

    Takes ``Conv1D``'s own arguments (``channels``, ``kernel_size``, ``strides``,
    ``padding``, ``dilation``, ``groups``, ``layout``, ``in_channels``, ``use_bias``, ...),
    plus:

    Args:
        gain_init: start value of the learnable per-output-channel ``gain`` (default 1.0).
        style: ``"deepmind"`` (canonical, ``rsqrt(max(var * fan_in, eps))``) or ``"timm"``
            (``rsqrt((var + eps) * fan_in)``); see ``SPEC.md`` section 6.
        eps: None (default) takes the style's: 1e-4 (deepmind) or 1e-5 (timm).

    The weight is ``(O, I/groups, k)``. ``in_channels=0`` (the default) defers its shape
    to the first call, as in Gluon. ``fan_in = (I/groups) * k`` of 0 (a zero-size kernel,
    fewer input channels than groups, or an input without channels) is a ``ValueError``.

    Example:
        >>> import mxnet as mx
        >>> conv = ScaledStdConv1D(8, 3, padding=1, prefix="ws1_")
        >>> conv.initialize()
        >>> conv(mx.nd.zeros((2, 3, 6))).shape
        (2, 8, 6)
        >>> sorted(conv.collect_params())
        ['ws1_bias', 'ws1_gain', 'ws1_weight']
        >>> conv.weight.shape
        (8, 3, 3)
    """

    _rank = 1


class ScaledStdConv2D(_ScaledStd, gluon.nn.Conv2D):
    """``gluon.nn.Conv2D`` whose weight is standardised on every call (Scaled WS).

    Takes ``Conv2D``'s own arguments (``channels``, ``kernel_size``, ``strides``,
    ``padding``, ``dilation``, ``groups``, ``layout``, ``in_channels``, ``use_bias``, ...),
    plus:

    Args:
        gain_init: start value of the learnable per-output-channel ``gain`` (default 1.0).
        style: ``"deepmind"`` (canonical, ``rsqrt(max(var * fan_in, eps))``) or ``"timm"``
            (``rsqrt((var + eps) * fan_in)``); see ``SPEC.md`` section 6.
        eps: None (default) takes the style's: 1e-4 (deepmind) or 1e-5 (timm).

    ``in_channels=0`` (the default) defers the weight's shape to the first call, as in
    Gluon. ``fan_in = (I/groups) * kh * kw`` of 0 (a zero-size kernel, fewer input
    channels than groups, or an input without channels) is a ``ValueError``.

    Example:
        >>> import mxnet as mx
        >>> conv = ScaledStdConv2D(8, 3, padding=1, in_channels=3, prefix="ws_")
        >>> conv.initialize()
        >>> conv(mx.nd.zeros((2, 3, 6, 6))).shape
        (2, 8, 6, 6)
        >>> sorted(conv.collect_params())
        ['ws_bias', 'ws_gain', 'ws_weight']
        >>> conv.hybridize()
        >>> conv(mx.nd.zeros((1, 3, 4, 4))).shape
        (1, 8, 4, 4)
    """

    _rank = 2


class ScaledStdConv3D(_ScaledStd, gluon.nn.Conv3D):
    """``gluon.nn.Conv3D`` whose weight is standardised on every call (Scaled WS).

    Takes ``Conv3D``'s own arguments (``channels``, ``kernel_size``, ``strides``,
    ``padding``, ``dilation``, ``groups``, ``layout``, ``in_channels``, ``use_bias``, ...),
    plus:

    Args:
        gain_init: start value of the learnable per-output-channel ``gain`` (default 1.0).
        style: ``"deepmind"`` (canonical, ``rsqrt(max(var * fan_in, eps))``) or ``"timm"``
            (``rsqrt((var + eps) * fan_in)``); see ``SPEC.md`` section 6.
        eps: None (default) takes the style's: 1e-4 (deepmind) or 1e-5 (timm).

    The weight is ``(O, I/groups, kd, kh, kw)``. ``in_channels=0`` (the default) defers
    its shape to the first call, as in Gluon. ``fan_in = (I/groups) * kd * kh * kw`` of 0
    (a zero-size kernel, fewer input channels than groups, or an input without channels)
    is a ``ValueError``.

    Example:
        >>> import mxnet as mx
        >>> conv = ScaledStdConv3D(4, 2, in_channels=2, style="timm", prefix="ws3_")
        >>> conv.initialize()
        >>> conv.hybridize()
        >>> conv(mx.nd.zeros((1, 2, 3, 3, 3))).shape
        (1, 4, 2, 2, 2)
        >>> conv
        ScaledStdConv3D(2 -> 4, kernel_size=(2, 2, 2), stride=(1, 1, 1), style='timm', eps=1e-05)
    """

    _rank = 3

"""Gluon blocks the zoo's MXNet counterparts share: a convolution with TensorFlow "same"
padding fixed from a plan, and swish as ``x * sigmoid(x)``.

Gluon's ``Conv2D(padding=p)`` pads symmetrically; TensorFlow's "same" padding puts an odd
row or column after (bottom, right), so :class:`SameConv` pads explicitly (``F.pad``,
zeros) and convolves with no padding, as the PyTorch sources do.

Example:
    >>> import mxnet as mx
    >>> from unorm.models.zoo.plans import Conv
    >>> conv = SameConv(Conv("c", 3, 8, 3, 2, 1, ((0, 1), (0, 1)), 64))
    >>> conv.initialize()
    >>> conv(mx.nd.zeros((1, 3, 64, 64))).shape
    (1, 8, 32, 32)
"""

from __future__ import annotations

from typing import Any

from mxnet import gluon

from .plans import Conv

__all__ = ["SameConv", "swish"]


class SameConv(gluon.HybridBlock):  # type: ignore[misc]
    """``conv`` of a plan (:class:`unorm.models.zoo.plans.Conv`): its zero padding
    ``((top, bottom), (left, right))``, then ``gluon.nn.Conv2D`` with no padding, the
    plan's channels, kernel, stride, groups and bias, as child ``conv``. The padding is
    the one the plan fixed for its input size; an input of another size is a
    ``ValueError`` when it runs imperatively (a hybridized graph cannot read shapes).

    Example:
        >>> from unorm.models.zoo.plans import Conv
        >>> SameConv(Conv("c", 8, 8, 3, 1, 8, ((1, 1), (1, 1)), 16)).conv._kwargs["num_group"]
        8
    """

    def __init__(self, conv: Conv, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pad = conv.pad
        self._size = conv.in_size
        with self.name_scope():
            self.conv = gluon.nn.Conv2D(
                conv.out_channels,
                conv.kernel,
                strides=conv.stride,
                padding=0,
                groups=conv.groups,
                use_bias=conv.bias,
                in_channels=conv.in_channels,
            )

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        (top, bottom), (left, right) = self._pad
        shape = getattr(x, "shape", None)  # an NDArray's; a Symbol has no static shape
        if isinstance(shape, tuple) and len(shape) == 4 and shape[2:] != (self._size,) * 2:
            raise ValueError(
                f"{self.name}: built for {self._size}x{self._size} inputs (its padding is "
                f"fixed for that size), got {shape[2]}x{shape[3]}; build the model for "
                "this image_size"
            )
        if top or bottom or left or right:
            # F.pad takes (before, after) per axis, N and C unpadded.
            x = F.pad(
                x,
                mode="constant",
                constant_value=0.0,
                pad_width=(0, 0, 0, 0, top, bottom, left, right),
            )
        return self.conv(x)


def swish(F: Any, x: Any) -> Any:
    """``x * sigmoid(x)``, written as the PyTorch sources compute it (a product, so the
    data flow has the multiplication theirs has).

    Example:
        >>> import mxnet as mx
        >>> float(swish(mx.nd, mx.nd.array([0.0]))[0].asscalar())
        0.0
    """
    return x * F.sigmoid(x)

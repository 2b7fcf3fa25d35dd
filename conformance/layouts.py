"""Weight layouts: from the suite's logical AGC layout to each framework's and back.

The logical layouts are listed in :mod:`conformance.cases`. An adapter declares its
framework's layout (``layout = layouts.KERAS``); the suite hands it weights and gradients
transformed with :meth:`Layout.to_backend` and maps its answer back with
:meth:`Layout.to_logical`, so that every backend is checked against the same logical
expectation. ``Layout.framework`` names the column of ``unorm.spec.OUTPUT_UNIT_AXES``
that must agree with the transform (a test checks that it does).

Example:
    >>> import numpy as np
    >>> KERAS.to_backend("conv", np.zeros((8, 3, 5, 5))).shape  # (O, I, kh, kw) -> HWIO
    (5, 5, 3, 8)
    >>> TORCH.to_backend("depthwise_conv", np.zeros((3, 2, 5, 5))).shape  # (I*M, 1, kh, kw)
    (6, 1, 5, 5)
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["KERAS", "MXNET", "TORCH", "Layout"]


def _keras_order(kind: str, ndim: int) -> tuple[int, ...]:
    kernel = tuple(range(2, ndim))
    if kind == "embedding":
        return tuple(range(ndim))
    if kind == "depthwise_conv":
        return (*kernel, 0, 1)  # (I, M, *k) -> (*k, I, M)
    return (*kernel, 1, 0)  # (a, b, *k) -> (*k, b, a): Dense (in, out), Conv (*k, I, O), ...


@dataclasses.dataclass(frozen=True)
class Layout:
    """A framework's weight layout: ``channels_last_kernels`` for Keras, else PyTorch's."""

    framework: str
    channels_last_kernels: bool = False

    def to_backend(self, kind: str, logical: np.ndarray) -> np.ndarray:
        """The logical array ``logical`` of a ``kind`` layer in this layout."""
        a = np.asarray(logical)
        if a.ndim <= 1:
            return a
        if self.channels_last_kernels:
            return np.ascontiguousarray(np.transpose(a, _keras_order(kind, a.ndim)))
        if kind == "depthwise_conv":
            return a.reshape(a.shape[0] * a.shape[1], 1, *a.shape[2:])
        return a

    def to_logical(self, kind: str, backend: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_backend` for a logical ``shape``."""
        a = np.asarray(backend)
        if a.ndim <= 1 and len(shape) <= 1:
            return a.reshape(shape)
        if self.channels_last_kernels:
            return np.transpose(a, np.argsort(_keras_order(kind, len(shape))))
        return a.reshape(shape)


#: PyTorch: Linear (out, in), Conv (O, I/g, *k), ConvTranspose (I, O/g, *k), depthwise
#: Conv (I*M, 1, *k), Embedding (rows, dim).
TORCH = Layout("torch")
#: MXNet Gluon: the same layouts as PyTorch.
MXNET = Layout("mxnet")
#: Keras: Dense (in, units), Conv (*k, I, O), ConvTranspose (*k, O, I), DepthwiseConv
#: (*k, I, M), Embedding (rows, dim).
KERAS = Layout("keras", channels_last_kernels=True)

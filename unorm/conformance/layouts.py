"""Weight layouts: from the suite's logical AGC layout to each backend's and back.

The logical layouts are listed in :mod:`conformance.cases`. Each backend's layout is the
:class:`~unorm._core.layer_kinds.KernelLayout` table its plug-in declares
(:mod:`unorm._core.registry`); :func:`of` wraps it as a :class:`Layout`. An adapter
declares its backend's (``layout = layouts.of("keras")``); the suite hands it weights and
gradients transformed with :meth:`Layout.to_backend` and maps its answer back with
:meth:`Layout.to_logical`, so that every backend is checked against the same logical
expectation. ``Layout.framework`` names the plug-in whose unit axes
(``unorm.spec.output_unit_axes``) must agree with the transform (a test checks that they
do). :data:`LOGICAL` is the identity, for an adapter that declares no layout.

Example:
    >>> import numpy as np
    >>> of("keras").to_backend("conv", np.zeros((8, 3, 5, 5))).shape  # (O, I, kh, kw) -> HWIO
    (5, 5, 3, 8)
    >>> of("torch").to_backend("depthwise_conv", np.zeros((3, 2, 5, 5))).shape  # (I*M, 1, ...)
    (6, 1, 5, 5)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from unorm._core.layer_kinds import LAYER_KINDS, KernelLayout
from unorm._core.registry import plugin

__all__ = ["LOGICAL", "Layout", "of"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A backend's weight layout: its plug-in's name and its layout per layer kind."""

    framework: str
    kernels: Mapping[str, KernelLayout] = dataclasses.field(repr=False, compare=False)

    def __str__(self) -> str:
        return self.framework

    def _kernel(self, kind: str) -> KernelLayout:
        if kind not in self.kernels:
            raise ValueError(f"{self.framework} declares no layout for {kind!r} weights")
        return self.kernels[kind]

    def to_backend(self, kind: str, logical: np.ndarray) -> np.ndarray:
        """The logical array ``logical`` of a ``kind`` layer in this layout."""
        a = np.asarray(logical)
        if a.ndim <= 1:
            return a
        return self._kernel(kind).to_backend(a)

    def to_logical(self, kind: str, backend: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_backend` for a logical ``shape``."""
        a = np.asarray(backend)
        if len(shape) <= 1:
            return a.reshape(shape)
        return np.asarray(self._kernel(kind).to_logical(a, shape))


@functools.cache
def of(name: str) -> Layout:
    """The layout of backend ``name``, from its plug-in's ``layouts`` table (``ValueError``
    listing the backends for an unknown name)."""
    return Layout(name, dict(plugin(name).layouts))


#: The suite's logical layout itself: every kind as ``a b k``, nothing moved.
LOGICAL = Layout("logical", {kind: KernelLayout("a b k") for kind in LAYER_KINDS})

"""The layer-kind table: which axes of a layer's weight index its output units, and how each
framework lays that weight out (``SPEC.md`` section 5, *Output-unit axes*).

This is the one place the table lives in code. Every kind has a *logical* layout, the one
the specification and the neutral checkpoint use, with the weight's axes named:

================  =======================  ============================
kind              logical layout           output unit
================  =======================  ============================
``dense``         ``(out, in)``            ``out``
``conv``          ``(O, I/g, *k)``         ``O``
``conv_transpose``  ``(I, O/g, *k)``       ``O/g`` (per group, below)
``depthwise_conv``  ``(I, M, *k)``         ``(I, M)``: channel ``i*M + m``
``embedding``     ``(rows, dim)``          ``rows``
================  =======================  ============================

A backend declares, per kind, where those axes sit in its own layout with a short
:class:`KernelLayout` code: ``a`` is the logical first axis, ``b`` the second, ``k`` the
kernel axes (none for a rank-2 weight), ``ab`` the first two merged into one axis (in
that order) and ``1`` an axis of size one. PyTorch's depthwise kernel ``(I*M, 1, *k)``
is ``"ab 1 k"``; Keras's transposed-convolution kernel ``(*k, O, I)`` is ``"k b a"``.
The unit axes in the backend's layout and the transforms between the layouts follow
from the code, so no backend writes its own table.

A grouped transposed convolution (``groups = g > 1``) has ``I`` = ``g`` blocks of
``I/g`` input channels, and output channel ``j`` of group ``r`` is ``W[r*I/g:(r+1)*I/g, j]``.
Its units are found on the view that splits axis ``a`` into ``(g, I/g)``: unit axes are
``g``'s and ``b``'s (``(0, 2)`` in PyTorch's and MXNet's layout). Taking axis ``b`` alone
would gather output channel ``j`` of every group into one unit.

Example:
    >>> torch_like = KernelLayout("a b k")
    >>> unit_plan("conv_transpose", torch_like, (6, 2, 3, 3), groups=3)
    UnitPlan(axes=(0, 2), view=(3, 2, 2, 3, 3))
    >>> unit_plan("depthwise_conv", KernelLayout("k a b"), (3, 3, 4, 2))
    UnitPlan(axes=(2, 3), view=None)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NumPy is imported where arrays are moved: the registry needs none
    import numpy as np

__all__ = [
    "CHANNELS_FIRST_LAYOUTS",
    "LAYER_KINDS",
    "LOGICAL_UNIT_AXES",
    "KernelLayout",
    "LayoutTable",
    "UnitPlan",
    "unit_plan",
]

#: The layer kinds whose weights AGC knows the layout of.
LAYER_KINDS = ("dense", "conv", "conv_transpose", "depthwise_conv", "embedding")

#: Which logical axes (``a`` = 0, ``b`` = 1) index a kind's output units.
_UNIT_TOKENS: Mapping[str, frozenset[str]] = {
    "dense": frozenset("a"),
    "conv": frozenset("a"),
    "conv_transpose": frozenset("b"),
    "depthwise_conv": frozenset("ab"),
    "embedding": frozenset("a"),
}

#: Output-unit axes of each kind in the logical layout (``SPEC.md`` section 5), read from
#: :data:`_UNIT_TOKENS`: ``a`` is axis 0, ``b`` axis 1.
LOGICAL_UNIT_AXES: Mapping[str, int | tuple[int, ...]] = {
    kind: (0 if "a" in held else 1) if len(held) == 1 else (0, 1)
    for kind, held in _UNIT_TOKENS.items()
}

_TOKENS = ("a", "b", "k", "ab", "1")


def check_kind(kind: object) -> str:
    """``kind`` if it is one of :data:`LAYER_KINDS`; a ``ValueError`` listing them if not."""
    if kind not in LAYER_KINDS:
        listed = ", ".join(repr(k) for k in LAYER_KINDS)
        raise ValueError(f"layer_kind must be one of {listed}, got {kind!r}")
    return str(kind)


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """How to find a weight's output units: clip on ``view`` (None: the weight's own
    shape) and take the units along ``axes`` of it (non-negative, sorted; empty: the
    whole tensor is one unit)."""

    axes: tuple[int, ...]
    view: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Where a kind's logical axes sit in a backend's weight (see the module docstring).

    Example:
        >>> import numpy as np
        >>> KernelLayout("k b a").to_backend(np.zeros((8, 3, 5, 5))).shape
        (5, 5, 3, 8)
    """

    code: str = "a b k"

    def __post_init__(self) -> None:
        tokens = self.code.split()
        if any(t not in _TOKENS for t in tokens) or sorted("".join(tokens).replace("1", "")) != [
            "a",
            "b",
            "k",
        ]:
            raise ValueError(
                f"a kernel layout names a, b and k once each (ab merges a and b, 1 is a "
                f"unit axis), got {self.code!r}"
            )

    @property
    def tokens(self) -> tuple[str, ...]:
        """The code's axes in order."""
        return tuple(self.code.split())

    def _positions(self, ndim: int) -> list[tuple[str, ...]]:
        """For each axis of the backend weight, which logical axes it holds."""
        kernel = ndim - 2
        out: list[tuple[str, ...]] = []
        for token in self.tokens:
            if token == "k":
                out += [(f"k{i}",) for i in range(kernel)]
            elif token == "ab":
                out.append(("a", "b"))
            elif token == "1":
                out.append(())
            else:
                out.append((token,))
        return out

    def unit_axes(self, kind: str, ndim: int) -> tuple[int, ...]:
        """The output-unit axes of a rank-``ndim`` ``kind`` weight in this layout."""
        units = _UNIT_TOKENS[check_kind(kind)]
        return tuple(i for i, held in enumerate(self._logical_positions(ndim)) if units & set(held))

    def _logical_positions(self, ndim: int) -> list[tuple[str, ...]]:
        """Which logical axes each axis of a backend weight of rank ``ndim`` holds."""
        return self._positions(self.logical_rank(ndim))

    def logical_rank(self, ndim: int) -> int:
        """The logical rank of a backend weight of rank ``ndim`` (it differs where axes
        merge or a unit axis is added)."""
        merged = sum(t == "ab" for t in self.tokens)
        ones = sum(t == "1" for t in self.tokens)
        return ndim - ones + merged

    def _order(self, ndim: int) -> list[int]:
        """Logical axes in backend order (merged axes kept apart, added ones left out)."""
        index = _axis_index(ndim)
        return [index[name] for held in self._positions(ndim) for name in held]

    def to_backend(self, logical: np.ndarray) -> np.ndarray:
        """A logical weight in this layout (rank <= 1 arrays are returned as they are)."""
        import numpy as np

        a = np.asarray(logical)
        if a.ndim <= 1:
            return a
        index = _axis_index(a.ndim)
        shape = [math.prod(a.shape[index[n]] for n in held) for held in self._positions(a.ndim)]
        return np.ascontiguousarray(np.transpose(a, self._order(a.ndim)).reshape(shape))

    def to_logical(self, backend: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_backend` for a logical ``shape``."""
        import numpy as np

        a = np.asarray(backend)
        if len(shape) <= 1:
            return a.reshape(shape)
        order = self._order(len(shape))
        moved_shape = [shape[i] for i in order]
        return np.transpose(a.reshape(moved_shape), np.argsort(order))


def _axis_index(ndim: int) -> dict[str, int]:
    return {"a": 0, "b": 1, **{f"k{i}": 2 + i for i in range(ndim - 2)}}


#: A backend's layouts: layer kind -> :class:`KernelLayout` (kinds it lacks are absent).
LayoutTable = Mapping[str, KernelLayout]

#: The channels-first layouts of PyTorch and MXNet Gluon, which are the logical ones except
#: for a depthwise kernel, stored as a grouped convolution's ``(I*M, 1, *k)``.
CHANNELS_FIRST_LAYOUTS: LayoutTable = {
    "dense": KernelLayout("a b k"),
    "conv": KernelLayout("a b k"),
    "conv_transpose": KernelLayout("a b k"),
    "depthwise_conv": KernelLayout("ab 1 k"),
    "embedding": KernelLayout("a b k"),
}


def unit_plan(kind: str, layout: KernelLayout, shape: tuple[int, ...], groups: int = 1) -> UnitPlan:
    """The output units of a ``kind`` weight of ``shape`` in ``layout`` (module docstring).

    Weights of rank <= 1 are one unit. ``groups > 1`` matters only for
    ``conv_transpose``, whose units are then taken on the grouped view. Raises
    ``ValueError`` when ``groups`` does not divide the input-channel axis.
    """
    check_kind(kind)
    ndim = len(shape)
    if ndim <= 1:
        return UnitPlan(())
    axes = layout.unit_axes(kind, ndim)
    if kind != "conv_transpose" or groups == 1:
        return UnitPlan(axes)
    held = layout._logical_positions(ndim)
    split = next(i for i, h in enumerate(held) if h == ("a",))
    if shape[split] % groups:
        raise ValueError(
            f"groups must divide the input channels of a transposed convolution's weight: "
            f"{groups} groups, shape {shape}"
        )
    view = (*shape[:split], groups, shape[split] // groups, *shape[split + 1 :])
    # In the view, the group axis sits at ``split`` and every later axis moves one along.
    shifted = tuple(a + 1 if a > split else a for a in axes)
    return UnitPlan(tuple(sorted((split, *shifted))), view)

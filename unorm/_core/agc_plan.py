"""AGC's parameter resolution, written once for every backend (``SPEC.md`` section 5).

A backend lists the parameters AGC may clip as :class:`Param` records (its own key, a
qualified name, the shape, the owning layer's kind and group count) and says how an
``exclude`` item or a ``unit_axes`` key names parameters (a *matcher*). :func:`resolve`
does the rest, with the same precedence and the same messages everywhere:

1. a parameter named by ``exclude`` is left alone (a layer excludes its weight and bias);
2. else a ``unit_axes`` mapping entry naming it gives its axes (axes of the tensor
   itself, never of a grouped view);
3. else a parameter of rank <= 1 is one unit;
4. else an int ``unit_axes`` gives the axis of every parameter of rank >= 2;
5. else the owning layer's kind decides, in the backend's layout
   (:func:`unorm._core.layer_kinds.unit_plan`, grouped transposed convolutions on their
   grouped view);
6. else the backend's own rule for a layer outside the table (:attr:`Param.axes`, e.g.
   attention projections whose rows are units);
7. else it is an error naming the parameter, its shape and its layer, and the two ways
   out (``unit_axes`` or ``exclude``).

Every check runs before any gradient changes: a backend resolves first and clips after.

Example:
    >>> from unorm._core.layer_kinds import KernelLayout
    >>> layouts = {"dense": KernelLayout("k b a")}
    >>> params = [Param("fc/kernel", "fc/kernel", (4, 3), "Dense", "dense"),
    ...           Param("fc/bias", "fc/bias", (3,), "Dense", "dense")]
    >>> plan = resolve(params, layouts, match=lambda item: [item] if item in
    ...                ("fc/kernel", "fc/bias") else [])
    >>> [(t.name, t.axes) for t in plan.targets]
    [('fc/kernel', (1,)), ('fc/bias', ())]
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from ..spec import UnitAxes, normalize_unit_axes
from .layer_kinds import KernelLayout, LayoutTable, unit_plan

__all__ = [
    "ACCEPTED",
    "NOT_KNOWN",
    "Matcher",
    "Param",
    "Resolution",
    "Target",
    "check_unit_axes_type",
    "describe_shape",
    "items_of",
    "layer_unit_axes",
    "resolve",
    "unknown_axis_error",
]


class _NotKnown:
    def __repr__(self) -> str:
        return "NOT_KNOWN"


#: :attr:`Param.axes` of a parameter whose layer has no rule of its own.
NOT_KNOWN: Any = _NotKnown()

#: What ``exclude`` and ``unit_axes`` take, on every backend (each its own objects).
ACCEPTED = "parameters, layers or their names"

#: Maps one ``exclude`` item or ``unit_axes`` key to the keys of the parameters it names
#: (empty: it names none); None when the item is of a type the backend does not take.
Matcher = Callable[[Any], "Sequence[Hashable] | None"]


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter as AGC sees it.

    Attributes:
        key: the backend's handle (``id`` of a tensor, a variable index, a name).
        name: the qualified name shown in messages (``"features.0.weight"``).
        shape: the parameter's shape.
        owner: the owning layer's type name (``"Conv2d"``), or None: no layer of the model
            owns it (a bare parameter list).
        kind: the owning layer's kind for this parameter (``"conv"``...), or None: the
            layer-kind table does not cover it.
        groups: the layer's group count (used by ``conv_transpose``).
        axes: the backend's own unit axes for a layer outside the table, or
            :data:`NOT_KNOWN`.
        layout: the layout of this parameter's weight where it is not the backend's
            declared one for its kind (a Gluon convolution built channels-last), else None.
        named_by: how the unknown-axis message tells the user to name this parameter in
            ``unit_axes`` (default: its name, quoted).
    """

    key: Hashable
    name: str
    shape: tuple[int, ...]
    owner: str | None = None
    kind: str | None = None
    groups: int = 1
    axes: UnitAxes | Any = NOT_KNOWN
    layout: KernelLayout | None = None
    named_by: str | None = None


@dataclasses.dataclass(frozen=True)
class Target:
    """How to clip one parameter: on ``view`` (None: its own shape), units along ``axes``
    (sorted, non-negative; empty: the whole tensor is one unit)."""

    key: Hashable
    name: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    view: tuple[int, ...] | None = None

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """The axes the norms reduce over (every axis of the clipped shape but the units')."""
        ndim = len(self.view if self.view is not None else self.shape)
        return tuple(d for d in range(ndim) if d not in self.axes)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What :func:`resolve` decided: a target per parameter to clip, in the order given,
    and the keys of the excluded ones."""

    targets: tuple[Target, ...]
    excluded: frozenset[Hashable]

    def by_key(self) -> dict[Hashable, Target]:
        """The targets keyed by their parameter's key."""
        return {t.key: t for t in self.targets}


def describe_shape(shape: Sequence[int]) -> str:
    """``shape`` as messages show it: ``(3, 4)``."""
    return str(tuple(int(d) for d in shape))


def unknown_axis_error(param: Param, hint: str = "") -> ValueError:
    """The error for a parameter of rank >= 2 whose output-unit axis nothing decides;
    ``hint`` names a further way out the backend offers."""
    where = (
        f" of {param.owner}" if param.owner is not None else ", which no layer of the model owns"
    )
    named = param.named_by if param.named_by is not None else repr(param.name)
    return ValueError(
        f"AGC does not know the output-unit axis of parameter {param.name!r} "
        f"(shape {describe_shape(param.shape)}){where}; pass "
        f"unit_axes={{{named}: <axis>}}{hint} or exclude it"
    )


def check_unit_axes_type(unit_axes: object) -> None:
    """Refuse a ``unit_axes`` of the wrong kind before it is looked into (a bool would be
    taken for an axis, a tuple compared with parameters)."""
    if unit_axes is None or isinstance(unit_axes, Mapping):
        return
    if isinstance(unit_axes, bool) or not isinstance(unit_axes, numbers.Integral):
        raise ValueError(
            "unit_axes must be an int (the axis of every parameter of rank >= 2), a mapping "
            f"from parameters to axes, or None, got {unit_axes!r}"
        )


def items_of(value: Any, single: Callable[[Any], bool]) -> list[Any]:
    """The items of an ``exclude`` value: None is none, one item (``single`` says which
    values are one item though iterable, such as a name or a layer) is a list of it.

    Example:
        >>> items_of("fc", lambda item: isinstance(item, str)), items_of(None, bool)
        (['fc'], [])
    """
    if value is None:  # nothing excluded
        return []
    if single(value) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _matched(
    what: str, items: Iterable[Any], match: Matcher, names: Callable[[Any], str]
) -> list[tuple[Any, list[Hashable]]]:
    """Each item with the keys it names; one error listing every item that names none."""
    out: list[tuple[Any, list[Hashable]]] = []
    missing: list[str] = []
    for item in items:
        keys = match(item)
        if keys is None:
            raise ValueError(f"{what} takes {ACCEPTED}, got {item!r}")
        if not keys:
            missing.append(names(item))
        out.append((item, list(keys)))
    if missing:
        raise ValueError(f"{what} names no parameter or layer of the model: {missing}")
    return out


def _from_layer(param: Param, shape: tuple[int, ...], layouts: LayoutTable) -> Target | None:
    """Steps 5 and 6 of the precedence: the target the owning layer decides (its kind in
    its layout, or the backend's own rule), or None where it decides nothing."""
    if param.kind is not None and (param.layout is not None or param.kind in layouts):
        layout = param.layout if param.layout is not None else layouts[param.kind]
        try:
            plan = unit_plan(param.kind, layout, shape, param.groups)
        except ValueError as err:
            raise ValueError(f"{err} (parameter {param.name!r})") from None
        return Target(param.key, param.name, shape, plan.axes, plan.view)
    if param.axes is not NOT_KNOWN:
        return Target(param.key, param.name, shape, _checked(param.axes, shape, param.name))
    return None


def _checked(axes: UnitAxes, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    try:
        return normalize_unit_axes(axes, len(shape))
    except ValueError as err:  # the shared message, plus which parameter
        raise ValueError(f"{err} (parameter {name!r} of shape {describe_shape(shape)})") from None


def resolve(
    params: Sequence[Param],
    layouts: LayoutTable,
    *,
    match: Matcher,
    exclude: Any = (),
    unit_axes: Any = None,
    single: Callable[[Any], bool] = lambda item: isinstance(item, str),
    name_of: Callable[[Any], str] = str,
    hint: str = "",
    check_axes: bool = True,
) -> Resolution:
    """Decide how AGC treats each of ``params`` (module docstring: the precedence).

    Args:
        params: the parameters, in the order the backend clips them.
        layouts: the backend's :class:`~unorm._core.layer_kinds.KernelLayout` per kind.
        match: how an ``exclude`` item or ``unit_axes`` key names parameters.
        exclude: one item or an iterable of items (``single`` says which values are one
            item though iterable, e.g. a name or a layer).
        unit_axes: None, an int for every parameter of rank >= 2, or a mapping from
            items to axes.
        name_of: how an item is shown in messages.
        hint: a further way out for a parameter nothing gives an axis to (``", pass
            model=..."``), inserted in that message.
        check_axes: False checks the names and axes given but leaves out, without an
            error, the parameters nothing gives an axis to (a check made before the
            parameters to clip are known).

    Raises ``ValueError`` for an item that names no parameter, a bad ``unit_axes``, an
    axis out of range or repeated, and a parameter nothing gives an axis to.
    """
    check_unit_axes_type(unit_axes)
    excluded: set[Hashable] = set()
    for _, keys in _matched("exclude", items_of(exclude, single), match, name_of):
        excluded.update(keys)
    overrides: dict[Hashable, UnitAxes] = {}
    named_by: dict[Hashable, Any] = {}
    if isinstance(unit_axes, Mapping):
        for item, keys in _matched("unit_axes", unit_axes, match, name_of):
            for key in keys:
                if key in overrides and overrides[key] != unit_axes[item]:
                    raise ValueError(
                        f"unit_axes gives one parameter two different axes: "
                        f"{name_of(named_by[key])!r} says {overrides[key]!r}, "
                        f"{name_of(item)!r} says {unit_axes[item]!r}"
                    )
                overrides[key] = unit_axes[item]
                named_by[key] = item
    every = int(unit_axes) if isinstance(unit_axes, numbers.Integral) else None
    targets: list[Target] = []
    for param in params:
        if param.key in excluded:
            continue
        shape = tuple(int(d) for d in param.shape)
        if param.key in overrides:
            axes = _checked(overrides[param.key], shape, param.name)
            targets.append(Target(param.key, param.name, shape, axes))
        elif len(shape) <= 1:
            targets.append(Target(param.key, param.name, shape, ()))
        elif every is not None:
            targets.append(Target(param.key, param.name, shape, _checked(every, shape, param.name)))
        elif (decided := _from_layer(param, shape, layouts)) is not None:
            targets.append(decided)
        elif check_axes:
            raise unknown_axis_error(param, hint)
    return Resolution(tuple(targets), frozenset(excluded))


def layer_unit_axes(params: Sequence[Param], layouts: LayoutTable) -> dict[str, UnitAxes]:
    """The output-unit axes the layers decide for each parameter of rank >= 2 (step 5 and
    6 of the precedence), by name: one axis as an int, several as a tuple. A grouped
    transposed convolution's axes are those of its grouped view (:class:`Target`).

    Example:
        >>> from unorm._core.layer_kinds import KernelLayout
        >>> layer_unit_axes([Param(0, "up.weight", (4, 2, 3, 3), "ConvTranspose2d",
        ...                        "conv_transpose", groups=2)], {"conv_transpose":
        ...                  KernelLayout("a b k")})
        {'up.weight': (0, 2)}
    """
    out: dict[str, UnitAxes] = {}
    for param in params:
        shape = tuple(int(d) for d in param.shape)
        decided = _from_layer(param, shape, layouts) if len(shape) > 1 else None
        if decided is not None:
            axes = decided.axes
            out[param.name] = axes[0] if len(axes) == 1 else axes
    return out

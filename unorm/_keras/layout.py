"""Which axes of a Keras variable index its output units, and which variables AGC skips.

The output-unit axes of a weight come from the layer that owns it (``SPEC.md`` section 5,
Output-unit axes; ``unorm.spec.output_unit_axes("keras", kind, ndim)``), never from the
tensor's rank: Keras kernels are ``(..., in, out)``, transposed convolutions
``(..., out, in)`` and depthwise kernels ``(..., in, multiplier)``.

Variables are named in ``exclude`` and ``unit_axes`` by the variable itself, by its layer,
or by a string: a string names every variable whose path (``"model/dense_1/kernel"``)
contains it as a run of whole ``/``-separated parts, so ``"dense_1"`` names both of that
layer's variables and ``"dense_1/kernel"`` its kernel only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeAlias

import keras

from .._core.agc_plan import Matcher, Param, layer_unit_axes
from .._core.agc_plan import resolve as resolve_params
from ..spec import UnitAxes
from . import internals
from .plugin import PLUGIN

__all__ = [
    "Exclude",
    "UnitAxesOverride",
    "VariableSetting",
    "final_classifier",
    "path_matches",
    "resolve",
    "short_names",
    "unit_axes_of",
]

#: What ``exclude`` accepts: variables, layers, names (see the module docstring).
Exclude: TypeAlias = Any
#: ``unit_axes`` overrides: one axis for every variable of rank >= 2, or per variable
#: (keyed by layer or name; Keras variables are not hashable, so a variable by its path).
UnitAxesOverride: TypeAlias = int | Mapping[Any, UnitAxes] | None


@dataclasses.dataclass(frozen=True)
class VariableSetting:
    """How AGC treats one variable: skip it, or clip with these (normalised) unit axes
    (empty: the whole tensor is one unit)."""

    path: str
    excluded: bool
    unit_axes: tuple[int, ...] = ()


def path_matches(name: str, path: str) -> bool:
    """Whether ``name`` is a run of whole ``/``-separated parts of ``path``.

    Example:
        >>> path_matches("dense_1", "model/dense_1/kernel")
        True
        >>> path_matches("dense", "model/dense_1/kernel")
        False
    """
    return f"/{name.strip('/')}/" in f"/{path}/"


def short_names(paths: Sequence[str]) -> list[str]:
    """For each path, its shortest ending (at least ``layer/variable``) that names no other
    of ``paths``: what AGC's config records, since the model-level prefix of a variable
    path can change when a saved model is loaded.

    Example:
        >>> short_names(["m/a/kernel", "m/b/kernel", "m/sub/a/kernel"])
        ['m/a/kernel', 'b/kernel', 'sub/a/kernel']
    """
    out = []
    for path in paths:
        parts = path.split("/")
        size = min(2, len(parts))
        while True:
            name = "/".join(parts[-size:])
            clashes = [other for other in paths if other != path and path_matches(name, other)]
            if not clashes or size == len(parts):
                break
            size += 1
        out.append(name)
    return out


def _layer_kinds(layer: Any) -> dict[str, str]:
    """Layer kind of each of ``layer``'s own weights, keyed by weight name."""
    layers = keras.layers
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)):
        return {"kernel": "conv_transpose"}
    if isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        return {"kernel": "depthwise_conv"}
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        return {"depthwise_kernel": "depthwise_conv", "pointwise_kernel": "conv"}
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        return {"kernel": "conv"}
    if isinstance(layer, layers.Dense):
        return {"kernel": "dense"}
    if isinstance(layer, layers.Embedding):
        return {"embeddings": "embedding"}
    return {}


def _owners(model: Any) -> dict[int, tuple[str, str | None]]:
    """``(layer type, layer kind)`` of every weight of ``model``, keyed by ``id`` of the
    variable: the type of the innermost layer that holds it (a nested layer's weights
    also appear in every enclosing layer's ``weights``), and the kind of that layer's
    weight where AGC knows it (None for a layer outside the table)."""
    found: dict[int, tuple[str, str | None]] = {}
    # all_layers lists every layer before the layers nested in it, so the last layer to
    # write a variable's entry is the innermost one holding it.
    for layer in internals.all_layers(model):
        kinds = _layer_kinds(layer)
        for variable in layer.weights:
            found[id(variable)] = (type(layer).__name__, kinds.get(variable.name))
    return found


def final_classifier(model: Any) -> Any:
    """The last ``Dense`` layer of ``model``: the classifier AGC leaves unclipped
    (Brock et al. 2021), to pass as ``AGC(..., exclude=final_classifier(model))``.

    Excluding the layer excludes both its kernel and its bias (``SPEC.md`` section 5).

    Example:
        >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
        ...                         keras.layers.Dense(2, name="head")])
        >>> final_classifier(net).name
        'head'
    """
    dense = [
        layer for layer in internals.all_layers(model) if isinstance(layer, keras.layers.Dense)
    ]
    if not dense:
        raise ValueError(f"model has no Dense layer to exclude, got {type(model).__name__}")
    return dense[-1]


@dataclasses.dataclass(frozen=True)
class _Untrained:
    """The key of a model weight that AGC is not given (a frozen layer's): naming it in
    ``exclude`` or ``unit_axes`` is no mistake, and it matches no variable AGC clips."""

    index: int


def _named(item: Any, variables: Sequence[Any]) -> list[int] | None:
    """Indices of ``variables`` that an item (variable, layer or name) names; None for an
    item of another type."""
    if isinstance(item, keras.Variable):
        return [i for i, v in enumerate(variables) if v is item]
    if isinstance(item, keras.layers.Layer):
        owned = {id(v) for v in item.weights}
        return [i for i, v in enumerate(variables) if id(v) in owned]
    if isinstance(item, str):
        return [i for i, v in enumerate(variables) if path_matches(item, v.path)]
    return None


def _matcher(variables: Sequence[Any], model: Any = None) -> Matcher:
    """The keys (indices of ``variables``) that an item (variable, layer or name) names.
    An item that names none of them but names a weight of ``model`` (a frozen layer's,
    which the optimizer does not update) gives that weight's :class:`_Untrained` key, so
    it is accepted as it is by the other backends."""
    weights = [] if model is None else list(model.weights)

    def match(item: Any) -> list[Hashable] | None:
        indices = _named(item, variables)
        if indices is None or indices or not weights:
            return None if indices is None else list(indices)
        return [_Untrained(j) for j in _named(item, weights) or []]

    return match


def describe(item: Any) -> str:
    """A name for ``item`` in messages and configs: its path, or the string itself."""
    if isinstance(item, (keras.Variable, keras.layers.Layer)):
        return str(item.path)
    return str(item)


def _single(item: Any) -> bool:
    return isinstance(item, (str, keras.Variable, keras.layers.Layer))


def _params(variables: Sequence[Any], model: Any) -> list[Param]:
    owners = {} if model is None else _owners(model)
    params = []
    for i, variable in enumerate(variables):
        owner, kind = owners.get(id(variable), (None, None))
        shape = tuple(int(d) for d in variable.shape)
        params.append(Param(i, str(variable.path), shape, owner, kind))
    return params


def unit_axes_of(model: Any) -> dict[str, UnitAxes]:
    """The output-unit axes (non-negative) of every weight of rank >= 2 whose layer AGC
    knows, by variable path (``SPEC.md`` section 5; Keras kernels ``(..., in, out)``).

    Example:
        >>> dense = keras.layers.Dense(3, name="fc")
        >>> dense.build((None, 4))
        >>> unit_axes_of(dense)
        {'fc/kernel': 1}
    """
    return layer_unit_axes(_params(list(model.weights), model), PLUGIN.layouts)


def resolve(
    variables: Sequence[Any],
    *,
    model: Any = None,
    exclude: Exclude = (),
    unit_axes: UnitAxesOverride = None,
    check_axes: bool = True,
) -> list[VariableSetting]:
    """How AGC treats each of ``variables`` (in order), decided by
    :func:`unorm._core.agc_plan.resolve` with the output-unit axes of the layers of
    ``model`` that own them. An ``exclude``/``unit_axes`` entry may name any weight of
    ``model``, also one not among ``variables`` (a frozen layer's).

    Raises ``ValueError`` for an ``exclude``/``unit_axes`` entry that names no variable,
    and, unless ``check_axes`` is False (a check of the names and axes alone, before the
    variables to clip are known), for a variable of rank >= 2 whose layer is unknown and
    which has no override; such a variable then comes back left out, as an excluded one.
    """
    params = _params(variables, model)
    plan = resolve_params(
        params,
        PLUGIN.layouts,
        match=_matcher(variables, model),
        exclude=exclude,
        unit_axes=unit_axes,
        single=_single,
        name_of=describe,
        hint="" if model is not None else ", model= (AGC reads the axis from its layer)",
        check_axes=check_axes,
    )
    targets = plan.by_key()
    return [
        VariableSetting(p.name, False, targets[p.key].axes)
        if p.key in targets
        else VariableSetting(p.name, True)
        for p in params
    ]

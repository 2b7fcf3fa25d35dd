"""Which axes of a Keras variable index its output units, and which variables AGC skips.

The output-unit axes of a weight come from the layer that owns it (``SPEC.md``, AGC,
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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import keras

from ..spec import UnitAxes, normalize_unit_axes, output_unit_axes

__all__ = [
    "Exclude",
    "UnitAxesOverride",
    "VariableSetting",
    "final_classifier",
    "path_matches",
    "resolve",
    "short_names",
]

#: What ``exclude`` accepts: variables, layers, names (see the module docstring).
Exclude: TypeAlias = Any
#: ``unit_axes`` overrides: one axis for every variable of rank >= 2, or per variable
#: (keyed by variable, layer or name).
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


def _all_layers(model: Any) -> list[Any]:
    # Layer._flatten_layers is the one walk that reaches layers nested in any container
    # (Sequential, functional, subclassed models, layers holding layers).
    return list(model._flatten_layers(include_self=True, recursive=True))


def layer_unit_axes(model: Any) -> dict[int, UnitAxes]:
    """Output-unit axes of the weights of every known layer in ``model``, keyed by
    ``id`` of the variable. Weights of rank <= 1 and of unknown layers are left out."""
    found: dict[int, UnitAxes] = {}
    for layer in _all_layers(model):
        kinds = _layer_kinds(layer)
        if not kinds:
            continue
        for variable in layer.weights:
            kind = kinds.get(variable.name)
            rank = len(variable.shape)
            if kind is not None and rank >= 2:
                found[id(variable)] = output_unit_axes("keras", kind, rank)
    return found


def final_classifier(model: Any) -> Any:
    """The last ``Dense`` layer of ``model``: the classifier AGC leaves unclipped
    (Brock et al. 2021), to pass as ``AGC(..., exclude=final_classifier(model))``.

    Excluding the layer excludes both its kernel and its bias (``SPEC.md``, AGC).

    Example:
        >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
        ...                         keras.layers.Dense(2, name="head")])
        >>> final_classifier(net).name
        'head'
    """
    dense = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"model has no Dense layer to exclude, got {type(model).__name__}")
    return dense[-1]


def _items(value: Any) -> list[Any]:
    if isinstance(value, (str, keras.Variable, keras.layers.Layer)):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def _selected(item: Any, variables: Sequence[Any]) -> list[int]:
    """Indices of ``variables`` that ``item`` (variable, layer or name) names."""
    if isinstance(item, keras.Variable):
        return [i for i, v in enumerate(variables) if v is item]
    if isinstance(item, keras.layers.Layer):
        owned = {id(v) for v in item.weights}
        return [i for i, v in enumerate(variables) if id(v) in owned]
    if isinstance(item, str):
        return [i for i, v in enumerate(variables) if path_matches(item, v.path)]
    raise ValueError(
        "exclude and unit_axes take keras Variables, Layers or names (str), "
        f"got {type(item).__name__}"
    )


def describe(item: Any) -> str:
    """A name for ``item`` in messages and configs: its path, or the string itself."""
    if isinstance(item, (keras.Variable, keras.layers.Layer)):
        return str(item.path)
    return str(item)


def _normalised(axes: UnitAxes, shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    try:
        return normalize_unit_axes(axes, len(shape))
    except ValueError as err:  # the shared message, plus which variable
        raise ValueError(f"{err} (variable {path!r} of shape {shape})") from None


def resolve(
    variables: Sequence[Any],
    *,
    model: Any = None,
    exclude: Exclude = (),
    unit_axes: UnitAxesOverride = None,
) -> list[VariableSetting]:
    """How AGC treats each of ``variables`` (in order).

    Precedence per variable: excluded; else an override in ``unit_axes`` (a mapping entry
    naming it, or one int for every variable of rank >= 2); else the axes of the layer
    of ``model`` that owns it; a variable of rank <= 1 is one unit. Raises ``ValueError``
    for an ``exclude``/``unit_axes`` entry that names no variable, and for a variable of
    rank >= 2 whose layer is unknown and which has no override.
    """
    excluded: set[int] = set()
    missing: list[str] = []
    for item in _items(exclude):
        hits = _selected(item, variables)
        if not hits:
            missing.append(describe(item))
        excluded.update(hits)
    if missing:
        raise ValueError(f"exclude names parameters that do not exist: {missing}")

    overrides: dict[int, UnitAxes] = {}
    every: int | None = None
    if isinstance(unit_axes, int) and not isinstance(unit_axes, bool):
        every = unit_axes
    elif isinstance(unit_axes, Mapping):
        missing = []
        for key, axes in unit_axes.items():
            hits = _selected(key, variables)
            if not hits:
                missing.append(describe(key))
            for i in hits:
                overrides[i] = axes
        if missing:
            raise ValueError(f"unit_axes names parameters that do not exist: {missing}")
    elif unit_axes is not None:
        raise ValueError(
            "unit_axes must be an int, a mapping from variables, layers or names to "
            f"axes, or None, got {unit_axes!r}"
        )

    from_layers = {} if model is None else layer_unit_axes(model)
    settings = []
    for i, variable in enumerate(variables):
        path = str(variable.path)
        shape = tuple(int(d) for d in variable.shape)
        if i in excluded:
            settings.append(VariableSetting(path, True))
            continue
        chosen: UnitAxes
        if i in overrides:
            chosen = overrides[i]
        elif len(shape) <= 1:
            chosen = None
        elif every is not None:
            chosen = every
        elif id(variable) in from_layers:
            chosen = from_layers[id(variable)]
        else:
            hint = "" if model is not None else "pass model= so AGC can read it from its layer, or "
            raise ValueError(
                f"unit_axes has no entry for parameter {path!r} of shape {shape}: {hint}say "
                "which axis indexes its output units"
            )
        settings.append(VariableSetting(path, False, _normalised(chosen, shape, path)))
    return settings

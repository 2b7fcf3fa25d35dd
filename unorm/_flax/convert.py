"""``unorm.flax.convert``: swap a model's ``nnx.BatchNorm`` layers for unorm's, in place."""

from __future__ import annotations

from typing import Any

from flax import nnx

from .batchnorm import BatchNorm

__all__ = ["convert"]


def _converted(native: nnx.BatchNorm, preset: str | None) -> BatchNorm:
    """unorm's layer with ``native``'s settings (its momentum read as the old value's
    weight) and its parameters and running statistics."""
    if native.axis_index_groups is not None:
        raise ValueError("convert does not take an nnx.BatchNorm with axis_index_groups")
    if not isinstance(native.axis, int):
        raise ValueError(f"convert takes one feature axis, got axis={native.axis!r}")
    layer = BatchNorm(
        native.num_features,
        axis=native.axis,
        eps=native.epsilon,
        momentum=1.0 - native.momentum,
        use_bias=native.use_bias,
        use_scale=native.use_scale,
        preset=preset,
        use_running_average=bool(native.use_running_average),
        axis_name=native.axis_name,
        param_dtype=native.param_dtype,
    )
    for name in ("scale", "bias", "mean", "var"):
        held = getattr(native, name)
        if held is not None:
            getattr(layer, name)[...] = held[...]
    return layer


def convert(model: Any, preset: str | None = "flax") -> Any:
    """Replace every ``nnx.BatchNorm`` in ``model`` (attributes, lists and dicts of its
    modules, nested) by :class:`unorm.flax.BatchNorm` with the same eps, momentum, feature
    axis, flags, parameters and running statistics; returns ``model`` (or the converted
    layer when ``model`` is one).

    ``preset="flax"`` (default) keeps ``nnx.BatchNorm``'s semantics (biased running
    variance, no guard, one value per feature allowed), so the model computes what it
    did; ``preset=None`` gives the canonical convention with the same numbers.

    Example:
        >>> net = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
        ...                      nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
        >>> type(convert(net).layers[1]).__name__
        'BatchNorm'
    """
    if isinstance(model, nnx.BatchNorm):
        return _converted(model, preset)
    seen: set[int] = set()

    def swap(value: Any) -> Any:
        if isinstance(value, nnx.BatchNorm):
            return _converted(value, preset)
        if isinstance(value, list):
            value[:] = [swap(v) for v in value]
        elif isinstance(value, dict):
            for key in list(value):
                value[key] = swap(value[key])
        elif isinstance(value, nnx.Module) and id(value) not in seen:
            seen.add(id(value))
            for name, child in list(vars(value).items()):
                replaced = swap(child)
                if replaced is not child:
                    setattr(value, name, replaced)
        return value

    swap(model)
    return model

"""``unorm.keras.convert``: a copy of a Keras model with unorm's BatchNorm in place of
``keras.layers.BatchNormalization``, weights carried over."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from ..spec import BatchNormSpec
from .batchnorm import BatchNorm

__all__ = ["convert"]

# Arguments of BatchNormalization that BatchNorm takes unchanged.
_PASSED = (
    "name",
    "trainable",
    "dtype",
    "synchronized",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
)


def _replacement(layer: Any, preset: str | None, overrides: dict[str, Any]) -> BatchNorm:
    config = layer.get_config()
    # Batch Renormalization (SPEC.md section 2): its bounds and renorm momentum translate
    # under every preset; a layer without it keeps none of its (unused) settings.
    if config.get("renorm"):
        renorm = BatchNormSpec.from_native(
            "keras",
            renorm=True,
            renorm_clipping=config.get("renorm_clipping"),
            renorm_momentum=config.get("renorm_momentum", 0.99),
        )
        renorm_settings = {
            f.name: getattr(renorm, f.name)
            for f in dataclasses.fields(renorm)
            if f.name.startswith("renorm") and f.name != "renorm_running"
        }
    else:
        renorm_settings = {}
    if preset == "keras":
        # The layer's own momentum and epsilon, translated: outputs stay exactly as they were.
        spec = BatchNormSpec.from_native(
            "keras",
            momentum=config["momentum"],
            epsilon=config["epsilon"],
            center=config["center"],
            scale=config["scale"],
            axis=config["axis"],
        ).replace(**renorm_settings, **overrides)
    else:
        spec = BatchNormSpec.from_preset(
            preset,
            axis=config["axis"],
            center=config["center"],
            scale=config["scale"],
            **{**renorm_settings, **overrides},
        )
    # Every setting of the spec but the axis and the preset's name, so that no override
    # (and no setting added to the spec later) is dropped on the way; the clipping bounds
    # as the layer's one renorm_clipping argument.
    bounds = ("renorm_rmax", "renorm_rmin", "renorm_dmax")
    settings: dict[str, Any] = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.name not in ("axis", "preset", *bounds)
    }
    settings["renorm_clipping"] = spec.renorm_clipping
    passed = {key: config[key] for key in _PASSED if key in config}
    return BatchNorm(spec.axis, preset=spec.preset, **settings, **passed)


def _copy_weights(source: Any, target: Any) -> None:
    if isinstance(source, keras.layers.BatchNormalization) and isinstance(target, BatchNorm):
        names = ["gamma", "beta", "moving_mean", "moving_variance", "renorm_mean", "renorm_stddev"]
        if target.moving_stddev is not None:
            names.append("moving_stddev")
        for name in names:
            old, new = getattr(source, name, None), getattr(target, name)
            if old is not None and new is not None:
                new.assign(old)
        return
    target.set_weights(source.get_weights())


def convert(model: Any, preset: str | None = "keras", **overrides: Any) -> Any:
    """Rebuild ``model`` with every ``keras.layers.BatchNormalization`` replaced by
    :class:`unorm.keras.BatchNorm`, all weights copied; ``model`` itself is unchanged.

    Works on Sequential and functional models, nested ones included. With
    ``preset="keras"`` (default) each new layer takes its native layer's own ``momentum``
    and ``epsilon`` (translated to unorm's convention): the converted model computes
    exactly what the original did, in training and inference. Another preset (``None``:
    canonical, ``"torch"``, ``"mxnet"``) gives every BatchNorm that preset's settings
    (axis, center and scale are kept); ``overrides`` (in unorm's convention, e.g.
    ``skip_nonfinite=True``) apply to every converted layer. Layers keep their names.
    A layer with ``renorm=True`` keeps Batch Renormalization, its clipping bounds and its
    ``renorm_momentum`` (translated) under every preset, and its ``renorm_mean`` and
    ``renorm_stddev`` weights; ``preset="keras"`` also keeps its ``moving_stddev``
    (``renorm_running="stddev"``), so it trains exactly as before.

    Example:
        >>> import numpy as np
        >>> native = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                            keras.layers.BatchNormalization()])
        >>> ported = convert(native)
        >>> type(ported.layers[1]).__name__
        'BatchNorm'
        >>> x = np.ones((2, 3), "float32")
        >>> bool(np.array_equal(native(x), ported(x)))
        True
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model must be built (its weights exist) to be converted: {model.name!r}")
    if preset is not None and preset not in ("keras", "torch", "mxnet"):
        BatchNormSpec.from_preset(preset)  # raises the standard message
    pairs: list[tuple[Any, Any]] = []

    def clone(layer: Any) -> Any:
        if isinstance(layer, keras.layers.BatchNormalization):
            new = _replacement(layer, preset, overrides)
        else:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    converted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for source, target in pairs:
        if source.weights:
            _copy_weights(source, target)
    return converted

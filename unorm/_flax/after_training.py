"""BatchNorm after training for Flax NNX (``SPEC.md`` section 8): ``freeze``.

``fold`` and ``recalibrate`` need the model's data flow (which layer feeds each
BatchNorm) and a pass over data that sees each BatchNorm's input; an NNX module has
neither a graph nor hooks, so they are not offered yet.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from .._core import after_training as core
from .batchnorm import BatchNorm
from .convert import convert

__all__ = ["FrozenParam", "freeze"]


class FrozenParam(nnx.Variable):  # type: ignore[type-arg]
    """A parameter :func:`freeze` fixed: not an ``nnx.Param``, so ``nnx.grad`` and
    ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone (JAX has no ``requires_grad``)."""


def _batchnorms(model: Any) -> list[tuple[str, Any]]:
    return [
        (".".join(str(p) for p in path) or type(node).__name__, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, (BatchNorm, nnx.BatchNorm))
    ]


def freeze(model: Any, trainable: bool = False, *, convert_native: bool = True) -> Any:
    """Freeze every BatchNorm of ``model`` (``SPEC.md`` section 8, *Frozen mode*): each
    normalises with its running statistics in training and in inference and never updates
    them, whatever ``model.train()`` says; ``scale`` and ``bias`` keep learning with
    ``trainable=True`` and are fixed by default (made :class:`FrozenParam`).

    Native ``nnx.BatchNorm`` layers are first converted to unorm's
    (``preset="flax"``, :func:`~unorm.flax.convert`) unless ``convert_native=False``, in
    which case they are left as they are. Works in place and returns the model (a new
    object when ``model`` itself is a native BatchNorm). A BatchNorm with
    ``track_running_stats=False`` is a ``ValueError``, before any layer changes.

    Example:
        >>> net = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        ...                      nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
        >>> net = freeze(net)
        >>> net.train()
        >>> net.layers[1].frozen, type(net.layers[1].scale).__name__
        (True, 'FrozenParam')
    """
    if not isinstance(trainable, bool):
        raise ValueError(f"trainable must be True or False, got {trainable!r}")
    for name, layer in _batchnorms(model):
        if isinstance(layer, BatchNorm) and not layer.track_running_stats:
            raise ValueError(core.freeze_needs_running_stats(name))
    if convert_native:
        model = convert(model, preset="flax")
    for _, layer in _batchnorms(model):
        if not isinstance(layer, BatchNorm):
            continue
        layer.frozen = True
        if not trainable:
            for attribute in ("scale", "bias"):
                held = getattr(layer, attribute)
                if isinstance(held, nnx.Param):
                    setattr(layer, attribute, FrozenParam(held[...]))
    return model

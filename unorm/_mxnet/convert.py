"""Replace the ``gluon.nn.BatchNorm`` layers of a model with unorm's, keeping their state."""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from ..spec import validate_preset
from . import internals
from .batchnorm import BatchNorm

__all__ = ["convert"]


def _natives(block: Any) -> list[Any]:
    """Every layer of exactly ``gluon.nn.BatchNorm`` type in ``block``, itself included."""
    if type(block) is gluon.nn.BatchNorm:
        return [block]
    return [layer for _, child in internals.children(block) for layer in _natives(child)]


def _check_convertible(old: Any) -> None:
    """Refuse a layer whose numbers a unorm BatchNorm cannot keep (before any is replaced)."""
    if not internals.differentiable(old.beta) and _adds_a_shift(old.beta):
        # Gluon's center=False freezes beta but still adds it; unorm's adds 0 (SPEC.md
        # section 2), and a frozen parameter cannot become a learned one here.
        raise ValueError(
            f"layer {old.name!r}: gluon.nn.BatchNorm(center=False) adds its stored beta, "
            "which is not zero here, where unorm's center=False adds 0; set its beta to "
            "zero (the output then changes by it) or build the layer with center=True"
        )


def _replacement(old: Any, preset: str | None) -> BatchNorm:
    kwargs = internals.layer_arguments(old)
    center = internals.differentiable(old.beta)  # what Gluon built from center=
    scale = not kwargs["fix_gamma"]
    # The new layer asks its ParameterDict for gamma/beta with the grad_req that center and
    # scale imply; a frozen layer's params say 'null', so match them for the hand-over.
    frozen = {p: p.grad_req for p in (old.gamma, old.beta)}
    old.gamma.grad_req = "write" if scale else "null"
    old.beta.grad_req = "write" if center else "null"
    try:
        new = _build(old, kwargs, center, scale, preset)
    finally:
        for param, req in frozen.items():
            param.grad_req = req
    if kwargs.get("use_global_stats"):
        # Gluon's frozen BatchNorm: running statistics in training too, gamma and beta
        # learning as their grad_req says (SPEC.md section 8, *Frozen mode*).
        new.frozen = True
    counter = new.num_batches_tracked
    if counter is not None:
        try:
            contexts = old.gamma.list_ctx()
        except RuntimeError:  # not initialized yet: initialize() will do the counter too
            contexts = None
        if contexts is not None:
            counter.initialize(ctx=contexts)
    return new


def _adds_a_shift(beta: Any) -> bool:
    """Whether a Gluon ``center=False`` layer's frozen beta is anything but zero (its values
    once initialized, else its initializer)."""
    try:
        return bool((beta.data().abs().sum() > 0).asscalar())
    except (RuntimeError, mx.gluon.parameter.DeferredInitializationError):
        init = beta.init
        return not (init is None or init == "zeros" or isinstance(init, mx.init.Zero))


def _build(old: Any, kwargs: Any, center: bool, scale: bool, preset: str | None) -> BatchNorm:
    return BatchNorm(
        # Unknown channels are 0 (or -1 under MXNet's NumPy shape semantics): deferred.
        max(old.gamma.shape[0], 0) if old.gamma.shape else 0,
        axis=kwargs["axis"],
        eps=kwargs["eps"],
        momentum=1.0 - kwargs["momentum"],  # Gluon's momentum weighs the old value
        center=center,
        scale=scale,
        preset=preset,
        beta_initializer=old.beta.init,
        gamma_initializer=old.gamma.init,
        running_mean_initializer=old.running_mean.init,
        running_variance_initializer=old.running_var.init,
        # Same prefix and the old ParameterDict: the new layer takes over the very same
        # Parameter objects, so values, contexts, trainers and file names carry over.
        prefix=old.prefix,
        params=old.params,
    )


def convert(block: Any, preset: str | None = "mxnet") -> Any:
    """Replace every ``gluon.nn.BatchNorm`` in ``block`` by :class:`unorm.mxnet.BatchNorm`.

    Each new layer keeps the old one's channels, ``axis``, ``epsilon``, ``momentum``
    (translated: Gluon's 0.9 is unorm's 0.1), ``center``, ``scale`` and initializers, and
    takes over its very Parameter objects (values on every device, names, trainers), so no
    state is lost. ``preset`` sets the rest of the behaviour: ``"mxnet"`` (default) keeps
    Gluon's numbers (biased running variance, update when backward runs), ``None`` switches
    to the canonical convention (unbiased feed, forward update, guard). Returns ``block``
    (or its replacement when ``block`` itself is a BatchNorm). Hybridize again afterwards if
    the model was hybridized. A ``use_global_stats=True`` layer becomes a frozen
    :class:`BatchNorm` (``SPEC.md`` section 8), computing Gluon's numbers. A
    ``center=False`` layer whose frozen beta is not zero raises ``ValueError`` (Gluon adds
    it, unorm's ``center=False`` adds 0), before any layer is replaced.

    Only layers whose type is exactly ``gluon.nn.BatchNorm`` are replaced; its subclasses
    are left as they are, without a warning: ``gluon.nn.BatchNormReLU`` (the fused ReLU
    would be lost) and ``gluon.contrib.nn.SyncBatchNorm``, whose cross-device settings
    (``num_devices``, the rendezvous key) have no translation here. Put
    :class:`unorm.mxnet.SyncBatchNorm` (``num_devices=...``, exact merge of uneven
    slices) in its place by hand.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Dense(4, in_units=2), gluon.nn.BatchNorm(in_channels=4))
        >>> net = convert(net, preset=None)
        >>> type(net[1]).__module__, net[1].spec.momentum
        ('unorm._mxnet.batchnorm', 0.09999999999999998)
    """
    if preset is not None:
        validate_preset(preset)
    for old in _natives(block):  # every refusal before anything is replaced
        _check_convertible(old)
    return _convert(block, preset)


def _convert(block: Any, preset: str | None) -> Any:
    if type(block) is gluon.nn.BatchNorm:
        return _replacement(block, preset)
    for name, child in internals.children(block):
        if type(child) is gluon.nn.BatchNorm:
            new = _replacement(child, preset)
            internals.replace_child(block, name, new)
            for attr, value in list(vars(block).items()):
                if value is child:
                    # Block.__setattr__ refuses a change of layer type; this is deliberate.
                    object.__setattr__(block, attr, new)
        else:
            _convert(child, preset)
    internals.clear_cached_graph(block)
    return block

"""BatchNorm after training for Keras 3 (``SPEC.md`` section 8): ``fold``, ``recalibrate``
and ``freeze`` over Sequential and functional models, nested ones included.

The decisions and messages are the core's (:mod:`unorm._core.after_training`); this module
reads the model's functional graph (:func:`unorm._keras.port._graph_nodes`), rebuilds it
with ``keras.models.clone_model`` and moves the weights through NumPy.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from typing import IO, Any

import keras
import numpy as np

from .._core import after_training as core
from . import internals
from .batchnorm import BatchNorm
from .plugin import PLUGIN
from .port import _graph_nodes

__all__ = ["fold", "freeze", "recalibrate"]

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_CONV_TRANSPOSE = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def _is_batch_norm(layer: Any) -> bool:
    return isinstance(layer, (BatchNorm, keras.layers.BatchNormalization))


def _producer_kind(layer: Any) -> str | None:
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, _CONV):
        return "conv"
    if isinstance(layer, _CONV_TRANSPOSE):
        return "conv_transpose"
    if isinstance(layer, _DEPTHWISE):
        return "depthwise_conv"
    return None


def _channel_axis(layer: Any, kind: str) -> int:
    if kind != "dense" and getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return -1


def _out_channels(layer: Any, kind: str) -> int:
    shape = tuple(layer.kernel.shape)
    if kind == "depthwise_conv":
        return int(shape[-2] * shape[-1])  # (*k, I, M): channel i*M + m
    if kind == "conv_transpose":
        return int(shape[-2])  # (*k, O, I)
    return int(shape[-1])  # Dense (in, units), Conv (*k, I/g, O)


def _bn_settings(layer: Any) -> tuple[int | None, float, bool]:
    """A BatchNorm's feature axis (None: several axes), eps, and whether it tracks."""
    if isinstance(layer, BatchNorm):
        return layer.spec.axis, layer.spec.eps, layer.spec.track_running_stats
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        axis = axis[0] if len(axis) == 1 else None
    return axis, float(layer.epsilon), True


def _describe(tensor: Any) -> str:
    history = internals.history(tensor)
    op = None if history is None else history.operation
    if op is None or isinstance(op, keras.layers.InputLayer):
        return "the model's input"
    return f"{type(op).__name__} {op.name!r}"


def _graphs(model: Any) -> list[Any]:
    """``model`` and every Sequential or functional model nested in it."""
    return [m for m in internals.all_layers(model) if isinstance(m, keras.Model)]


def _candidates(model: Any) -> list[tuple[core.FoldCandidate, Any, Any]]:
    """Each BatchNorm call of every graph in ``model``: the candidate, the BatchNorm layer
    and the producer layer (or None)."""
    graphs = [(g, _graph_nodes(g)) for g in _graphs(model)]
    for g, nodes in graphs:
        if not nodes and any(_is_batch_norm(layer) for layer in g.layers):
            raise ValueError(
                f"fold needs Sequential or functional models; the data flow of "
                f"{type(g).__name__} {g.name!r} (a subclassed model, or one not built on an "
                "Input) cannot be read"
            )
    calls: dict[int, int] = {}
    for _, nodes in graphs:
        for node in nodes:
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    out: list[tuple[core.FoldCandidate, Any, Any]] = []
    for g, nodes in graphs:
        outputs = {id(t) for t in keras.tree.flatten(g.outputs)}
        for node in nodes:
            bn = node.operation
            if not _is_batch_norm(bn):
                continue
            axis, _, tracks = _bn_settings(bn)
            source = node.input_tensors[0]
            rank = len(source.shape)
            history = internals.history(source)
            producer = None if history is None else history.operation
            kind = _producer_kind(producer)
            base = core.FoldCandidate(
                bn.name,
                bn_uses=calls[id(bn)],
                tracks_running_stats=tracks,
                bn_axis=rank if axis is None else axis,  # several axes: never the channel's
                rank=rank,
                num_features=int(source.shape[axis]) if axis is not None else 0,
            )
            if kind is None or producer is None:
                out.append((dataclasses.replace(base, source=_describe(source)), bn, None))
                continue
            others = [
                f"{type(n.operation).__name__} {n.operation.name!r}"
                for n in nodes
                if n is not node and any(t is source for t in n.input_tensors)
            ]
            if id(source) in outputs:
                others.append("the model's output")
            candidate = dataclasses.replace(
                base,
                producer=producer.name,
                producer_kind=kind,
                other_users=tuple(others),
                producer_uses=calls.get(id(producer), 1),
                channel_axis=_channel_axis(producer, kind),
                out_channels=_out_channels(producer, kind),
            )
            out.append((candidate, bn, producer))
    return out


def _numpy(variable: Any) -> np.ndarray | None:
    return None if variable is None else np.asarray(keras.ops.convert_to_numpy(variable))


def _folded_weights(producer: Any, kind: str, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    _, eps, _ = _bn_settings(bn)
    kernel = _numpy(producer.kernel)
    assert kernel is not None
    plan = core.fold_plan(kind, PLUGIN.layouts[kind], tuple(kernel.shape))
    mean, var = _numpy(bn.moving_mean), _numpy(bn.moving_variance)
    assert mean is not None and var is not None
    return core.fold_arrays(
        kernel,
        _numpy(producer.bias) if producer.use_bias else None,
        mean,
        var,
        _numpy(getattr(bn, "gamma", None)),
        _numpy(getattr(bn, "beta", None)),
        eps,
        plan,
    )


def fold(model: Any, strict: bool = False) -> Any:
    """A copy of ``model`` with every BatchNorm that directly follows a ``Dense``,
    ``Conv1D/2D/3D`` (grouped too), ``Conv*DTranspose`` or ``DepthwiseConv1D/2D`` folded
    into that layer's kernel and bias (``SPEC.md`` section 8).

    Works for unorm's :class:`BatchNorm` in every preset and for
    ``keras.layers.BatchNormalization`` (also with ``trainable=False``), in Sequential and
    functional models, nested ones included. The new kernel and bias are computed in
    float64 and stored in the layer's variable dtype; each folded BatchNorm becomes a
    ``keras.layers.Identity`` of its name, so the model's structure and layer names stay.
    The copy computes the unfolded model's inference output; ``model`` is untouched.

    A BatchNorm that cannot be folded exactly (its input feeds another layer too, is no
    such layer's output, meets it on another axis, or it is called more than once) stays in
    place and is reported in a ``FoldWarning``; ``strict=True`` raises ``FoldError``. The
    copy's ``fold_report`` lists every BatchNorm as a ``FoldEntry``.

    Example:
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                         keras.layers.BatchNormalization()])
        >>> [type(layer).__name__ for layer in fold(net).layers]
        ['Dense', 'Identity']
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model must be built (its weights exist) to be folded: {model.name!r}")
    entries: list[core.FoldEntry] = []
    folds: dict[int, tuple[Any, str, Any]] = {}  # id(producer) -> (producer, kind, bn)
    removed: set[int] = set()
    for candidate, bn, producer in _candidates(model):
        reason = core.fold_refusal(candidate)
        entries.append(
            core.FoldEntry(candidate.bn, candidate.producer if not reason else None, reason)
        )
        if reason is None:
            assert candidate.producer_kind is not None
            folds[id(producer)] = (producer, candidate.producer_kind, bn)
            removed.add(id(bn))
    message = core.finish_report(entries, strict)
    pairs: list[tuple[Any, Any]] = []

    identities: set[int] = set()

    def clone(layer: Any) -> Any:
        if id(layer) in removed:
            # The BatchNorm's dtype policy: the default (float32) would cast a float64
            # model's activations down where the BatchNorm stood.
            identity = keras.layers.Identity(name=layer.name, dtype=layer.dtype_policy.name)
            identities.add(id(identity))
            return identity
        config = layer.get_config()
        if id(layer) in folds:
            config["use_bias"] = True  # a folded layer always has a bias
        new = layer.__class__.from_config(config)
        pairs.append((layer, new))
        return new

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        # The graph replays each call with its arguments; an Identity takes the input only
        # (a BatchNorm's call also had training and mask).
        return layer(args[0]) if id(layer) in identities else layer(*args, **kwargs)

    # A Sequential replays no calls (and refuses call_function); its layers take one input.
    replay = {} if isinstance(model, keras.Sequential) else {"call_function": call}
    folded = keras.models.clone_model(model, clone_function=clone, recursive=True, **replay)
    for source, target in pairs:
        if id(source) in folds:
            producer, kind, bn = folds[id(source)]
            kernel, bias = _folded_weights(producer, kind, bn)
            target.kernel.assign(kernel)
            target.bias.assign(bias.astype(keras.backend.standardize_dtype(target.bias.dtype)))
        elif source.weights:
            target.set_weights(source.get_weights())
    folded.fold_report = tuple(entries)
    if message is not None:
        warnings.warn(message, core.FoldWarning, stacklevel=2)
    return folded


# -- freeze ------------------------------------------------------------------------------


def freeze(model: Any, trainable: bool = False) -> Any:
    """Freeze every BatchNorm of ``model`` (``SPEC.md`` section 8, *Frozen mode*): each
    normalises with its moving statistics, also when called with ``training=True``, and
    never updates them.

    By default ``gamma`` and ``beta`` are fixed too: that is Keras's own convention for
    ``trainable=False`` on a BatchNormalization layer, which unorm's :class:`BatchNorm`
    follows, so it is applied as that flag (to native layers as well). With
    ``trainable=True`` they keep learning: native layers are first replaced by unorm's
    (:func:`~unorm.keras.convert`, ``preset="keras"``, which returns a new model) and each
    :class:`BatchNorm` gets ``frozen=True``. Otherwise the model is changed in place
    (recompile a compiled model) and returned. A BatchNorm with
    ``track_running_stats=False`` is a ``ValueError``, before any change.

    Example:
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
        >>> freeze(net).layers[0].trainable
        False
    """
    from .convert import convert

    if not isinstance(trainable, bool):
        raise ValueError(f"trainable must be True or False, got {trainable!r}")
    layers = [layer for layer in internals.all_layers(model) if _is_batch_norm(layer)]
    for layer in layers:
        if not _bn_settings(layer)[2]:
            raise ValueError(core.freeze_needs_running_stats(layer.name))
    if trainable:
        if any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers):
            model = convert(model, preset="keras")
        for layer in internals.all_layers(model):
            if isinstance(layer, BatchNorm):
                layer.frozen = True
        return model
    for layer in layers:
        layer.trainable = False
    return model


# -- recalibrate -------------------------------------------------------------------------


def _state(layer: Any) -> list[Any]:
    names = ("moving_mean", "moving_variance", "num_batches_tracked")
    return [getattr(layer, n) for n in names if getattr(layer, n, None) is not None]


def _run(model: Any, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(dict(batch), training=True)
    elif isinstance(batch, tuple):
        model(batch[0] if len(batch) == 1 else list(batch), training=True)
    else:
        model(batch, training=True)


def recalibrate(model: Any, batches: Iterable[Any], *, progress: bool | IO[str] = False) -> Any:
    """Set every BatchNorm's moving statistics to the exact statistics of its input over
    all of ``batches`` (``SPEC.md`` section 8, *Recalibrate*; "precise BN").

    Each batch runs through ``model`` eagerly with ``training=True`` (every BatchNorm
    normalising with its batch statistics, as in training); each BatchNorm's input gives
    per-feature count, mean and M2 in float64, merged exactly over the batches, so an
    uneven last batch weighs by its count. Then ``moving_mean`` is the merged mean and
    ``moving_variance`` the layer's own estimator on the total count: ``M2/N`` for
    ``keras.layers.BatchNormalization`` (Keras feeds the biased variance) and for unorm's
    :class:`BatchNorm` with ``running_var="biased"``, ``M2/(N-1)`` for ``"unbiased"``.
    Frozen layers (``trainable=False``, ``frozen=True``) keep theirs. Everything else is
    unchanged. For a model built under a ``tf.distribute`` strategy, pass each replica's
    share of the data as batches of its own: the shares merge exactly and every replica's
    copy of the moving statistics is set.

    Args:
        model: a built Keras model, changed in place and returned.
        batches: an iterable of model inputs (an array, a tuple of the inputs, or a mapping
            of named inputs) per batch, e.g. a ``tf.data.Dataset`` of inputs only.
        progress: draw a progress bar on ``sys.stderr`` (True) or on the given stream.

    Raises ``ValueError``, the model unchanged, for a model without such a BatchNorm, no
    batches, a batch giving non-finite statistics, a masked BatchNorm input, a BatchNorm that
    saw no values, or whatever the training call itself refuses.

    Example:
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
        >>> data = [np.ones((2, 3), "float32"), np.zeros((2, 3), "float32")]
        >>> recalibrate(net, data).layers[0].moving_mean.numpy().tolist()
        [0.5, 0.5, 0.5]
    """
    targets = [
        layer
        for layer in internals.all_layers(model)
        if _is_batch_norm(layer)
        and layer.trainable
        and not getattr(layer, "frozen", False)
        and _bn_settings(layer)[2]
    ]
    if not targets:
        raise ValueError(core.NO_BATCHNORM)
    saved = [[np.array(keras.ops.convert_to_numpy(v)) for v in _state(layer)] for layer in targets]
    moments = {id(layer): core.Moments(_axis_of(layer)) for layer in targets}
    failure: list[str] = []
    originals: list[tuple[Any, Any]] = []
    for layer in targets:
        original = layer.call

        def call(
            inputs: Any, *args: Any, _layer: Any = layer, _call: Any = original, **kw: Any
        ) -> Any:
            if kw.get("mask") is not None:
                raise ValueError(
                    f"recalibrate takes no masked inputs: BatchNorm {_layer.name!r} was given "
                    "a mask"
                )
            if not moments[id(_layer)].add(np.asarray(keras.ops.convert_to_numpy(inputs))):
                failure.append(_layer.name)
            return _call(inputs, *args, **kw)

        # Keras has no forward hooks: the instance's call is wrapped for the pass (eager
        # calls only, which recalibrate makes) and put back afterwards.
        originals.append((layer, layer.__dict__.get("call")))
        object.__setattr__(layer, "call", call)

    # Batch Renormalization's weights (and a moving_stddev) move in every training call:
    # put back after each batch, so that every batch meets the model as it was and they
    # end as they were (SPEC.md section 8: only the moving statistics change).
    extra = [
        (w, np.array(keras.ops.convert_to_numpy(w)))
        for layer in targets
        for w in layer.non_trainable_weights
        if not any(w is v for v in _state(layer))
    ]

    def put_back() -> None:
        for variable, value in extra:
            variable.assign(value)

    def run_one(batch: Any) -> str | None:
        _run(model, batch)
        put_back()
        return failure[0] if failure else None

    try:
        core.run_batches(batches, run_one, progress)
        core.check_counts({layer.name: moments[id(layer)].count for layer in targets})
    except BaseException:
        for layer, values in zip(targets, saved, strict=True):
            for variable, value in zip(_state(layer), values, strict=True):
                variable.assign(value)
        put_back()
        raise
    finally:
        for layer, before in originals:
            if before is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", before)
    for layer in targets:
        m = moments[id(layer)]
        assert m.mean is not None
        unbiased = layer.spec.unbiased if isinstance(layer, BatchNorm) else False
        var = m.variance(unbiased)
        layer.moving_mean.assign(m.mean.astype(_dtype(layer.moving_mean)))
        layer.moving_variance.assign(var.astype(_dtype(layer.moving_variance)))
        stddev = getattr(layer, "moving_stddev", None)
        if stddev is not None:  # renorm's moving stddev is sqrt(var + eps), Keras's too
            stddev.assign(np.sqrt(var + _bn_settings(layer)[1]).astype(_dtype(stddev)))
        tracked = getattr(layer, "num_batches_tracked", None)
        if tracked is not None:
            tracked.assign(np.asarray(m.batches, _dtype(tracked)))
    return model


def _axis_of(layer: Any) -> int:
    axis = _bn_settings(layer)[0]
    if axis is None:
        raise ValueError(
            f"recalibrate needs one feature axis; BatchNorm {layer.name!r} has axis={layer.axis}"
        )
    return axis


def _dtype(variable: Any) -> str:
    return str(keras.backend.standardize_dtype(variable.dtype))

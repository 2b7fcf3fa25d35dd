"""BatchNorm after training for MXNet Gluon 1.9 (``SPEC.md`` section 8): ``fold`` and
``recalibrate``.

The decisions and messages are the core's (:mod:`unorm._core.after_training`); this module
reads the data flow from the model's symbol graph (the model applied to a symbolic
input, as ``unorm.mxnet``'s port does), matches each graph node to the Block owning its
parameters, and moves the weights through NumPy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Iterable, Iterator
from typing import IO, Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from .._core import after_training as core
from . import internals
from .agc import _layer_kind, _weight_layout
from .batchnorm import BatchNorm
from .plugin import PLUGIN
from .port import _traced

__all__ = ["fold", "freeze", "recalibrate"]

#: The graph ops of a producer layer, and of a BatchNorm (Gluon's, unorm's custom op);
#: a BatchNorm's call is the one of them named ``<prefix>fwd`` (the others, e.g. the
#: ordering node of update_on="backward", are its bookkeeping).
_PRODUCER_OPS = ("Convolution", "Deconvolution", "FullyConnected")
_BATCH_NORM_OPS = ("BatchNorm", "Custom")
# unorm's BatchNorm wraps its custom op in these reshaping nodes (a 2-D input seen as 4-D).
_WRAPPERS = ("expand_dims", "squeeze", "reshape", "Reshape")


def _is_batch_norm(block: Any) -> bool:
    return isinstance(block, (BatchNorm, gluon.nn.BatchNorm))


def _walk(block: Any, path: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """``(path, block, parent, key)`` for ``block``'s descendants, depth first."""
    for key, child in internals.children(block):
        name = f"{path}.{key}" if path else str(key)
        yield name, child, block, str(key)
        yield from _walk(child, name)


@dataclasses.dataclass(frozen=True)
class _BN:
    gamma: np.ndarray | None
    beta: np.ndarray | None
    mean: np.ndarray
    var: np.ndarray
    eps: float
    axis: int
    tracks: bool


def _numpy(param: Any) -> np.ndarray:
    return np.asarray(param.data().asnumpy())


def _bn_view(block: Any) -> _BN:
    if isinstance(block, BatchNorm):
        spec = block.spec
        tracks = spec.track_running_stats
        mean = _numpy(block.running_mean) if tracks else np.zeros(0)
        var = _numpy(block.running_var) if tracks else np.zeros(0)
        return _BN(
            _numpy(block.gamma) if spec.scale else None,
            _numpy(block.beta) if spec.center else None,
            mean, var, spec.eps, spec.axis, tracks,
        )  # fmt: skip
    kwargs = internals.layer_arguments(block)
    # Gluon's fix_gamma (scale=False) takes gamma as 1; its center=False still adds the
    # stored beta (a frozen parameter), so beta is always read.
    gamma = None if kwargs.get("fix_gamma") else _numpy(block.gamma)
    return _BN(
        gamma, _numpy(block.beta), _numpy(block.running_mean), _numpy(block.running_var),
        float(kwargs.get("eps", 1e-5)), int(kwargs.get("axis", 1)), True,
    )  # fmt: skip


def _channel_axis(block: Any, kind: str) -> int:
    if kind == "dense":
        return -1
    layout = str(internals.layer_arguments(block).get("layout") or "NC")
    return 1 if layout.upper().startswith("NC") else -1


def _out_channels(block: Any, kind: str) -> int:
    if kind == "dense":
        return int(block.weight.shape[0])  # (units, in)
    return int(internals.layer_arguments(block)["num_filter"])


def _owners(model: Any) -> dict[str, tuple[str, Any, Any, str]]:
    """Parameter name -> the (path, block, parent, key) that registered it."""
    out = {}
    for path, block, parent, key in _walk(model):
        for param in internals.own_parameters(block).values():
            out[param.name] = (path, block, parent, key)
    return out


def _graph(model: Any, example: Any) -> tuple[list[dict[str, Any]], list[Any], dict[int, int]]:
    """The nodes of ``model``'s symbol graph, its heads, and output ranks by node (when an
    ``example`` input gives the shapes)."""
    try:
        graph = _traced(model)
    except Exception as err:  # a plain Block cannot be traced; MXNet raises many kinds
        raise ValueError(
            f"fold needs a model of HybridBlocks that can be traced symbolically; tracing "
            f"{type(model).__name__} failed: {type(err).__name__}: {err}"
        ) from err
    parsed = json.loads(graph.tojson())
    ranks: dict[int, int] = {}
    if example is not None:
        shape = tuple(example.shape)
        _, shapes, _ = graph.get_internals().infer_shape(data=shape)
        names = graph.get_internals().list_outputs()
        by_name = dict(zip(names, shapes, strict=True))
        for i, node in enumerate(parsed["nodes"]):
            found = by_name.get(node["name"] + "_output")
            if found is not None:
                ranks[i] = len(found)
    return parsed["nodes"], parsed["heads"], ranks


def _is_call(node: dict[str, Any], owner: tuple[str, Any, Any, str]) -> bool:
    """Whether ``node`` is a call of its owning layer (not a helper op it adds)."""
    if node["op"] in _PRODUCER_OPS:
        return True
    return node["op"] in _BATCH_NORM_OPS and node["name"] == owner[1].prefix + "fwd"


def _owner_of(
    node: dict[str, Any], nodes: list[dict[str, Any]], owners: dict[str, Any]
) -> tuple[str, Any, Any, str] | None:
    for source in node.get("inputs", [])[1:]:
        name = nodes[source[0]]["name"]
        if nodes[source[0]]["op"] == "null" and name in owners:
            return owners[name]  # type: ignore[no-any-return]
    return None


_Where = tuple[str, Any, Any, str]  # (path, block, parent, key)


def _candidates(model: Any, example: Any) -> list[tuple[core.FoldCandidate, _Where, _Where | None]]:
    nodes, heads, ranks = _graph(model, example)
    owners = _owners(model)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for source in node.get("inputs", []):
            readers.setdefault(source[0], []).append(i)
    calls: dict[int, int] = {}
    for node in nodes:
        if node["op"] in _PRODUCER_OPS + _BATCH_NORM_OPS:
            owner = _owner_of(node, nodes, owners)
            if owner is not None and _is_call(node, owner):
                calls[id(owner[1])] = calls.get(id(owner[1]), 0) + 1
    out: list[tuple[core.FoldCandidate, _Where, _Where | None]] = []
    for node in nodes:
        owner = _owner_of(node, nodes, owners) if node["op"] in _BATCH_NORM_OPS else None
        if owner is None or not _is_batch_norm(owner[1]) or not _is_call(node, owner):
            continue
        path, bn = owner[0], owner[1]
        view = _bn_view(bn)
        entry = node["inputs"][0][0]
        while nodes[entry]["op"] in _WRAPPERS and nodes[entry]["name"].startswith(bn.prefix):
            entry = nodes[entry]["inputs"][0][0]
        source = nodes[entry]
        producer = _owner_of(source, nodes, owners) if source["op"] in _PRODUCER_OPS else None
        kind = None if producer is None else _layer_kind(producer[1])
        base = core.FoldCandidate(
            path,
            bn_uses=calls.get(id(bn), 1),
            tracks_running_stats=view.tracks,
            bn_axis=view.axis,
            num_features=int(view.mean.shape[0]),
        )
        if producer is None or kind is None:
            what = "the model's input" if source["op"] == "null" else f"{source['op']} node"
            out.append(
                (dataclasses.replace(base, source=f"{what} {source['name']!r}"), owner, None)
            )
            continue
        block = producer[1]
        others = [nodes[r]["name"] for r in readers.get(entry, []) if not _feeds(nodes, r, bn)]
        if any(h[0] == entry for h in heads):
            others.append("the model's output")
        rank = ranks.get(entry)
        if rank is None and kind != "dense":
            rank = len(block.weight.shape)  # a batched input: spatial dimensions + 2
        elif rank is None and internals.layer_arguments(block).get("flatten", True):
            rank = 2  # a flattening Dense gives (N, units)
        candidate = dataclasses.replace(
            base,
            producer=producer[0],
            producer_kind=kind,
            other_users=tuple(others),
            producer_uses=calls.get(id(block), 1),
            channel_axis=_channel_axis(block, kind),
            rank=rank,
            out_channels=_out_channels(block, kind),
        )
        out.append((candidate, owner, producer))
    return out


def _feeds(nodes: list[dict[str, Any]], reader: int, bn: Any) -> bool:
    """Whether node ``reader`` is part of BatchNorm ``bn`` (its op or a wrapper of it)."""
    return bool(nodes[reader]["name"].startswith(bn.prefix))


def _add_bias(block: Any, channels: int) -> Any:
    """Give a layer built with ``use_bias=False`` a bias (zeros), on its contexts."""
    ctx = block.weight.list_ctx()
    with block.name_scope():
        block.bias = block.params.get(
            "bias", shape=(channels,), init="zeros", dtype=block.weight.dtype
        )
    block.bias.initialize(ctx=ctx)
    # Gluon's convolution passes its no_bias argument on every call: it must now be False.
    arguments = internals.layer_arguments(block)
    if "no_bias" in arguments:
        arguments["no_bias"] = False
    return block.bias


def fold(model: Any, strict: bool = False, example: Any = None) -> Any:
    """A copy of ``model`` with every BatchNorm that directly follows a ``Conv1D/2D/3D``
    (grouped, depthwise, channels-last too), a ``Conv*DTranspose`` or a ``Dense`` folded
    into that layer's weight and bias (``SPEC.md`` section 8).

    Works for unorm's :class:`BatchNorm` in every preset and for ``gluon.nn.BatchNorm``
    (``use_global_stats=True`` too), in any model of HybridBlocks, read from its symbol
    graph. The new weight and bias are computed in float64 and stored in the layer's
    dtype (a layer without a bias gets one); each folded BatchNorm's place is taken by a
    ``gluon.contrib.nn.Identity``. The copy computes the unfolded model's inference output
    and ``export``s without a BatchNorm node; ``model`` is untouched.

    A BatchNorm that cannot be folded exactly stays in place and is reported in a
    ``FoldWarning``; ``strict=True`` raises ``FoldError``. The copy's ``fold_report`` lists
    every BatchNorm as a ``FoldEntry``. ``example`` (an input array) shows the ranks where
    the model does not (a ``Dense(flatten=False)`` before a BatchNorm).

    Example:
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Dense(4, in_units=3), gluon.nn.BatchNorm(in_channels=4))
        >>> net.initialize()
        >>> [type(b).__name__ for b in fold(net)._children.values()]
        ['Dense', 'Identity']
    """
    if not isinstance(model, gluon.Block):
        raise ValueError(f"model must be a gluon.Block, got {type(model).__name__}")
    for name, param in model.collect_params().items():
        try:
            param.list_data()
        except Exception:  # Gluon raises RuntimeError or DeferredInitializationError
            raise ValueError(
                f"fold needs an initialised model: parameter {name!r} is not initialized (or "
                "its shape is deferred); call initialize() and run the model once"
            ) from None
    work = copy.deepcopy(model)
    internals.clear_cached_graph(work)
    entries: list[core.FoldEntry] = []
    plans: list[tuple[core.FoldCandidate, _Where, _Where]] = []
    for candidate, owner, producer in _candidates(work, example):
        reason = core.fold_refusal(candidate)
        entries.append(core.FoldEntry(candidate.bn, None if reason else candidate.producer, reason))
        if reason is None and producer is not None:
            plans.append((candidate, owner, producer))
    message = core.finish_report(entries, strict)
    for candidate, (_, bn, parent, key), (_, block, _, _) in plans:
        kind = candidate.producer_kind
        assert kind is not None
        view = _bn_view(bn)
        weight = _numpy(block.weight)
        layout = _weight_layout(block, kind) or PLUGIN.layouts[kind]
        plan = core.fold_plan(kind, layout, tuple(weight.shape), internals.groups(block))
        bias = getattr(block, "bias", None)
        new_w, new_b = core.fold_arrays(
            weight, None if bias is None else _numpy(bias), view.mean, view.var,
            view.gamma, view.beta, view.eps, plan,
        )  # fmt: skip
        if bias is None:
            bias = _add_bias(block, candidate.out_channels)
        block.weight.set_data(mx.nd.array(new_w, dtype=weight.dtype))
        bias.set_data(mx.nd.array(new_b, dtype=weight.dtype))
        identity = gluon.contrib.nn.Identity()
        internals.replace_child(parent, key, identity)
        for attribute, value in list(vars(parent).items()):
            if value is bn:  # the attribute a custom Block calls it by
                object.__setattr__(parent, attribute, identity)
    for _, block, _, _ in _walk(work):
        internals.clear_cached_graph(block)
    internals.clear_cached_graph(work)
    work.fold_report = tuple(entries)
    if message is not None:
        warnings.warn(message, core.FoldWarning, stacklevel=2)
    return work


# -- freeze ------------------------------------------------------------------------------


def freeze(model: Any, trainable: bool = False, *, convert_native: bool = True) -> Any:
    """Freeze every BatchNorm of ``model`` (``SPEC.md`` section 8, *Frozen mode*): each
    normalises with its running statistics in training too and never updates them;
    ``gamma`` and ``beta`` keep learning with ``trainable=True`` and are fixed
    (``grad_req="null"``) by default.

    ``gluon.nn.BatchNorm`` layers are first converted to unorm's :class:`BatchNorm`
    (``preset="mxnet"``, :func:`~unorm.mxnet.convert`, keeping their Parameter objects)
    unless ``convert_native=False``, which leaves them as they are. Works in place and
    returns the model (a new object when ``model`` itself is a native BatchNorm);
    hybridize again afterwards. A BatchNorm with ``track_running_stats=False`` is a
    ``ValueError``, before any layer changes.

    Example:
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Dense(4, in_units=3), gluon.nn.BatchNorm(in_channels=4))
        >>> net.initialize()
        >>> net = freeze(net)
        >>> net[1].frozen, net[1].gamma.grad_req
        (True, 'null')
    """
    from .convert import convert

    if not isinstance(trainable, bool):
        raise ValueError(f"trainable must be True or False, got {trainable!r}")
    for path, block, _, _ in [("", model, None, ""), *_walk(model)]:
        if isinstance(block, BatchNorm) and not block.spec.track_running_stats:
            raise ValueError(core.freeze_needs_running_stats(path or type(block).__name__))
    if convert_native:
        model = convert(model, preset="mxnet")
    for block in [model, *(b for _, b, _, _ in _walk(model))]:
        if isinstance(block, BatchNorm):
            block.frozen = True
            for param, learned in (
                (block.gamma, block.spec.scale),
                (block.beta, block.spec.center),
            ):
                param.grad_req = "write" if trainable and learned else "null"
    internals.clear_cached_graph(model)
    return model


# -- recalibrate -------------------------------------------------------------------------


def _state(block: Any) -> list[Any]:
    names = ("running_mean", "running_var", "num_batches_tracked")
    return [getattr(block, n) for n in names if getattr(block, n, None) is not None]


def recalibrate(model: Any, batches: Iterable[Any], *, progress: bool | IO[str] = False) -> Any:
    """Set every BatchNorm's running statistics to the exact statistics of its input over
    all of ``batches`` (``SPEC.md`` section 8, *Recalibrate*; "precise BN").

    Each batch (an NDArray, or a tuple of inputs) runs through ``model`` in training mode
    (``autograd.train_mode``, no gradients recorded); every BatchNorm normalises with its
    batch statistics, and its input's per-feature count, mean and M2 are merged exactly in
    float64 over the batches. Then ``running_mean`` is the merged mean and ``running_var``
    the layer's own estimator on the total count: ``M2/N`` for ``gluon.nn.BatchNorm`` (its
    CPU kernel feeds the biased variance) and unorm's :class:`BatchNorm` with
    ``running_var="biased"``, ``M2/(N-1)`` for ``"unbiased"``. ``gluon.nn.BatchNorm`` with
    ``use_global_stats=True`` and frozen layers keep their statistics. Nothing else changes.
    Data split over devices (``split_and_load``) is passed as one batch per device's
    share: the shares merge exactly, as one device seeing all of it would. The
    model must not be hybridized (its cached graph would bypass the per-layer hooks).

    Raises ``ValueError``, the model unchanged, for a model without such a BatchNorm, no
    batches, a batch giving non-finite statistics, a BatchNorm that saw no values, or a
    hybridized model.

    Example:
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.BatchNorm(in_channels=2))
        >>> net.initialize()
        >>> data = [mx.nd.ones((2, 2)), mx.nd.zeros((2, 2))]
        >>> recalibrate(net, data)[0].running_mean.data().asnumpy().tolist()
        [0.5, 0.5]
    """
    targets = []
    for path, block, _, _ in _walk(model):
        native = isinstance(block, gluon.nn.BatchNorm)
        mine = isinstance(block, BatchNorm) and not block.frozen
        if (mine and block.spec.track_running_stats) or (
            native and not internals.layer_arguments(block).get("use_global_stats")
        ):
            targets.append((path, block))
    if not targets:
        raise ValueError(core.NO_BATCHNORM)
    if any(internals.hybridized(b) for b in (model, *(b for _, b, _, _ in _walk(model)))):
        raise ValueError(
            "recalibrate needs a model that is not hybridized (its cached graph bypasses the "
            "per-layer hooks that read each BatchNorm's input); call model.hybridize(False) "
            "first"
        )
    saved = [[np.array(_numpy(p)) for p in _state(block)] for _, block in targets]
    moments = {id(block): core.Moments(_bn_view(block).axis) for _, block in targets}
    failure: list[str] = []

    def hook_for(path: str, block: Any) -> Any:
        def hook(_: Any, inputs: Any) -> None:
            if not moments[id(block)].add(inputs[0].asnumpy()):
                failure.append(path)

        return hook

    handles = [b.register_forward_pre_hook(hook_for(p, b)) for p, b in targets]

    # Batch Renormalization's states (and a running_std) move in every training call: put
    # back after each batch, so that every batch meets the model as it was and they end as
    # they were (SPEC.md section 8: only the running statistics change).
    recalibrated = {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}
    extra = [
        (param, _numpy(param).copy())
        for _, block in targets
        for key, param in internals.own_parameters(block).items()
        if key not in recalibrated
    ]

    def put_back() -> None:
        for param, value in extra:
            param.set_data(mx.nd.array(value, dtype=value.dtype))

    def run_one(batch: Any) -> str | None:
        with autograd.train_mode():
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
        put_back()
        return failure[0] if failure else None

    try:
        core.run_batches(batches, run_one, progress)
        core.check_counts({path: moments[id(block)].count for path, block in targets})
    except BaseException:
        for (_, block), values in zip(targets, saved, strict=True):
            for param, value in zip(_state(block), values, strict=True):
                param.set_data(mx.nd.array(value, dtype=value.dtype))
        put_back()
        raise
    finally:
        for h in handles:
            h.detach()
    for _, block in targets:
        m = moments[id(block)]
        assert m.mean is not None
        unbiased = block.spec.unbiased if isinstance(block, BatchNorm) else False
        dtype = np.dtype(block.running_mean.dtype)
        block.running_mean.set_data(mx.nd.array(m.mean.astype(dtype), dtype=dtype))
        var = m.variance(unbiased)
        block.running_var.set_data(mx.nd.array(var.astype(dtype), dtype=dtype))
        std = getattr(block, "running_std", None)
        if std is not None:  # renorm_running="stddev" keeps sqrt(var + eps)
            value = np.sqrt(var + _bn_view(block).eps).astype(dtype)
            std.set_data(mx.nd.array(value, dtype=dtype))
        tracked = getattr(block, "num_batches_tracked", None)
        if tracked is not None:
            counter = np.dtype(tracked.dtype)
            tracked.set_data(mx.nd.array(np.full(tracked.shape, m.batches), dtype=counter))
    return model

"""Export an MXNet Gluon model's state to the neutral checkpoint and load one into a model.

Layers with parameters are matched by order (children walked depth first, in registration
order): Conv1D/2D/3D, Conv1D/2D/3DTranspose, Dense, unorm's
:class:`~unorm.mxnet.BatchNorm` and ``gluon.nn.BatchNorm``; pooling, activations,
Flatten and Dropout carry nothing. Any other block with parameters is refused
(:class:`~unorm.port.CheckpointError`) rather than skipped.

Gluon's layouts are the canonical ones (:mod:`unorm.port`): Conv ``(O, I/g, *k)``,
ConvTranspose ``(I, O/g, *k)``, Dense ``(units, in)``; and Gluon flattens an ``NCHW`` map
in channels-first order, so tensors move as they are. A Dense fed by a flattened
``(C, H, W)`` map still records ``flatten_from = [C, H, W]`` (found by tracing the model
symbolically with an example's shape) so that channels-last frameworks can permute it.

Real MXNet files (:func:`read_native`, :func:`write_native`): a ``-symbol.json`` +
``-NNNN.params`` pair written by ``HybridBlock.export`` or the symbol API
(``mx.model.save_checkpoint``), read node by node (:func:`read_symbol`); and a
``.params`` file written by ``save_parameters``. The symbol API's ``BatchNorm`` has two
classic traps, both handled: without a ``fix_gamma`` attribute it fixes gamma at 1 (the
stored gamma is ignored, so it is read as ones), and without an ``eps`` attribute its eps
is 1e-3 (Gluon's layer writes 1e-5 explicitly).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from .._core import probe as probes
from .._core.flow import FlowNode, complete
from .._core.port_plan import (
    COUNTER,
    ROLES,
    PortModel,
    Slot,
    atomic_file,
    check_state_fits,
    export,
    kind_of,
    load,
    match_by_names,
    present_roles,
    warn_native_gaps,
)
from ..port import Checkpoint, CheckpointError, Layer
from ..spec import BatchNormSpec, ScaledWSSpec
from . import internals
from .batchnorm import BatchNorm
from .op import OP_TYPE, OpSettings
from .ws import _ScaledStd

__all__ = [
    "export_checkpoint",
    "export_model",
    "load_checkpoint",
    "read_native",
    "read_symbol",
    "write_native",
]

# Gluon's parameter names are the checkpoint's roles, for both BatchNorm layers.
_BN_STATS = ("running_mean", "running_var")
_SUPPORTED = "Conv1D/2D/3D, Conv1D/2D/3DTranspose, Dense, BatchNorm"
_SYMBOL_SUFFIX = "-symbol.json"
_NN = gluon.nn
# The blocks the checkpoint describes (Conv*DTranspose before Conv*D, as in Keras's table).
_KINDS = [
    ("conv_transpose", (_NN.Conv1DTranspose, _NN.Conv2DTranspose, _NN.Conv3DTranspose)),
    ("conv", (_NN.Conv1D, _NN.Conv2D, _NN.Conv3D)),
    ("dense", _NN.Dense),
    ("batchnorm", (BatchNorm, _NN.BatchNorm)),
]
# Gluon's parameter names are the checkpoint's roles.
_ATTRS = {role: role for roles in ROLES.values() for role in roles}


# -- which blocks, in which order -------------------------------------------------------


def _blocks(block: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """``block`` and its descendants, depth first in registration order, named by path
    (``"0"``, ``"3.1"``: the keys ``save_parameters`` uses)."""
    yield name, block
    for key, child in internals.children(block):
        yield from _blocks(child, f"{name}.{key}" if name else str(key))


def _check_initialized(block: Any, name: str) -> None:
    for param in internals.own_parameters(block).values():
        try:
            param.list_data()
        except Exception:  # Gluon raises RuntimeError or DeferredInitializationError
            raise CheckpointError(
                f"block {name!r} ({type(block).__name__}): parameter {param.name!r} is not "
                "initialized (or its shape is deferred): give the layer its input size "
                "(in_channels/in_units) and call initialize(), or run the model once"
            ) from None


def _check_layout(block: Any, name: str) -> None:
    layout = internals.layer_arguments(block).get("layout") or "NC"
    if not str(layout).startswith("NC"):
        raise CheckpointError(
            f"block {name!r} ({type(block).__name__}) uses layout {layout!r}: the "
            "checkpoint describes channels-first (NC...) convolutions only"
        )


def _param_layers(model: Any) -> list[tuple[str, Any, str]]:
    """The blocks with parameters, in order, as (name, block, kind); refuses the others."""
    out = []
    for path, block in _blocks(model):
        name = path or type(block).__name__
        kind = kind_of(block, _KINDS)
        if kind is not None:
            _check_initialized(block, name)
            if kind != "batchnorm":
                _check_layout(block, name)
            out.append((name, block, kind))
        elif internals.own_parameters(block):
            raise CheckpointError(
                f"block {name!r} ({type(block).__name__}) has parameters but is not a layer "
                f"the checkpoint describes ({_SUPPORTED})"
            )
    return out


# -- which Dense layers read a flattened feature map (symbolic shape inference) ---------


def _traced(model: Any) -> Any:
    """``model`` applied to a variable ``data``: its graph, built without running it."""
    out = model(mx.sym.var("data"))
    return mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out


def _output_shapes(graph: Any, shape: tuple[int, ...]) -> dict[tuple[str, int], tuple[int, ...]]:
    """(node name, output index) -> shape, for every node of ``graph``."""
    internals = graph.get_internals()
    _, shapes, _ = internals.infer_shape(data=shape)
    out: dict[tuple[str, int], tuple[int, ...]] = {}
    seen: dict[str, int] = {}
    for i, node_shape in enumerate(shapes):
        node = internals[i].name  # one entry per output, a node's outputs in order
        out[(node, seen.get(node, 0))] = tuple(node_shape)
        seen[node] = seen.get(node, 0) + 1
    return out


def _walk_to_flatten(
    nodes: list[dict[str, Any]], entry: list[int], shapes: Mapping[tuple[str, int], Any]
) -> list[int] | None:
    """Follow a Dense's input back through shape-preserving ops (activations, dropout)
    to a Flatten or Reshape of a feature map; its ``[C, *spatial]``, or None."""
    while True:
        node = nodes[entry[0]]
        if node["op"] == "null" or not node.get("inputs"):
            return None
        source = node["inputs"][0]
        before = shapes.get((nodes[source[0]]["name"], source[1]))
        after = shapes.get((node["name"], entry[1]))
        if before is None or after is None:
            return None
        if node["op"] in ("Flatten", "flatten", "Reshape", "reshape"):
            flat = len(after) == 2 and len(before) > 2 and after[0] == before[0]
            return [int(d) for d in before[1:]] if flat else None
        if tuple(before) != tuple(after):
            return None
        entry = source


def _flatten_shapes(model: Any, example_shape: tuple[int, ...] | None) -> dict[str, list[int]]:
    """``[C, *spatial]`` of the feature map each Dense (by weight name) reads flattened."""
    if example_shape is None:
        return {}
    try:
        graph = _traced(model)
        shapes = _output_shapes(graph, example_shape)
    except Exception as err:  # a plain Block cannot be traced; MXNet raises many kinds
        warnings.warn(
            f"cannot trace the model symbolically ({type(err).__name__}: {err}): no "
            "flatten_from is recorded, so a channels-last framework cannot load its Dense "
            "layers after a Flatten. Build the model from HybridBlocks.",
            stacklevel=4,
        )
        return {}
    nodes = json.loads(graph.tojson())["nodes"]
    found: dict[str, list[int]] = {}
    for node in nodes:
        if node["op"] != "FullyConnected" or len(node["inputs"]) < 2:
            continue
        data, weight = node["inputs"][0], nodes[node["inputs"][1][0]]["name"]
        attrs = _attrs(node)
        data_shape = shapes.get((nodes[data[0]]["name"], data[1]))
        if data_shape is not None and len(data_shape) > 2 and _flag(attrs.get("flatten", "True")):
            flat: list[int] | None = [int(d) for d in data_shape[1:]]  # Dense flattens itself
        else:
            flat = _walk_to_flatten(nodes, data, shapes)
        if flat is not None and math.prod(flat[1:]) > 1:
            found[weight] = flat
    return found


def _example_shape(example: Any) -> tuple[int, ...] | None:
    if example is None:
        return None
    return tuple(int(d) for d in example.shape)


# -- export --------------------------------------------------------------------------------


def _numpy(param: Any) -> np.ndarray:
    return np.array(param.list_data()[0].asnumpy())


def _native_spec(block: Any) -> BatchNormSpec:
    kwargs = internals.layer_arguments(block)
    return BatchNormSpec.from_native(
        "mxnet",
        momentum=kwargs["momentum"],
        epsilon=kwargs["eps"],
        center=internals.differentiable(block.beta),  # what Gluon built from center=
        scale=not kwargs["fix_gamma"],
        axis=kwargs["axis"],
        use_global_stats=bool(kwargs.get("use_global_stats", False)),
    )


def _read_bn(block: Any) -> dict[str, np.ndarray]:
    center, scale, _ = _own_flags(block)
    gamma, beta = _numpy(block.gamma), _numpy(block.beta)
    if not scale:
        gamma = np.ones_like(gamma)  # MXNet ignores a fixed gamma (fix_gamma): it is 1
    if isinstance(block, BatchNorm) and not center:
        beta = np.zeros_like(beta)  # unorm's layer ignores a fixed beta: it is 0
    out = {"gamma": gamma, "beta": beta}
    if getattr(block, "running_mean", None) is not None:
        out.update({role: _numpy(getattr(block, role)) for role in _BN_STATS})
        counter = getattr(block, COUNTER, None)
        value = 0 if counter is None else int(_numpy(counter).reshape(-1)[0])
        out[COUNTER] = np.asarray(value, dtype=np.int64)
    return out


def _params(block: Any, kind: str) -> list[tuple[str, Any]]:
    """(role, parameter) of every role the block has, in the planner's order."""
    found = present_roles(block, kind, _ATTRS)
    if kind == "batchnorm" and not _own_flags(block)[2]:
        return [(role, p) for role, p in found if role not in _BN_STATS]
    return found


def export_checkpoint(model: Any, example: Any = None) -> Checkpoint:
    """The neutral :class:`~unorm.port.Checkpoint` of the Gluon ``model``'s state.

    ``example``: an input batch (an NDArray or anything with a ``shape``); only its shape
    is used, to trace the model symbolically (nothing runs, running statistics stay) and
    find which Dense layers read a flattened feature map; needed only when the model has
    one and the checkpoint will be loaded into a channels-last framework. With it the
    checkpoint also carries a probe (:mod:`unorm._core.probe`: random inputs of the
    example's sample shape and the model's inference outputs on them, one forward pass
    outside autograd, so no state changes), on which every load is verified. BatchNorm
    settings travel in unorm's convention: a ``gluon.nn.BatchNorm`` as the ``mxnet``
    preset with its own ``momentum`` and ``epsilon``; a fixed gamma (``scale=False``) is
    stored as ones, as MXNet computes with it.

    Example:
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Conv2D(2, 3, in_channels=1), gluon.nn.Dense(3, in_units=8))
        >>> net.initialize()
        >>> ckpt = export_checkpoint(net, mx.nd.zeros((1, 1, 4, 4)))
        >>> [(la.kind, la.attrs.get("flatten_from")) for la in ckpt.layers]
        [('conv', None), ('dense', [2, 2, 2])]
    """
    shape = _example_shape(example)
    flat = _flatten_shapes(model, shape)
    probe = None if shape is None else probes.make_input(shape[1:])
    return export(_GluonModel(model, flat), source="mxnet", probe_input=probe)


# Symbol ops the flow keeps (unorm._core.flow); the ops that call a layer.
_MERGES = {
    "elemwise_add": "add",
    "broadcast_add": "add",
    "_Plus": "add",
    "_plus": "add",
    "add_n": "add",
    "ElementWiseSum": "add",
    "elemwise_mul": "mul",
    "broadcast_mul": "mul",
    "_Mul": "mul",
    "_mul": "mul",
    "Concat": "concat",
    "concat": "concat",
}
_LAYER_OPS = ("Convolution", "Deconvolution", "FullyConnected", "BatchNorm", "Custom")


def flow_of(model: Any, targets: list[tuple[str, Any, str]]) -> list[FlowNode] | None:
    """``model``'s data flow over ``targets`` (:mod:`unorm._core.flow`), read from its
    symbol graph (traced, nothing runs); None where it does not trace, calls a layer
    other than once or combines tensors by an op the flow does not know. The nodes that
    only order a unorm BatchNorm's update are left out."""
    try:
        nodes = json.loads(_traced(model).tojson())["nodes"]
    except Exception:  # a plain Block cannot be traced; MXNet raises many kinds
        return None
    owner = {p.name: i for i, (_, block, _) in enumerate(targets) for p in _own_params(block)}
    ordering = _SymbolReader(nodes, {}, "flow")._ordering_nodes()
    flow: list[FlowNode] = []
    where: dict[int, int] = {}
    for index, node in enumerate(nodes):
        inputs = [int(src[0]) for src in node.get("inputs", [])]
        if node["op"] == "null":
            if node["name"] == "data":
                flow.append(FlowNode("input"))
                where[index] = len(flow) - 1
            continue
        if index in ordering:
            continue
        layer = next((owner[nodes[i]["name"]] for i in inputs if nodes[i]["name"] in owner), None)
        ins = [where[i] for i in inputs if i in where]
        if layer is not None and node["op"] in _LAYER_OPS:
            if not inputs or inputs[0] not in where:
                return None
            flow.append(FlowNode("layer", (where[inputs[0]],), layer))
            where[index] = len(flow) - 1
        elif node["op"] in _MERGES and len(set(ins)) >= 2:  # x * sigmoid(x): an activation
            flow.append(FlowNode(_MERGES[node["op"]], tuple(ins)))
            where[index] = len(flow) - 1
        elif len(set(ins)) == 1:
            where[index] = ins[0]  # an activation, pooling, reshape, flatten: contracted
        elif ins:
            return None
    return complete(flow, len(targets))


def _own_params(block: Any) -> list[Any]:
    return list(internals.own_parameters(block).values())


def run_probe(
    model: Any, targets: list[tuple[str, Any, str]], x: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``model``'s inference output on ``x`` (canonical, as Gluon's layout is) and the
    output of each block in ``targets`` that runs imperatively (a child of a hybridized
    block runs inside its parent's graph, unobserved), float64 NumPy, outside autograd:
    no state changes."""
    seen: dict[str, np.ndarray] = {}

    def keeper(name: str) -> Any:
        def keep(block: Any, args: Any, out: Any) -> None:
            if name not in seen and isinstance(out, mx.nd.NDArray):
                seen[name] = out.asnumpy().astype(np.float64)

        return keep

    params = list(model.collect_params().values())
    dtype = params[0].dtype if params else np.float32
    hooks = [block.register_forward_hook(keeper(name)) for name, block, _ in targets]
    try:
        output = model(mx.nd.array(x, dtype=dtype))
    finally:
        for hook in hooks:
            hook.detach()
    if isinstance(output, (list, tuple)):
        output = output[0]
    return output.asnumpy().astype(np.float64), seen


def export_model(model: Any, input_shape: tuple[int, ...]) -> Checkpoint:
    """:func:`export_checkpoint` with an example of ``input_shape`` (no batch axis), as
    ``unorm port`` calls it for the seed networks.

    ``input_shape`` is one sample's shape in Gluon's channels-first convention, e.g.
    ``(1, 28, 28)`` for LeNet; a batch axis of 1 is put in front, and only the shape is
    traced (nothing runs, running statistics stay).

    Example:
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Conv2D(2, 3, in_channels=1), gluon.nn.Dense(3, in_units=8))
        >>> net.initialize()
        >>> export_model(net, (1, 4, 4)).layers[1].attrs["flatten_from"]
        [2, 2, 2]
    """
    return export_checkpoint(model, np.zeros((1, *input_shape), np.float32))


# -- the model as the port planner sees it -------------------------------------------------


def _own_flags(block: Any) -> tuple[bool, bool, bool]:
    """(center, scale, track_running_stats) of a model's BatchNorm."""
    if isinstance(block, BatchNorm):
        return block.spec.center, block.spec.scale, block.spec.track_running_stats
    fixed_gamma = internals.layer_arguments(block)["fix_gamma"]
    return internals.differentiable(block.beta), not fixed_gamma, True


class _GluonModel(PortModel[Any]):
    """A Gluon model for :mod:`unorm._core.port_plan`. Gluon's layouts and flatten order
    are the canonical ones, so arrays move as they are (cast to each parameter's dtype)."""

    def __init__(self, model: Any, flat: Mapping[str, list[int]]) -> None:
        self._model = model
        self._targets = _param_layers(model)
        self._flat = flat  # weight name of a Dense -> the map it reads flattened

    def run_probe(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return run_probe(self._model, self._targets, x)

    def flow(self) -> list[FlowNode] | None:
        return flow_of(self._model, self._targets)

    def layers(self) -> list[tuple[str, Any, str]]:
        return self._targets

    def slots(self, handle: Any, kind: str) -> dict[str, Slot]:
        out = {role: Slot(tuple(int(d) for d in p.shape)) for role, p in _params(handle, kind)}
        if kind == "batchnorm":
            center, scale, _ = _own_flags(handle)
            # A gamma (beta) the layer keeps at 1 (0): only that value may come in.
            for role, learnt, fill in (("gamma", scale, 1.0), ("beta", center, 0.0)):
                if not learnt:
                    out[role] = Slot(out[role].shape, fixed=fill)
            if COUNTER in out:
                out[COUNTER] = Slot(())  # a scalar in the checkpoint, shape (1,) in Gluon
        return out

    def read(self, handle: Any, kind: str, flatten_from: list[int] | None) -> dict[str, Any]:
        if kind == "batchnorm":
            return _read_bn(handle)
        return {role: _numpy(p) for role, p in _params(handle, kind)}

    def to_native(
        self, handle: Any, kind: str, role: str, value: np.ndarray, flatten_from: list[int] | None
    ) -> Any:
        param = getattr(handle, role)
        return np.asarray(value, dtype=np.dtype(param.dtype)).reshape(tuple(param.shape))

    def assign(self, handle: Any, role: str, value: Any) -> None:
        getattr(handle, role).set_data(mx.nd.array(value, dtype=value.dtype))

    def flatten_from(self, handle: Any) -> list[int] | None:
        return self._flat.get(handle.weight.name)

    def groups(self, handle: Any) -> int:
        return internals.groups(handle)

    def ws_spec(self, handle: Any) -> ScaledWSSpec | None:
        return handle.ws if isinstance(handle, _ScaledStd) else None

    def batchnorm_spec(self, handle: Any, name: str) -> BatchNormSpec:
        return handle.spec if isinstance(handle, BatchNorm) else _native_spec(handle)

    def native_batchnorm(self, handle: Any) -> bool:
        return not isinstance(handle, BatchNorm)

    def set_spec(self, handle: Any, spec: BatchNormSpec | ScaledWSSpec, source: Layer) -> None:
        if isinstance(spec, ScaledWSSpec):
            handle.ws = spec  # read at trace time: the caller clears cached graphs
            return
        if isinstance(handle, BatchNorm):
            handle.spec = spec
            # The operator takes its settings as graph attributes, built from these.
            handle._settings = OpSettings.from_spec(spec, **(handle._sync_extra() or {}))
            return
        arguments = internals.layer_arguments(handle)  # what Gluon passes its operator
        arguments["eps"] = float(spec.eps)
        if spec.momentum is not None:
            arguments["momentum"] = 1.0 - spec.momentum  # Gluon weighs the old value
        advice = "unorm.mxnet.convert(net, preset=None)"
        warn_native_gaps(spec, "mxnet", "gluon.nn.BatchNorm", advice, source)


def _forget_graphs(model: Any) -> None:
    """Drop every cached graph: BatchNorm settings are operator attributes, fixed in a
    hybridized block's graph when it is traced (the next call traces anew)."""
    for _, block in _blocks(model):
        if isinstance(block, gluon.HybridBlock) and not isinstance(block, gluon.SymbolBlock):
            internals.clear_cached_graph(block)


def load_checkpoint(
    model: Any, ckpt: Checkpoint, example: Any = None, mapping: Mapping[str, str] | None = None
) -> None:
    """Load ``ckpt`` into the Gluon ``model`` (layers matched by order, everything checked
    first).

    Nothing is changed unless every layer matches: kinds, shapes (Gluon's layouts are the
    canonical ones), conv groups, BatchNorm centre/scale/running statistics, and, given an
    ``example`` input (its shape is traced, nothing runs), a Dense's ``flatten_from``
    against the feature map the model flattens. A unorm :class:`~unorm.mxnet.BatchNorm`
    takes the checkpoint's BatchNorm settings (a ported PyTorch or Keras layer keeps
    behaving as it did at home: eps, momentum, running-variance estimator); its axis,
    ``center``, ``scale`` and ``track_running_stats`` stay the model's. A
    ``gluon.nn.BatchNorm`` takes eps and momentum and warns (``UserWarning``) where the
    source's training semantics (unbiased running variance, the non-finite guard, refusing
    one value per channel, forward update, momentum=None) cannot be expressed by it. A
    layer with ``scale=False`` (``center=False``) accepts only a gamma of ones (a beta of
    zeros). Cached graphs of hybridized blocks are dropped, so the next call runs with the
    new settings. A checkpoint with a probe is verified: the model's inference output on
    the probe's input must be the source's, else every value and setting is put back and
    the load raises :class:`~unorm.port.CheckpointError` naming the first layer whose
    output diverges. Layers pair along the data flow where both sides record one, else by
    order; ``mapping`` (checkpoint layer name -> the model's block name) pairs the layers
    it names explicitly, the rest by order.

    Example:
        >>> a, b = gluon.nn.Dense(2, in_units=3), gluon.nn.Dense(2, in_units=3)
        >>> a.initialize(); b.initialize()
        >>> load_checkpoint(b, export_checkpoint(a))
        >>> bool((a.weight.data() == b.weight.data()).asnumpy().all())
        True
    """
    adapter = _GluonModel(model, _flatten_shapes(model, _example_shape(example)))
    match = None if mapping is None else match_by_names(mapping)
    load(adapter, ckpt, match, refresh=lambda steps: _forget_graphs(model))


# -- MXNet's own files ----------------------------------------------------------------------


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1")


def _attrs(node: Mapping[str, Any]) -> dict[str, str]:
    # MXNet wrote "param" (< 0.9), then "attr", then "attrs" (>= 1.0).
    for key in ("attrs", "attr", "param"):
        if isinstance(node.get(key), dict):
            return dict(node[key])
    return {}


def _load_arrays(path: str) -> dict[str, np.ndarray]:
    try:
        loaded = mx.nd.load(path)
    except Exception as err:  # MXNetError for damaged files, OSError, ValueError...
        raise CheckpointError(f"{path}: not a readable MXNet .params file: {err}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: holds a list of arrays without names, not parameters")
    return {str(k): v.asnumpy() for k, v in loaded.items()}


def _params_file(symbol_path: str) -> str:
    """``prefix-NNNN.params`` next to ``prefix-symbol.json``, with the highest epoch."""
    prefix = Path(symbol_path[: -len(_SYMBOL_SUFFIX)])
    pattern = re.compile(re.escape(prefix.name) + r"-(\d{4,})\.params")
    try:
        names = os.listdir(prefix.parent or ".")
    except OSError as err:
        raise CheckpointError(f"{symbol_path}: cannot list its folder: {err.strerror}") from None
    epochs = [(int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n))]
    if not epochs:
        raise CheckpointError(
            f"{symbol_path}: no parameter file {prefix.name}-NNNN.params next to it"
        )
    return str(prefix.parent / max(epochs)[1])


def _read_graph(path: str) -> list[dict[str, Any]]:
    try:
        graph = json.loads(Path(path).read_text())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: not an MXNet symbol file: {err}") from None
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(nodes, list) or not all(
        isinstance(n, dict) and "op" in n and "name" in n for n in nodes
    ):
        raise CheckpointError(f"{path}: not an MXNet symbol file (no list of nodes)")
    return nodes


class _SymbolReader:
    """Turns the parameterised nodes of a symbol graph into checkpoint layers."""

    def __init__(self, nodes: list[dict[str, Any]], arrays: dict[str, np.ndarray], where: str):
        self.nodes = nodes
        self.arrays = arrays
        self.where = where
        self.layers: list[Layer] = []
        self.tensors: dict[str, np.ndarray] = {}

    def _input(self, node: Mapping[str, Any], index: int) -> str | None:
        """The name of the variable feeding input ``index`` of ``node`` (None: none)."""
        inputs = node.get("inputs", [])
        if index >= len(inputs):
            return None
        source = self.nodes[inputs[index][0]]
        return str(source["name"]) if source["op"] == "null" else None

    def _array(self, node: Mapping[str, Any], index: int, role: str) -> np.ndarray:
        name = self._input(node, index)
        for key in (f"arg:{name}", f"aux:{name}", str(name)):
            if key in self.arrays:
                return self.arrays[key]
        raise CheckpointError(
            f"{self.where}: no tensor {name!r} for the {role} of {node['op']} {node['name']!r}"
        )

    def _add(self, node: Mapping[str, Any], kind: str, pairs: list[Any], attrs: Any) -> None:
        name = str(node["name"])
        roles = {}
        for role, value in pairs:
            self.tensors[f"{name}.{role}"] = value
            roles[role] = f"{name}.{role}"
        self.layers.append(Layer(name, kind, roles, attrs))

    def weights(self, node: Mapping[str, Any], kind: str) -> None:
        attrs = _attrs(node)
        if not str(attrs.get("layout") or "NC").startswith("NC"):
            raise CheckpointError(
                f"{self.where}: {node['op']} {node['name']!r} uses layout {attrs['layout']!r}; "
                "only channels-first (NC...) is described"
            )
        pairs = [("weight", self._array(node, 1, "weight"))]
        if not _flag(attrs.get("no_bias", "False")):
            pairs.append(("bias", self._array(node, 2, "bias")))
        extra = {} if kind == "dense" else {"groups": int(attrs.get("num_group", "1"))}
        self._add(node, kind, pairs, extra)

    def native_bn(self, node: Mapping[str, Any]) -> None:
        attrs = _attrs(node)
        # The raw operator's defaults, which apply when the symbol API left them out:
        # fix_gamma=True (the stored gamma is ignored) and eps=1e-3 (not Gluon's 1e-5).
        fix_gamma = _flag(attrs.get("fix_gamma", "True"))
        try:
            spec = BatchNormSpec.from_native(
                "mxnet",
                epsilon=float(attrs.get("eps", "0.001")),
                momentum=float(attrs.get("momentum", "0.9")),
                scale=not fix_gamma,
                center=True,
                axis=int(attrs.get("axis", "1")),
                use_global_stats=_flag(attrs.get("use_global_stats", "False")),
            )
        except ValueError as err:
            raise CheckpointError(f"{self.where}: BatchNorm {node['name']!r}: {err}") from None
        gamma = self._array(node, 1, "gamma")
        pairs = [
            ("gamma", np.ones_like(gamma) if fix_gamma else gamma),
            ("beta", self._array(node, 2, "beta")),
            ("running_mean", self._array(node, 3, "running_mean")),
            ("running_var", self._array(node, 4, "running_var")),
            (COUNTER, np.asarray(0, dtype=np.int64)),
        ]
        self._add(node, "batchnorm", pairs, {"spec": dataclasses.asdict(spec), "native": True})

    def unorm_bn(self, node: Mapping[str, Any]) -> None:
        try:
            settings = OpSettings.from_attrs(_attrs(node))
            spec = settings.to_spec()
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{self.where}: {OP_TYPE} {node['name']!r} has invalid settings: {err}"
            ) from None
        first_state = 4 if settings.ordered else 3  # after the ``order`` argument
        gamma, beta = self._array(node, 1, "gamma"), self._array(node, 2, "beta")
        pairs = [
            ("gamma", gamma if spec.scale else np.ones_like(gamma)),
            ("beta", beta if spec.center else np.zeros_like(beta)),
        ]
        if spec.track_running_stats:
            pairs += [
                ("running_mean", self._array(node, first_state, "running_mean")),
                ("running_var", self._array(node, first_state + 1, "running_var")),
            ]
            counter = self._array(node, first_state + 2, COUNTER)
            counter = counter.reshape(-1)[:1].astype(np.int64)
            pairs.append((COUNTER, counter.reshape(())))
        self._add(node, "batchnorm", pairs, {"spec": dataclasses.asdict(spec), "native": False})

    def refuse_if_parameterised(self, node: Mapping[str, Any]) -> None:
        for index in range(len(node.get("inputs", []))):
            name = self._input(node, index)
            if name is not None and any(
                k in self.arrays for k in (f"arg:{name}", f"aux:{name}", name)
            ):
                raise CheckpointError(
                    f"{self.where}: {node['op']} {node['name']!r} has parameters but is not "
                    "an operator the checkpoint describes (Convolution, Deconvolution, "
                    f"FullyConnected, BatchNorm, {OP_TYPE})"
                )

    def _ancestors(self, index: int) -> set[int]:
        """``index`` and every node it reads from, directly or not."""
        found, todo = set(), [index]
        while todo:
            i = todo.pop()
            if i not in found:
                found.add(i)
                todo.extend(int(entry[0]) for entry in self.nodes[i].get("inputs", []))
        return found

    def _ordering_nodes(self) -> set[int]:
        """The nodes that only order a unorm node's update (``BatchNorm._order``: a native
        BatchNorm on zeros made from gamma and beta): what its ``order`` argument reads
        beyond what its data reads."""
        found: set[int] = set()
        for node in self.nodes:
            inputs = node.get("inputs", [])
            attrs = _attrs(node)
            if node["op"] != "Custom" or attrs.get("op_type") != OP_TYPE or len(inputs) < 4:
                continue
            if _flag(attrs.get("ordered", "False")):
                data = self._ancestors(int(inputs[0][0]))
                found |= self._ancestors(int(inputs[3][0])) - data
        return found

    def read(self) -> None:
        ops = {"Convolution": "conv", "Deconvolution": "conv_transpose", "FullyConnected": "dense"}
        ordering = self._ordering_nodes()
        for index, node in enumerate(self.nodes):
            op = node["op"]
            if op in ops:
                self.weights(node, ops[op])
            elif index in ordering:
                continue  # the unorm node it feeds is the layer
            elif op == "BatchNorm":
                self.native_bn(node)
            elif op == "Custom" and _attrs(node).get("op_type") == OP_TYPE:
                self.unorm_bn(node)
            elif op != "null":
                self.refuse_if_parameterised(node)


def read_symbol(
    path: str | os.PathLike[str], params: str | os.PathLike[str] | None = None
) -> Checkpoint:
    """The neutral checkpoint of an MXNet ``-symbol.json`` + ``.params`` pair.

    ``params``: the parameter file; default: ``prefix-NNNN.params`` next to
    ``prefix-symbol.json`` with the highest epoch (as ``HybridBlock.export`` and
    ``mx.model.save_checkpoint`` write them). Layers are the graph's Convolution,
    Deconvolution, FullyConnected, BatchNorm and unorm BatchNorm nodes, in graph order;
    each takes its parameters by input name (``arg:``/``aux:`` keys). A ``BatchNorm``
    node's missing attributes take the raw operator's defaults: ``fix_gamma=True`` (gamma
    read as ones) and ``eps=1e-3``. Any other operator with parameters, a missing tensor
    or a damaged file raises :class:`~unorm.port.CheckpointError`.

    Example:
        >>> import tempfile
        >>> x = mx.sym.var("data")
        >>> y = mx.sym.BatchNorm(mx.sym.FullyConnected(x, num_hidden=2, name="fc"), name="bn")
        >>> prefix = os.path.join(tempfile.mkdtemp(), "net")
        >>> arrays = {"fc_weight": mx.nd.ones((2, 3)), "fc_bias": mx.nd.zeros(2),
        ...           "bn_gamma": mx.nd.array([2.0, 3.0]), "bn_beta": mx.nd.zeros(2)}
        >>> stats = {"bn_moving_mean": mx.nd.zeros(2), "bn_moving_var": mx.nd.ones(2)}
        >>> mx.model.save_checkpoint(prefix, 0, y, arrays, stats)
        >>> ckpt = read_symbol(prefix + "-symbol.json")
        >>> ckpt.tensor(ckpt.layers[1], "gamma").tolist(), ckpt.layers[1].attrs["spec"]["eps"]
        ([1.0, 1.0], 0.001)
    """
    name = os.fspath(path)
    nodes = _read_graph(name)
    params_path = os.fspath(params) if params is not None else _params_file(name)
    reader = _SymbolReader(nodes, _load_arrays(params_path), f"{name} + {params_path}")
    try:
        reader.read()
    except (KeyError, IndexError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{name}: malformed symbol graph: {err!r}") from None
    return Checkpoint(layers=reader.layers, tensors=reader.tensors, source="mxnet")


def _read_parameters(model: Any, path: str) -> Any:
    """Load a ``save_parameters`` file after checking every name and shape."""
    arrays = _load_arrays(path)
    if arrays and all(k.startswith(("arg:", "aux:")) for k in arrays):
        symbol = re.sub(r"-\d{4,}\.params$", _SYMBOL_SUFFIX, path)
        if symbol != path and os.path.exists(symbol):
            load_checkpoint(model, read_symbol(symbol, path))
            return model
        raise CheckpointError(
            f"{path}: holds arg:/aux: parameters (from export or the symbol API): read it "
            f"through its {_SYMBOL_SUFFIX} file"
        )
    own = internals.parameters_by_structure(model)
    shapes = {key: tuple(value.shape) for key, value in arrays.items()}
    check_state_fits(path, "names", shapes, {key: tuple(p.shape) for key, p in own.items()})
    for key, value in arrays.items():
        own[key].set_data(mx.nd.array(value, dtype=own[key].dtype))
    return model


def read_native(model: Any, path: str | os.PathLike[str]) -> Any:
    """Read an MXNet file into the Gluon ``model`` and return it.

    ``prefix-symbol.json`` (with ``prefix-NNNN.params``, highest epoch) is read by
    :func:`read_symbol` and loaded with :func:`load_checkpoint` (settings included);
    a ``.params`` file from ``save_parameters`` is checked name by name and shape by shape
    against ``model`` first. A damaged or mismatched file raises
    :class:`~unorm.port.CheckpointError` and leaves ``model`` unchanged. The file kind
    comes from the name (``-symbol.json`` or ``.params``); any other name is refused.

    Example:
        >>> import tempfile
        >>> a, b = gluon.nn.Dense(2, in_units=3), gluon.nn.Dense(2, in_units=3)
        >>> a.initialize(); b.initialize()
        >>> path = os.path.join(tempfile.mkdtemp(), "dense.params")
        >>> write_native(a, path)
        >>> read_native(b, path) is b
        True
        >>> bool((a.weight.data() == b.weight.data()).asnumpy().all())
        True
    """
    name = os.fspath(path)
    if name.endswith(_SYMBOL_SUFFIX):
        load_checkpoint(model, read_symbol(name))
        return model
    if name.endswith(".params"):
        return _read_parameters(model, name)
    raise CheckpointError(f"{name}: an MXNet file name ends with {_SYMBOL_SUFFIX} or .params")


def _save_export(model: Any, symbol_tmp: str, params_tmp: str) -> None:
    """What ``HybridBlock.export`` writes, from a symbolic trace of ``model``: the same
    graph and ``arg:``/``aux:`` parameters, with no example input and no forward pass."""
    if not isinstance(model, gluon.HybridBlock):
        raise CheckpointError(
            f"a {type(model).__name__} cannot be exported as a symbol graph: build the "
            "model from HybridBlocks, or write a .params file"
        )
    graph = _traced(model)
    graph.save(symbol_tmp, remove_amp_cast=True)
    args, aux = set(graph.list_arguments()), set(graph.list_auxiliary_states())
    arrays = {}
    for param in model.collect_params().values():
        if param.name in args or param.name in aux:
            kind = "arg" if param.name in args else "aux"
            arrays[f"{kind}:{param.name}"] = param.list_data()[0].copyto(mx.cpu())
    mx.nd.save(params_tmp, arrays)


def write_native(model: Any, path: str | os.PathLike[str]) -> None:
    """Save the Gluon ``model`` as MXNet files, atomically (temporary files in the same
    folder, then renamed over the targets).

    ``prefix-symbol.json``: the model's graph and ``prefix-0000.params``, as
    ``HybridBlock.export`` writes them (loadable by ``gluon.SymbolBlock.imports`` after
    ``import unorm.mxnet``, by ``mx.mod.Module`` and by :func:`read_native`); the graph is
    traced symbolically, so no example input is needed and the model is left as it was.
    ``.params``: ``save_parameters``.

    Example:
        >>> import tempfile
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Dense(2, in_units=3))
        >>> net.initialize()
        >>> folder = tempfile.mkdtemp()
        >>> write_native(net, os.path.join(folder, "net-symbol.json"))
        >>> sorted(os.listdir(folder))
        ['net-0000.params', 'net-symbol.json']
    """
    target = Path(path)
    if target.name.endswith(_SYMBOL_SUFFIX):
        params = target.with_name(target.name[: -len(_SYMBOL_SUFFIX)] + "-0000.params")
        # The inner file is renamed first: the entry file (the graph) comes last.
        with atomic_file(target) as symbol_tmp, atomic_file(params) as params_tmp:
            _save_export(model, symbol_tmp, params_tmp)
        return
    if not target.name.endswith(".params"):
        raise CheckpointError(f"{target}: an MXNet file name ends with {_SYMBOL_SUFFIX} or .params")
    with atomic_file(target) as tmp:
        model.save_parameters(tmp)

"""Export a Keras model's state to the neutral checkpoint and load one into a model.

Layers with weights are matched by order (``model.layers``, nested Sequential and
functional models entered in place): Conv1D/2D/3D, Conv1D/2D/3DTranspose, Dense, unorm's
:class:`~unorm.keras.BatchNorm` and ``keras.layers.BatchNormalization``; pooling,
activations, Flatten, Dropout and the input layer carry nothing. Any other layer with
weights is refused (:class:`~unorm.port.CheckpointError`) rather than skipped.

Keras keeps its tensors channels-last; the checkpoint holds PyTorch's layout
(:mod:`unorm.port`), so kernels are transposed on the way out and back:

- Conv ``(*k, I/g, O)`` <-> ``(O, I/g, *k)``; ConvTranspose ``(*k, O, I)`` <-> ``(I, O, *k)``;
  Dense ``(in, out)`` <-> ``(out, in)``.
- A Dense fed by a Flatten of a feature map (read from the model's graph: no example input
  needed) has its input rows in Keras's flatten order ``(*spatial, C)``; the checkpoint
  records ``flatten_from = [C, *spatial]`` and holds the rows in channels-first order.
  On load such rows go back to Keras's order, also into a Dense fed otherwise (a
  ``Reshape`` flattens channels-last too); a model whose Dense follows a Flatten of a
  feature map refuses a checkpoint entry without ``flatten_from`` (its order is unknown).

A model saved by Keras itself goes to the neutral checkpoint through Keras's own loaders
(``import unorm.keras`` first, so that unorm's layers deserialise)::

    model = keras.saving.load_model("model.keras")
    # or, weights only: model = lenet_bn(); model.load_weights("model.weights.h5")
    unorm.port.save(export_checkpoint(model), "model.safetensors")

and back the same way: :func:`load_checkpoint`, then ``model.save(...)``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import keras
import numpy as np

from .._core import probe as probes
from .._core.flow import FlowNode, complete
from .._core.port_plan import (
    COUNTER,
    ROLES,
    PortModel,
    Slot,
    atomic_file,
    export,
    kind_of,
    load,
    match_by_names,
    present_roles,
    warn_native_gaps,
)
from ..port import Checkpoint, CheckpointError, Layer
from ..spec import BatchNormSpec, ScaledWSSpec
from . import internals, stats
from .batchnorm import BatchNorm
from .ws import _ScaledStd

__all__ = ["export_checkpoint", "export_model", "load_checkpoint", "read_native", "write_native"]

_L = keras.layers
# Checkpoint role -> variable of a Keras layer (unorm's BatchNorm names its variables as
# keras.layers.BatchNormalization does).
_ATTRS = {role: role for roles in ROLES.values() for role in roles} | {
    "weight": "kernel",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
_SUPPORTED = (
    "Conv1D/2D/3D (grouped too), DepthwiseConv1D/2D, Conv1D/2D/3DTranspose, Dense, "
    "BatchNorm, BatchNormalization"
)
#: Depthwise convolutions: a grouped conv (one group per input channel) in the checkpoint.
_DEPTHWISE = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
# The layers the checkpoint describes (Conv*DTranspose first: they subclass Conv*D).
_KINDS = [
    ("conv_transpose", (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)),
    ("conv", (_L.Conv1D, _L.Conv2D, _L.Conv3D, *_DEPTHWISE)),
    ("dense", _L.Dense),
    ("batchnorm", (BatchNorm, _L.BatchNormalization)),
]


# -- which layers, in which order -----------------------------------------------------


def _named_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """Every layer of ``model`` in model order, named by its path below ``model``; a
    nested model comes first, then its own layers (``"block/dense"``)."""
    if not isinstance(model, keras.Model):
        yield str(model.name), model
        return
    for layer in model.layers:
        yield str(layer.name), layer
        if isinstance(layer, keras.Model):
            for name, inner in _named_layers(layer):
                yield f"{layer.name}/{name}", inner


def _check_supported(layer: Any, name: str, kind: str) -> None:
    what = f"layer {name!r} ({type(layer).__name__})"
    if not layer.built:
        raise CheckpointError(f"{what} is not built: build or call the model first")
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise CheckpointError(
            f"{what} is LoRA-enabled or quantized: its stored weights are not its kernel; "
            "merge or dequantize it first"
        )
    if kind == "batchnorm" and getattr(layer, "renorm", False):
        raise CheckpointError(
            f"{what} uses renorm=True (batch renormalisation), which the checkpoint cannot describe"
        )


def _param_layers(model: Any) -> list[tuple[str, Any, str]]:
    """The layers with weights, in order, as (name, layer, kind); refuses the others."""
    if not model.built:
        raise CheckpointError(
            f"model {model.name!r} is not built (it has no weights yet): give it a "
            "keras.Input, build it, or call it once"
        )
    out = []
    for name, layer in _named_layers(model):
        kind = kind_of(layer, _KINDS)
        if kind is not None:
            _check_supported(layer, name, kind)
            out.append((name, layer, kind))
        elif layer.weights and not isinstance(layer, keras.Model):
            raise CheckpointError(
                f"layer {name!r} ({type(layer).__name__}) has weights but is not a layer the "
                f"checkpoint describes ({_SUPPORTED})"
            )
    return out


# -- which Dense layers follow a Flatten (read from the model's graph) ----------------


def _graph_nodes(model: Any) -> list[Any]:
    """The call nodes of ``model``'s own graph (nested models are one node each).

    Walked back from the outputs, so nodes left on shared layers by earlier builds (a
    Sequential rebuilds its graph on ``add``) are not seen. Empty for a subclassed model.
    """
    try:
        outputs = keras.tree.flatten(model.outputs)
    except (AttributeError, ValueError, TypeError):
        return []
    nodes: list[Any] = []
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        history = internals.history(stack.pop())
        if history is None or history.operation is None:
            continue
        node = internals.inbound_node(history.operation, history.node_index)
        if id(node) not in seen:
            seen.add(id(node))
            nodes.append(node)
            stack.extend(node.input_tensors)
    return nodes


def _flattened_shape(flatten: Any, tensor: Any) -> list[int] | None:
    """``[C, *spatial]`` of the feature map ``tensor`` that ``flatten`` flattens."""
    shape = tuple(tensor.shape[1:])
    if len(shape) < 2 or any(d is None for d in shape):
        return None
    # Keras's Flatten always flattens in channels-last order (*spatial, C): with
    # data_format="channels_first" it moves the channels last before flattening.
    if flatten.data_format == "channels_first":
        channels, spatial = shape[0], shape[1:]
    else:
        channels, spatial = shape[-1], shape[:-1]
    return [int(channels), *(int(d) for d in spatial)]


def _trace_flatten(tensor: Any, entry: dict[int, Any], dense: str) -> list[int] | None:
    """Walk back from a Dense's input through shape-preserving layers to a Flatten.

    ``entry`` maps the input tensors of a nested model to the tensors that feed them in
    the model around it, so the walk can leave a nested model through its input.
    """
    weighted: str | None = None
    while True:
        history: Any = internals.history(tensor)
        op = None if history is None else history.operation
        if op is None or isinstance(op, keras.layers.InputLayer):
            if id(tensor) not in entry:
                return None
            tensor = entry[id(tensor)]
            continue
        node = internals.inbound_node(op, history.node_index)
        inputs, outputs = list(node.input_tensors), list(node.output_tensors)
        if isinstance(op, keras.layers.Flatten):
            shape = _flattened_shape(op, inputs[0])
            if shape is not None and weighted is not None and math.prod(shape[1:]) > 1:
                # e.g. Flatten -> BatchNormalization -> Dense: that layer's per-feature
                # weights would need the same reordering, which the checkpoint cannot say.
                raise CheckpointError(
                    f"dense {dense!r} follows {weighted!r}, a layer with weights on the "
                    f"flattened features of a {shape} (channels-first) feature map: its "
                    "weights cannot be reordered between channels-last and channels-first"
                )
            return shape
        if len(inputs) != 1 or len(outputs) != 1 or inputs[0].shape != outputs[0].shape:
            return None
        if op.weights:
            weighted = str(op.name)
        tensor = inputs[0]


def _flatten_sources(model: Any) -> dict[int, Any]:
    """For every Dense in ``model``'s graphs (by ``id``): ``[C, *spatial]`` of the
    Flatten it follows, or None. A Dense missing from the result is in no graph."""
    found: dict[int, Any] = {}

    def visit(net: Any, entry: dict[int, Any]) -> None:
        for node in _graph_nodes(net):
            op = node.operation
            if isinstance(op, keras.Model):
                inner = dict(entry)
                feeds = zip(keras.tree.flatten(op.inputs), node.input_tensors, strict=False)
                inner.update({id(own): outer for own, outer in feeds})
                visit(op, inner)
            elif isinstance(op, keras.layers.Dense) and node.input_tensors:
                shape = _trace_flatten(node.input_tensors[0], entry, str(op.name))
                if id(op) in found and found[id(op)] != shape:
                    raise CheckpointError(
                        f"dense {op.name!r} is called on inputs of different layouts "
                        f"({found[id(op)]} and {shape}): its input order is ambiguous"
                    )
                found[id(op)] = shape

    if isinstance(model, keras.Model):
        visit(model, {})
    return found


# -- layout conversion (pure NumPy) ----------------------------------------------------


def _depthwise_to_canonical(kernel: np.ndarray) -> np.ndarray:
    """A depthwise kernel ``(*k, I, M)`` as the canonical grouped weight ``(I*M, 1, *k)``:
    output channel ``i*M + m`` is input ``i``'s filter ``m``, as in both frameworks."""
    *k, channels, multiplier = kernel.shape
    flat = kernel.reshape(*k, channels * multiplier)
    return np.ascontiguousarray(np.moveaxis(flat, -1, 0)[:, None])


def _depthwise_from_canonical(weight: np.ndarray, multiplier: int) -> np.ndarray:
    """The inverse of :func:`_depthwise_to_canonical`."""
    out_channels, _, *k = weight.shape
    kernel = np.moveaxis(weight[:, 0], 0, -1)
    return np.ascontiguousarray(kernel.reshape(*k, out_channels // multiplier, multiplier))


def _canonical_shape(kind: str, shape: tuple[int, ...], depthwise: bool = False) -> tuple[int, ...]:
    """The canonical shape of a Keras kernel of ``shape``."""
    if depthwise:
        return (shape[-2] * shape[-1], 1, *shape[:-2])
    if kind == "dense":
        return (shape[1], shape[0])
    return (shape[-1], shape[-2], *shape[:-2])


def _kernel_to_canonical(kind: str, kernel: np.ndarray, flatten: list[int] | None) -> np.ndarray:
    if kind != "dense":
        # Conv (*k, I/g, O) -> (O, I/g, *k); ConvTranspose (*k, O, I) -> (I, O, *k).
        n = kernel.ndim - 2
        return np.ascontiguousarray(np.transpose(kernel, (n + 1, n, *range(n))))
    if flatten is not None:
        channels, *spatial = flatten
        # Keras's rows are in (*spatial, C) order; the canonical ones in (C, *spatial).
        kernel = kernel.reshape(*spatial, channels, -1)
        kernel = np.moveaxis(kernel, -2, 0).reshape(math.prod(flatten), -1)
    return np.ascontiguousarray(kernel.T)


def _kernel_from_canonical(kind: str, weight: np.ndarray, flatten: list[int] | None) -> np.ndarray:
    if kind != "dense":
        n = weight.ndim - 2
        return np.ascontiguousarray(np.transpose(weight, (*range(2, n + 2), 1, 0)))
    kernel = weight.T
    if flatten is not None:
        channels, *spatial = flatten
        kernel = np.moveaxis(kernel.reshape(channels, *spatial, -1), 0, -2)
        kernel = kernel.reshape(math.prod(flatten), -1)
    return np.ascontiguousarray(kernel)


def _numpy(variable: Any) -> np.ndarray:
    # Variable.numpy(), not np.asarray(variable): NumPy 2 warns on TF's __array__.
    return np.array(variable.numpy())


def _as_dtype(array: np.ndarray, variable: Any) -> np.ndarray:
    """``array`` in ``variable``'s dtype where NumPy has it (else ``assign`` casts)."""
    try:
        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
    except TypeError:
        return np.asarray(array)
    return np.asarray(array, dtype=dtype)


# -- export ------------------------------------------------------------------------------


def _native_axis(layer: Any, name: str) -> int:
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise CheckpointError(
                f"layer {name!r} ({type(layer).__name__}) normalises over axes {list(axis)}; "
                "the checkpoint describes BatchNorm with one feature axis"
            )
        axis = axis[0]
    return int(axis)


def _native_spec(layer: Any, name: str) -> BatchNormSpec:
    return BatchNormSpec.from_native(
        "keras",
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        center=layer.center,
        scale=layer.scale,
        axis=_native_axis(layer, name),
    )


def _read_bn(layer: Any) -> dict[str, np.ndarray]:
    out = {
        role: _numpy(v) for role, v in present_roles(layer, "batchnorm", _ATTRS) if role != COUNTER
    }
    if getattr(layer, "moving_mean", None) is not None:
        # Only a momentum=None BatchNorm keeps a counter; the others count nothing.
        counter = getattr(layer, COUNTER, None)
        value = 0 if counter is None else _numpy(counter)
        out[COUNTER] = np.asarray(value, dtype=np.int64).reshape(())
    return out


def _warn_unread(targets: list[tuple[str, Any, str]], flat: dict[int, Any], model: Any) -> None:
    unread = [name for name, layer, kind in targets if kind == "dense" and id(layer) not in flat]
    flattens = any(isinstance(layer, keras.layers.Flatten) for _, layer in _named_layers(model))
    if unread and flattens:
        warnings.warn(
            f"cannot read from the model's structure whether Dense layer(s) {unread} follow "
            "a Flatten (a subclassed model has no graph): no flatten_from is recorded, so a "
            "channels-first framework would read their inputs in Keras's channels-last "
            "order. Build the model as a Sequential or functional model.",
            stacklevel=3,
        )


def _channels_last(model: Any) -> bool:
    """Whether the model's feature maps are channels-last (no layer says
    ``data_format="channels_first"``)."""
    formats = {getattr(layer, "data_format", None) for _, layer in _named_layers(model)}
    return "channels_first" not in formats


def _to_canonical(array: np.ndarray, channels_last: bool) -> np.ndarray:
    """A batch (``(N, *spatial, C)`` where channels-last) as ``(N, C, *spatial)``."""
    a = np.asarray(array, dtype=np.float64)
    return np.moveaxis(a, -1, 1) if channels_last and a.ndim >= 3 else a


def _probe_shape(model: Any) -> tuple[int, ...] | None:
    """One sample's canonical input shape, where the model's single input says it."""
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        return None
    shape = tuple(inputs[0].shape[1:])
    if not shape or any(d is None for d in shape):
        return None
    dims = tuple(int(d) for d in shape)
    if _channels_last(model) and len(dims) >= 2:
        return (dims[-1], *dims[:-1])
    return dims


# Keras's merge layers the flow keeps (unorm._core.flow).
_MERGES = ((_L.Add, "add"), (_L.Multiply, "mul"), (_L.Concatenate, "concat"))


def flow_of(model: Any, targets: list[tuple[str, Any, str]]) -> list[FlowNode] | None:
    """``model``'s data flow over ``targets`` (:mod:`unorm._core.flow`), read from its
    functional graph (a built Sequential's too); None for a subclassed model, several
    inputs, a layer of a nested model or one called other than once, or tensors combined
    by a layer the flow has no operation for."""
    calls = _graph_nodes(model)
    inputs = keras.tree.flatten(getattr(model, "inputs", None) or [])
    if not calls or len(inputs) != 1:
        return None
    index_of = {id(layer): i for i, (_, layer, _) in enumerate(targets)}
    nodes = [FlowNode("input")]
    where = {id(inputs[0]): 0}
    pending = list(calls)
    while pending:
        ready = [c for c in pending if all(id(t) in where for t in c.input_tensors)]
        if not ready:
            return None
        for call in ready:
            pending.remove(call)
            op = call.operation
            ins = [where[id(t)] for t in call.input_tensors]
            merge = next((name for cls, name in _MERGES if isinstance(op, cls)), None)
            if isinstance(op, _L.InputLayer):
                result = 0
            elif id(op) in index_of:
                if len(set(ins)) != 1:
                    return None
                nodes.append(FlowNode("layer", (ins[0],), index_of[id(op)]))
                result = len(nodes) - 1
            elif merge is not None and len(set(ins)) >= 2:  # x * sigmoid(x): an activation
                nodes.append(FlowNode(merge, tuple(ins)))
                result = len(nodes) - 1
            elif len(set(ins)) == 1:
                result = ins[0]  # an activation, pooling, reshape, flatten: contracted
            else:
                return None
            for tensor in keras.tree.flatten(call.output_tensors):
                where[id(tensor)] = result
    return complete(nodes, len(targets))


def run_probe(
    model: Any, targets: list[tuple[str, Any, str]], x: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``model``'s inference output on ``x`` (canonical, channels-first) and the output
    of each of its own layers in ``targets`` (a layer of a nested model, or one called
    twice, is not observed), all canonical float64; no state changes."""
    channels_last = _channels_last(model)
    native = np.moveaxis(x, 1, -1) if channels_last and x.ndim >= 3 else x
    dtype = keras.backend.standardize_dtype(getattr(model, "compute_dtype", "float32"))
    batch = native.astype("float32" if dtype not in ("float64",) else dtype)
    own = {id(layer) for layer in getattr(model, "layers", [])}
    observed = [(name, layer) for name, layer, _ in targets if id(layer) in own]
    outputs: dict[str, np.ndarray] = {}
    result: Any
    try:
        taps = [layer.output for _, layer in observed]
        probe = keras.Model(model.inputs, [*model.outputs, *taps])
    except (AttributeError, ValueError, TypeError):  # no graph (subclassed), shared layers
        result = model(batch, training=False)
    else:
        values = probe([batch], training=False)  # one input, as model.inputs lists it
        result = values[: len(model.outputs)]
        for (name, _), value in zip(observed, values[len(model.outputs) :], strict=True):
            outputs[name] = _to_canonical(keras.ops.convert_to_numpy(value), channels_last)
    if isinstance(result, (list, tuple)):
        result = result[0]
    return _to_canonical(keras.ops.convert_to_numpy(result), channels_last), outputs


def export_checkpoint(model: Any, probe: bool = True) -> Checkpoint:
    """The neutral :class:`~unorm.port.Checkpoint` of ``model``'s state (a built Keras
    model, or a single layer), in the canonical channels-first layout.

    ``probe``: where the model has one input of known shape, the checkpoint carries a
    probe (:mod:`unorm._core.probe`: random inputs and the model's inference outputs on
    them) on which every load is verified (default True).

    A Dense that follows a Flatten of a feature map is found from the model's graph and
    gets ``flatten_from``; a subclassed model has no graph, so there this is not known
    (a ``UserWarning`` says so when the model holds a Flatten). BatchNorm settings travel
    in unorm's convention: a ``keras.layers.BatchNormalization`` as the ``keras`` preset
    with its own ``momentum`` and ``epsilon``.

    For a Keras file: ``keras.saving.load_model("m.keras")`` (or ``load_weights`` into the
    same architecture), then this, then :func:`unorm.port.save`.

    Example:
        >>> net = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3),
        ...                         keras.layers.Flatten(), keras.layers.Dense(3)])
        >>> ckpt = export_checkpoint(net)
        >>> [(la.kind, la.attrs.get("flatten_from")) for la in ckpt.layers]
        [('conv', None), ('dense', [2, 2, 2])]
        >>> ckpt.tensor(ckpt.layers[0], "weight").shape  # Keras's (3, 3, 1, 2), transposed
        (2, 1, 3, 3)
    """
    adapter = _KerasModel(model)
    _warn_unread(adapter.layers(), adapter.flat, model)
    shape = _probe_shape(model) if probe else None
    given = None if shape is None else probes.make_input(shape)
    return export(adapter, source="keras", probe_input=given)


# -- the model as the port planner sees it ---------------------------------------------


class _KerasModel(PortModel[Any]):
    """A built Keras model for :mod:`unorm._core.port_plan`: its layers, their variables
    (transposed to and from the canonical layout) and their BatchNorm settings."""

    flatten_order_matters = True  # Keras flattens a feature map as (*spatial, C)

    def __init__(self, model: Any) -> None:
        self._model = model
        self._targets = _param_layers(model)
        self.flat = _flatten_sources(model)

    def run_probe(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return run_probe(self._model, self._targets, x)

    def flow(self) -> list[FlowNode] | None:
        return flow_of(self._model, self._targets)

    def layers(self) -> list[tuple[str, Any, str]]:
        return self._targets

    def slots(self, handle: Any, kind: str) -> dict[str, Slot]:
        out = {
            role: Slot(tuple(int(d) for d in v.shape))
            for role, v in present_roles(handle, kind, _ATTRS)
        }
        if "weight" in out:
            depthwise = isinstance(handle, _DEPTHWISE)
            out["weight"] = Slot(_canonical_shape(kind, out["weight"].shape, depthwise))
        if COUNTER in out:
            out[COUNTER] = Slot(())  # a scalar in the checkpoint
        return out

    def read(self, handle: Any, kind: str, flatten_from: list[int] | None) -> dict[str, Any]:
        if kind == "batchnorm":
            return _read_bn(handle)
        pairs = dict(present_roles(handle, kind, _ATTRS))
        kernel = _numpy(pairs.pop("weight"))
        if isinstance(handle, _DEPTHWISE):
            out = {"weight": _depthwise_to_canonical(kernel)}
        else:
            out = {"weight": _kernel_to_canonical(kind, kernel, flatten_from)}
        return out | {role: _numpy(v) for role, v in pairs.items()}

    def to_native(
        self, handle: Any, kind: str, role: str, value: np.ndarray, flatten_from: list[int] | None
    ) -> Any:
        if role == "weight" and isinstance(handle, _DEPTHWISE):
            value = _depthwise_from_canonical(value, int(handle.depth_multiplier))
        elif role == "weight":
            value = _kernel_from_canonical(kind, value, flatten_from)
        return _as_dtype(value, getattr(handle, _ATTRS[role]))

    def assign(self, handle: Any, role: str, value: Any) -> None:
        getattr(handle, _ATTRS[role]).assign(value)

    def flatten_from(self, handle: Any) -> list[int] | None:
        found = self.flat.get(id(handle))
        return list(found) if isinstance(found, list) else None

    def groups(self, handle: Any) -> int:
        if isinstance(handle, _DEPTHWISE):  # one group per input channel
            return int(handle.kernel.shape[-2])
        return int(getattr(handle, "groups", 1))

    def ws_spec(self, handle: Any) -> ScaledWSSpec | None:
        return handle.spec if isinstance(handle, _ScaledStd) else None

    def batchnorm_spec(self, handle: Any, name: str) -> BatchNormSpec:
        return handle.spec if isinstance(handle, BatchNorm) else _native_spec(handle, name)

    def native_batchnorm(self, handle: Any) -> bool:
        return not isinstance(handle, BatchNorm)

    def check_spec(self, handle: Any, spec: BatchNormSpec, where: str) -> None:
        if not isinstance(handle, BatchNorm):
            return
        own = handle.spec
        has_counter = handle.num_batches_tracked is not None
        if own.track_running_stats and (spec.momentum is None) != has_counter:
            # The counter is a weight created at build only for momentum=None, and a built
            # layer cannot gain or lose a weight (nor would a saved model load back).
            needed = "momentum=None" if spec.momentum is None else "a numeric momentum"
            raise CheckpointError(
                f"{where}: momentum {spec.momentum} in the checkpoint, {own.momentum} in the "
                "model: a Keras BatchNorm keeps the num_batches_tracked counter of the "
                "cumulative average (momentum=None) only when built with it; build the "
                f"model's layer with {needed}"
            )
        if spec.update_on == "backward" and not stats.tensorflow_backend():
            raise CheckpointError(
                f"{where}: update_on='backward' in the checkpoint needs the TensorFlow "
                f"backend, not {keras.backend.backend()!r}"
            )

    def set_spec(self, handle: Any, spec: BatchNormSpec | ScaledWSSpec, source: Layer) -> None:
        if isinstance(spec, ScaledWSSpec) or isinstance(handle, BatchNorm):
            handle.spec = spec  # every setting is read through the spec at call time
            return
        handle.epsilon = float(spec.eps)
        if spec.momentum is not None:
            handle.momentum = 1.0 - spec.momentum  # Keras weighs the old value
        native = "keras.layers.BatchNormalization"
        warn_native_gaps(spec, "keras", native, "unorm.keras.convert()", source)


def _forget_traces(model: Any) -> None:
    """Drop the models' traced train/test/predict functions: BatchNorm settings (eps,
    momentum) are Python numbers, baked into a function when it is traced."""
    nets = [model] + [layer for _, layer in _named_layers(model) if isinstance(layer, keras.Model)]
    for net in nets:
        for attr in ("train_function", "test_function", "predict_function"):
            if getattr(net, attr, None) is not None:
                setattr(net, attr, None)


def load_checkpoint(model: Any, ckpt: Checkpoint, mapping: Mapping[str, str] | None = None) -> None:
    """Load ``ckpt`` into the built Keras ``model`` (layers matched by order, shapes
    checked first).

    Nothing is changed unless every layer matches: kinds, shapes in the canonical layout,
    conv groups, a Dense's ``flatten_from`` against the model's own Flatten, BatchNorm
    centre/scale/running statistics. A unorm :class:`~unorm.keras.BatchNorm` takes the
    checkpoint's BatchNorm settings (a ported PyTorch or MXNet layer keeps behaving as it
    did at home, e.g. its eps, momentum and running-variance estimator); its axis,
    ``center``, ``scale`` and ``track_running_stats`` stay the model's, and so does whether
    its momentum is None (the counter that needs is built with the layer: a mismatch is a
    :class:`~unorm.port.CheckpointError`). A ``keras.layers.BatchNormalization`` takes
    eps and momentum and warns (``UserWarning``) where the source's training semantics
    (unbiased running variance, ``update_on``, momentum=None, skipping non-finite
    statistics, refusing one value per feature) cannot be expressed by it.
    The model's cached ``predict``/``fit``/``evaluate`` functions are dropped so that they
    retrace with the new settings; retrace your own ``tf.function`` too. A checkpoint with
    a probe is verified: the model's inference output on the probe's input must be the
    source's, else every value and setting is put back and the load raises
    :class:`~unorm.port.CheckpointError` naming the first layer whose output diverges.
    Layers pair along the data flow where both sides record one, else by order;
    ``mapping`` (checkpoint layer name -> the model's layer name) pairs the layers it
    names explicitly, the rest by order.

    Example:
        >>> a = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> b = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> load_checkpoint(b, export_checkpoint(a))
        >>> bool(np.array_equal(a.layers[0].kernel.numpy(), b.layers[0].kernel.numpy()))
        True
    """

    def refresh(steps: Any) -> None:
        # Settings are baked into traced functions: retrace before the probe runs.
        if any(step.spec is not None for step in steps):
            _forget_traces(model)

    match = None if mapping is None else match_by_names(mapping)
    load(_KerasModel(model), ckpt, match, refresh=refresh)


def export_model(model: Any, input_shape: tuple[int, ...]) -> Checkpoint:
    """:func:`export_checkpoint` under the signature ``unorm port`` calls for every
    framework (Keras reads Flatten shapes from the model's graph: ``input_shape`` is not
    needed)."""
    del input_shape
    return export_checkpoint(model)


def read_native(model: Any, path: str | os.PathLike[str]) -> Any:
    """Read a Keras file into ``model`` and return the model holding its weights.

    ``.weights.h5`` is loaded into ``model`` (Keras checks every shape before assigning);
    ``.keras`` is loaded whole (``unorm.keras`` must be imported, which it is here) and
    returned instead. A damaged or mismatched file raises
    :class:`~unorm.port.CheckpointError`.
    """
    name = os.fspath(path)
    try:
        if name.endswith(".weights.h5"):
            before = [v.numpy() for v in model.weights]
            try:
                model.load_weights(name)
            except BaseException:
                for variable, value in zip(model.weights, before, strict=True):
                    variable.assign(value)  # a partial load must not stick
                raise
            return model
        return keras.saving.load_model(name)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name}: not a readable Keras file for this model: {err}") from None


def write_native(model: Any, path: str | os.PathLike[str]) -> None:
    """Save ``model`` as ``.keras`` or ``.weights.h5`` atomically (temporary file, rename)."""
    ending = ".weights.h5" if os.fspath(path).endswith(".weights.h5") else ".keras"
    with atomic_file(path, suffix=ending) as tmp:  # Keras reads the format from the name
        if ending == ".weights.h5":
            model.save_weights(tmp, overwrite=True)
        else:
            model.save(tmp, overwrite=True)

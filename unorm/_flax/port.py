"""Export a Flax NNX model's state to the neutral checkpoint and load one into a model.

Layers with parameters are found by walking the model's graph (``nnx.iter_graph``, in its
order: children before parents, attributes sorted by name), each named by its path
(``"norms/0"``): ``nnx.Conv`` (grouped and depthwise through ``feature_group_count``,
:class:`~unorm.flax.ScaledStdConv` with its gain), ``nnx.ConvTranspose``, ``nnx.Linear``,
unorm's :class:`~unorm.flax.BatchNorm` and ``nnx.BatchNorm``. Any other ``nnx.Param`` or
``nnx.BatchStat`` (an ``nnx.Embed``, a LayerNorm, a custom module's) is refused
(:class:`~unorm.port.CheckpointError`), never skipped.

Flax keeps its tensors channels-last; the checkpoint holds PyTorch's layout
(:mod:`unorm.port`), so kernels are transposed on the way out and back:

- Conv ``(*k, I/g, O)`` <-> ``(O, I/g, *k)`` (a depthwise kernel ``(*k, 1, I*M)`` is the
  grouped case, output channel ``i*M + m`` in both); Linear ``(in, out)`` <-> ``(out, in)``.
- ConvTranspose: ``lax.conv_transpose`` correlates with the kernel as given, PyTorch's
  transposed convolution with the spatially flipped one; so ``(*k, I, O)`` is the
  canonical ``(I, O, *k)`` flipped, or, with ``transpose_kernel=True``, ``(*k, O, I)``
  unflipped.
- Inputs and outputs of the probe: ``(N, C, *spatial)`` <-> ``(N, *spatial, C)``.

The data flow and the flatten order are read from the model itself, with one example
input (the probe's, or ``input_shape``): the forward is traced to a jaxpr
(``jax.make_jaxpr`` over ``nnx.split``/``nnx.merge``, in eval mode, nothing runs) with
every layer's call wrapped in two named identity ``jax.jit`` markers, so the jaxpr shows
which value each layer reads. Parameter-free operations are contracted (activations,
pooling, reshapes), ``add``/``mul``/``concatenate`` of several layer outputs are kept
(:mod:`unorm._core.flow`). A Linear that reads a ``reshape`` of a rank >= 3 feature map
records ``flatten_from = [C, *spatial]``: flattened as it stands, its rows are in
``(*spatial, C)`` order and are permuted to and from the canonical ``(C, *spatial)``;
flattened after ``jnp.transpose`` to channels-first (as ``unorm.models.flax`` does) they
are canonical already. Without an example input none of this is known: the layers are
matched by order and a checkpoint's ``flatten_from`` over a real map is refused.

The probe (:mod:`unorm._core.probe`) runs a copy of the model (``nnx.merge`` of its
split: the model's own state and flags are untouched) in eval mode, eagerly, with the
layers' ``__call__`` intercepted to keep each one's first output.

Native file: ``.msgpack``, the model's variables (every ``nnx.Variable`` but the RNG
state) as one flat msgpack map from the variable's path (``"conv1/kernel"``) to its array,
written with ``flax.serialization.msgpack_serialize``. A flat map of plain arrays, rather
than the nested ``nnx.State``, so that any reader of msgpack sees the names, integer
list indices do not need msgpack's non-string keys, and a file is checked entry by entry
before anything is set. Like any weights-only file it holds no BatchNorm settings.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization
from jax.extend.core import Literal

from .._core import port_plan as plan
from .._core import probe as probes
from .._core.flow import FlowNode, complete
from .._core.port_plan import COUNTER, ROLES, PortModel, Slot, kind_of, present_roles
from ..port import Checkpoint, CheckpointError, Layer
from ..spec import BatchNormSpec, ScaledWSSpec
from .batchnorm import BatchNorm
from .ws import ScaledStdConv

__all__ = ["export_checkpoint", "export_model", "load_checkpoint", "read_native", "write_native"]

# Checkpoint role -> attribute of a Flax layer (unorm's BatchNorm keeps nnx.BatchNorm's).
_ATTRS = {role: role for roles in ROLES.values() for role in roles} | {
    "weight": "kernel",
    "gamma": "scale",
    "beta": "bias",
    "running_mean": "mean",
    "running_var": "var",
}
# nnx.ConvTranspose is not an nnx.Conv subclass; listed first all the same.
_KINDS: list[tuple[str, type | tuple[type, ...]]] = [
    ("conv_transpose", nnx.ConvTranspose),
    ("conv", nnx.Conv),
    ("dense", nnx.Linear),
    ("batchnorm", (BatchNorm, nnx.BatchNorm)),
]
_SUPPORTED = (
    "nnx.Conv (grouped, depthwise), nnx.ConvTranspose, nnx.Linear, BatchNorm, nnx.BatchNorm"
)
# The variables a model's state holds for porting (the RNG streams are not weights).
_STATE = nnx.Not(nnx.RngState)

Target = tuple[str, Any, str]


# -- which layers -----------------------------------------------------------------------


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _param_layers(model: Any) -> tuple[list[Target], list[tuple[Any, ...]]]:
    """The layers with parameters as (name, module, kind), in graph order, and their
    paths; refuses a weight no such layer owns."""
    if not isinstance(model, nnx.Module):
        raise CheckpointError(f"expected a Flax NNX module, got {type(model).__name__}")
    targets: list[Target] = []
    paths: list[tuple[Any, ...]] = []
    owned: set[tuple[Any, ...]] = set()
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        kind = kind_of(node, _KINDS)
        if kind is None:
            continue
        name = _name(path) or type(node).__name__
        if (
            isinstance(node, nnx.ConvTranspose)
            and int(getattr(node, "feature_group_count", 1)) != 1
        ):
            raise CheckpointError(f"layer {name!r}: a grouped nnx.ConvTranspose is not supported")
        if getattr(node, "mask", None) is not None:
            raise CheckpointError(
                f"layer {name!r} ({type(node).__name__}) has a kernel mask, which the "
                "checkpoint cannot describe"
            )
        targets.append((name, node, kind))
        paths.append(tuple(path))
        owned.update((*path, attr) for attr in vars(node))
    for path, value in nnx.iter_graph(model):
        if isinstance(value, (nnx.Param, nnx.BatchStat)) and tuple(path) not in owned:
            raise CheckpointError(
                f"{_name(path)!r} ({type(value).__name__}) belongs to no layer the "
                f"checkpoint describes ({_SUPPORTED})"
            )
    return targets, paths


# -- layouts (pure NumPy) -----------------------------------------------------------------


def _canonical_shape(handle: Any, kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "dense":
        return (shape[1], shape[0])
    if kind == "conv_transpose" and not handle.transpose_kernel:
        return (shape[-2], shape[-1], *shape[:-2])  # (*k, I, O) -> (I, O, *k)
    return (shape[-1], shape[-2], *shape[:-2])  # (*k, I/g, O) or (*k, O, I)


def _rows(flatten: list[int]) -> tuple[list[int], list[int]]:
    return flatten[:1], flatten[1:]


def _kernel_to_canonical(
    handle: Any, kind: str, kernel: np.ndarray, channels_last_rows: list[int] | None
) -> np.ndarray:
    if kind == "dense":
        if channels_last_rows is not None:
            (channels,), spatial = _rows(channels_last_rows)
            # rows in (*spatial, C) order -> (C, *spatial)
            kernel = np.moveaxis(kernel.reshape(*spatial, channels, -1), -2, 0)
            kernel = kernel.reshape(math.prod(channels_last_rows), -1)
        return np.ascontiguousarray(kernel.T)
    n = kernel.ndim - 2
    moved = np.transpose(kernel, (n + 1, n, *range(n)))
    if kind == "conv_transpose" and not handle.transpose_kernel:
        moved = np.flip(np.transpose(kernel, (n, n + 1, *range(n))), tuple(range(2, n + 2)))
    return np.ascontiguousarray(moved)


def _kernel_from_canonical(
    handle: Any, kind: str, weight: np.ndarray, channels_last_rows: list[int] | None
) -> np.ndarray:
    if kind == "dense":
        kernel = weight.T
        if channels_last_rows is not None:
            (channels,), spatial = _rows(channels_last_rows)
            kernel = np.moveaxis(kernel.reshape(channels, *spatial, -1), 0, -2)
            kernel = kernel.reshape(math.prod(channels_last_rows), -1)
        return np.ascontiguousarray(kernel)
    n = weight.ndim - 2
    if kind == "conv_transpose" and not handle.transpose_kernel:
        flipped = np.flip(weight, tuple(range(2, n + 2)))
        return np.ascontiguousarray(np.transpose(flipped, (*range(2, n + 2), 0, 1)))
    return np.ascontiguousarray(np.transpose(weight, (*range(2, n + 2), 1, 0)))


def _to_flax(x: np.ndarray) -> np.ndarray:
    """A canonical batch ``(N, C, *spatial)`` as Flax's ``(N, *spatial, C)``."""
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def _to_canonical(y: Any) -> np.ndarray:
    a = np.asarray(y, dtype=np.float64)
    return np.moveaxis(a, -1, 1) if a.ndim >= 3 else a


def _canonical_sample(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One sample's Flax shape ``(*spatial, C)`` as the canonical ``(C, *spatial)``."""
    return (shape[-1], *shape[:-1]) if len(shape) >= 2 else tuple(shape)


# -- observing the layers' calls ------------------------------------------------------------


@contextlib.contextmanager
def _intercept(classes: set[type], hook: Callable[..., Any]) -> Iterator[None]:
    """Every call of ``classes``' ``__call__`` goes through ``hook(original, self, *args,
    **kwargs)`` for the block; a call made from inside the same module's own call (a
    subclass calling ``super().__call__``) goes straight to the original."""
    every = {c for cls in classes for c in cls.__mro__ if "__call__" in vars(c)}
    every = {c for c in every if issubclass(c, nnx.Module) and c is not nnx.Module}
    originals = {cls: vars(cls)["__call__"] for cls in every}
    active: set[int] = set()

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if id(self) in active:
                return original(self, *args, **kwargs)
            active.add(id(self))
            try:
                return hook(original, self, *args, **kwargs)
            finally:
                active.discard(id(self))

        return call

    for cls, original in originals.items():
        setattr(cls, "__call__", wrap(original))  # noqa: B010
    try:
        yield
    finally:
        for cls, original in originals.items():
            setattr(cls, "__call__", original)  # noqa: B010


def _copy_in_eval(model: Any) -> tuple[Any, dict[tuple[Any, ...], Any]]:
    """A copy of ``model`` (its own variables over the same arrays) in eval mode, and
    its modules by path."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return copy, {tuple(p): n for p, n in nnx.iter_graph(copy) if isinstance(n, nnx.Module)}


def _first_array(output: Any) -> Any:
    leaves = jax.tree_util.tree_leaves(output)
    if not leaves:
        raise CheckpointError(f"the model's output is a {type(output).__name__}, not an array")
    return leaves[0]


def run_probe(
    model: Any, targets: list[Target], paths: list[tuple[Any, ...]], x: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``model``'s eval-mode output on ``x`` (canonical, channels-first) and each
    layer's first output, canonical float64; the model's own state and flags untouched."""
    copy, modules = _copy_in_eval(model)
    names = {id(modules[p]): name for p, (name, _, _) in zip(paths, targets, strict=True)}
    seen: dict[str, np.ndarray] = {}

    def keep(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        name = names.get(id(self))
        if name is not None and name not in seen:
            seen[name] = _to_canonical(out)
        return out

    batch = jnp.asarray(_to_flax(np.asarray(x, dtype=np.float32)))
    with _intercept({type(m) for _, m, _ in targets}, keep):
        output = _first_array(copy(batch))
    return _to_canonical(output), seen


# -- the data flow and the flatten order, read from a jaxpr ---------------------------------

_IN, _OUT = "unorm_port_in_", "unorm_port_out_"
_MERGES = {"add": "add", "add_any": "add", "mul": "mul", "concatenate": "concat"}


def _marker(name: str) -> Callable[[Any], Any]:
    # "+ 0" so that JAX does not forward the jit's input past it (the eqn must stay).
    def ident(x: Any) -> Any:
        return x + jnp.zeros((), x.dtype)

    ident.__name__ = ident.__qualname__ = name
    return jax.jit(ident)


class _Trace:
    """What one traced forward says: the flow over the layers, and per Linear whether it
    reads a flattened map (``[C, *spatial]``) flattened channels-last or channels-first."""

    def __init__(self) -> None:
        self.flow: list[FlowNode] | None = None
        self.flat: dict[int, tuple[list[int], bool]] = {}  # layer -> (sizes, channels_last)
        self.dense_inputs: set[int] = set()  # the Linear layers whose input was seen
        self.order: list[int] = []  # the layers in the order they are first called

    def renumbered(self, new: Mapping[int, int]) -> _Trace:
        """The same trace with layer ``i`` called ``new[i]``."""
        out = _Trace()
        if self.flow is not None:
            out.flow = [
                FlowNode(n.op, n.inputs, None if n.layer is None else new[n.layer])
                for n in self.flow
            ]
        out.flat = {new[i]: v for i, v in self.flat.items()}
        out.dense_inputs = {new[i] for i in self.dense_inputs}
        out.order = [new[i] for i in self.order]
        return out


def _trace(
    model: Any, targets: list[Target], paths: list[tuple[Any, ...]], sample: tuple[int, ...]
) -> _Trace:
    """Trace ``model`` on a zero batch of one Flax-layout ``sample`` shape."""
    graphdef, state = nnx.split(model)
    markers = [(_marker(f"{_IN}{i}"), _marker(f"{_OUT}{i}")) for i in range(len(targets))]
    classes = {type(m) for _, m, _ in targets}
    result = _Trace()

    def forward(state: Any, x: Any) -> Any:
        copy = nnx.merge(graphdef, state)
        copy.eval()
        modules = {tuple(p): n for p, n in nnx.iter_graph(copy) if isinstance(n, nnx.Module)}
        index = {id(modules[p]): i for i, p in enumerate(paths)}

        def mark(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
            i = index.get(id(self))
            if i is None or not args:
                return original(self, *args, **kwargs)
            enter, leave = markers[i]
            return leave(original(self, enter(args[0]), *args[1:], **kwargs))

        with _intercept(classes, mark):
            return _first_array(copy(x))

    try:
        closed = jax.make_jaxpr(forward)(state, jnp.zeros((2, *sample), jnp.float32))
    except Exception:  # a forward that does not trace: matched by order, flatten unknown
        return result
    jaxpr = closed.jaxpr
    env: dict[Any, int] = {jaxpr.invars[-1]: 0}
    producer: dict[Any, Any] = {}
    nodes = [FlowNode("input")]
    entered: dict[int, Any] = {}
    ok = _walk(jaxpr, env, producer, nodes, entered)
    if ok:
        result.flow = complete(nodes, len(targets))
    result.order = [i for i in entered if i >= 0]  # dicts keep the order of first calls
    for i, (_, _, kind) in enumerate(targets):
        if kind == "dense" and i in entered:
            result.dense_inputs.add(i)
            found = _flattened(entered[i], producer, env)
            if found is not None:
                result.flat[i] = found
    return result


def _walk(
    jaxpr: Any, env: dict[Any, int], producer: dict[Any, Any], nodes: list[FlowNode],
    entered: dict[int, Any],
) -> bool:  # fmt: skip
    """Walk ``jaxpr``'s equations, extending ``env`` (value -> flow node it carries);
    False where tensors are combined in a way the flow has no operation for."""
    ok = True
    for eqn in jaxpr.eqns:
        name = str(eqn.params.get("name", "")) if eqn.primitive.name in ("jit", "pjit") else ""
        invars = [v for v in eqn.invars if not isinstance(v, Literal)]
        data = list(dict.fromkeys(env[v] for v in invars if v in env))
        for out in eqn.outvars:
            producer[out] = eqn
        if name.startswith(_IN):
            layer = int(name[len(_IN) :])
            if len(data) != 1:
                ok = False
                continue
            entered.setdefault(layer, invars[0])
            nodes.append(FlowNode("layer", (data[0],), layer))  # the node leave maps to
            entered[-1 - layer] = len(nodes) - 1
        elif name.startswith(_OUT):
            layer = int(name[len(_OUT) :])
            node = entered.get(-1 - layer)
            if node is None:
                ok = False
                continue
            env[eqn.outvars[0]] = node
        elif "jaxpr" in eqn.params and name:
            inner = eqn.params["jaxpr"]
            inner = getattr(inner, "jaxpr", inner)
            for outer, own in zip(eqn.invars, inner.invars, strict=True):
                if outer in env:
                    env[own] = env[outer]
                if outer in producer:
                    producer[own] = producer[outer]
            ok &= _walk(inner, env, producer, nodes, entered)
            for own, outer in zip(inner.outvars, eqn.outvars, strict=True):
                if own in env:
                    env[outer] = env[own]
                if own in producer:
                    producer[outer] = producer[own]
        elif not data:
            continue  # constants, or the inside of a layer (it reads its marker's copy)
        elif eqn.primitive.name in _MERGES and len(data) >= 2:
            nodes.append(FlowNode(_MERGES[eqn.primitive.name], tuple(data)))
            for out in eqn.outvars:
                env[out] = len(nodes) - 1
        elif len(data) == 1:
            for out in eqn.outvars:
                env[out] = data[0]  # an activation, pooling, reshape: contracted
        else:
            ok = False
    return ok


def _flattened(
    var: Any, producer: dict[Any, Any], env: dict[Any, int]
) -> tuple[list[int], bool] | None:
    """Walk back from a Linear's input through one-input shape-keeping operations to a
    ``reshape`` of a rank >= 3 map: ``([C, *spatial], flattened channels-last)``."""
    while True:
        eqn = producer.get(var)
        if eqn is None:
            return None
        name = str(eqn.params.get("name", ""))
        if name.startswith(_OUT):
            return None  # another layer's output: no flatten between them
        data = [v for v in eqn.invars if not isinstance(v, Literal) and v in env]
        if eqn.primitive.name == "reshape" and data:
            shape = tuple(data[0].aval.shape)
            if len(shape) < 3:
                return None
            before = producer.get(data[0])
            perm = tuple(before.params.get("permutation", ())) if before is not None else ()
            if (
                before is not None
                and before.primitive.name == "transpose"
                and (perm == (0, len(shape) - 1, *range(1, len(shape) - 1)))
            ):
                # jnp.transpose to (N, C, *spatial), then flattened: canonical rows.
                source = tuple(before.invars[0].aval.shape)
                return [int(source[-1]), *(int(d) for d in source[1:-1])], False
            return [int(shape[-1]), *(int(d) for d in shape[1:-1])], True
        if len(data) != 1 or tuple(data[0].aval.shape) != tuple(eqn.outvars[0].aval.shape):
            return None
        var = data[0]


# -- the model as the port planner sees it ------------------------------------------------


def _numpy(variable: Any) -> np.ndarray:
    return np.array(variable[...])


def _native_spec(layer: nnx.BatchNorm, name: str) -> BatchNormSpec:
    if not isinstance(layer.axis, int):
        raise CheckpointError(
            f"layer {name!r} (nnx.BatchNorm) normalises over axes {layer.axis!r}; the "
            "checkpoint describes BatchNorm with one feature axis"
        )
    return BatchNormSpec.from_native(
        "flax",
        momentum=float(layer.momentum),
        epsilon=float(layer.epsilon),
        center=bool(layer.use_bias),
        scale=bool(layer.use_scale),
        axis=int(layer.axis),
    )


class _FlaxModel(PortModel[Any]):
    """An NNX model for :mod:`unorm._core.port_plan`: its layers, their variables
    (transposed to and from the canonical layout) and their BatchNorm settings; the flow
    and flatten order from one trace on a ``sample`` shape (Flax layout), if given."""

    def __init__(self, model: Any, sample: tuple[int, ...] | None) -> None:
        self._model = model
        self._targets, self._paths = _param_layers(model)
        traced = _trace(model, self._targets, self._paths, sample) if sample else _Trace()
        if traced.order:
            # The layers in the order they run (then any never called, in graph order):
            # the graph's order sorts attributes by name, which says nothing of the model,
            # while the run's order is what a probe's first divergence is read along.
            order = traced.order + [i for i in range(len(self._targets)) if i not in traced.order]
            self._targets = [self._targets[i] for i in order]
            self._paths = [self._paths[i] for i in order]
            traced = traced.renumbered({old: new for new, old in enumerate(order)})
        self._traced = traced
        self._index = {id(m): i for i, (_, m, _) in enumerate(self._targets)}
        self.flatten_order_matters = any(last for _, last in traced.flat.values())

    def _flat(self, handle: Any) -> tuple[list[int], bool] | None:
        return self._traced.flat.get(self._index[id(handle)])

    def _channels_last_rows(self, handle: Any, flatten_from: list[int] | None) -> list[int] | None:
        """The ``flatten_from`` whose rows this Linear holds channels-last, or None."""
        if flatten_from is None or math.prod(flatten_from[1:]) == 1:
            return None
        own = self._flat(handle)
        if own is not None:
            return list(flatten_from) if own[1] else None
        name = self._targets[self._index[id(handle)]][0]
        known = self._index[id(handle)] in self._traced.dense_inputs
        why = "it reads no flattened feature map" if known else "its input is not known"
        raise CheckpointError(
            f"layer {name!r}: the checkpoint's dense reads a flattened {flatten_from} "
            f"(channels-first) feature map, but in the model {why}, so the order of its "
            "input features cannot be decided; give the model's input_shape (or a "
            "checkpoint with a probe)"
        )

    def run_probe(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return run_probe(self._model, self._targets, self._paths, x)

    def flow(self) -> list[FlowNode] | None:
        return self._traced.flow

    def layers(self) -> list[Target]:
        return self._targets

    def slots(self, handle: Any, kind: str) -> dict[str, Slot]:
        out = {
            role: Slot(tuple(int(d) for d in v[...].shape))
            for role, v in present_roles(handle, kind, _ATTRS)
        }
        if "weight" in out:
            out["weight"] = Slot(_canonical_shape(handle, kind, out["weight"].shape))
        if COUNTER in out:
            out[COUNTER] = Slot(())  # unorm's int32 counter, a scalar in the checkpoint
        return out

    def read(self, handle: Any, kind: str, flatten_from: list[int] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, variable in present_roles(handle, kind, _ATTRS):
            value = _numpy(variable)
            if role == "weight":
                rows = self._channels_last_rows(handle, flatten_from)
                value = _kernel_to_canonical(handle, kind, value, rows)
            out[role] = value
        if kind == "batchnorm" and "running_mean" in out:
            # nnx.BatchNorm counts nothing: its counter reads 0, as Keras's does.
            counter = getattr(handle, COUNTER, None)
            count = np.zeros(()) if counter is None else _numpy(counter)
            out.pop(COUNTER, None)
            out[COUNTER] = np.asarray(count, dtype=np.int64).reshape(())
        return out

    def to_native(
        self, handle: Any, kind: str, role: str, value: np.ndarray, flatten_from: list[int] | None
    ) -> Any:
        if role == "weight":
            rows = self._channels_last_rows(handle, flatten_from)
            value = _kernel_from_canonical(handle, kind, value, rows)
        target = getattr(handle, _ATTRS[role])
        return jnp.asarray(np.asarray(value), dtype=target[...].dtype)

    def assign(self, handle: Any, role: str, value: Any) -> None:
        getattr(handle, _ATTRS[role])[...] = value

    def flatten_from(self, handle: Any) -> list[int] | None:
        own = self._flat(handle)
        return None if own is None else list(own[0])

    def groups(self, handle: Any) -> int:
        return int(getattr(handle, "feature_group_count", 1))

    def ws_spec(self, handle: Any) -> ScaledWSSpec | None:
        return handle.ws if isinstance(handle, ScaledStdConv) else None

    def batchnorm_spec(self, handle: Any, name: str) -> BatchNormSpec:
        return handle.spec if isinstance(handle, BatchNorm) else _native_spec(handle, name)

    def native_batchnorm(self, handle: Any) -> bool:
        return not isinstance(handle, BatchNorm)

    def check_spec(self, handle: Any, spec: BatchNormSpec, where: str) -> None:
        if isinstance(handle, BatchNorm) and spec.update_on == "backward":
            raise CheckpointError(
                f"{where}: update_on='backward' in the checkpoint (the mxnet preset's "
                "update in backward) cannot be expressed in JAX, whose functions have no "
                "backward pass of their own; convert the source to update_on='forward'"
            )

    def set_spec(self, handle: Any, spec: BatchNormSpec | ScaledWSSpec, source: Layer) -> None:
        if isinstance(spec, ScaledWSSpec):
            handle.ws = spec
            return
        if isinstance(handle, BatchNorm):
            handle.spec = spec  # every setting is read through the spec at call time
            return
        handle.epsilon = float(spec.eps)
        if spec.momentum is not None:
            handle.momentum = 1.0 - spec.momentum  # nnx.BatchNorm weighs the old value
        plan.warn_native_gaps(spec, "flax", "nnx.BatchNorm", "unorm.flax.convert()", source)


# -- the PortBackend functions ---------------------------------------------------------------


def _warn_unknown_flatten(adapter: _FlaxModel) -> None:
    dense = [name for name, _, kind in adapter.layers() if kind == "dense"]
    if dense:
        warnings.warn(
            f"no input_shape: whether Linear layer(s) {dense} read a flattened feature map "
            "is not known, so no flatten_from is recorded (a channels-last flatten would be "
            "read in the wrong order by a channels-first framework), no probe is carried "
            "and the data flow is not recorded; give input_shape",
            stacklevel=3,
        )


def export_checkpoint(model: Any, input_shape: tuple[int, ...] | None = None) -> Checkpoint:
    """The neutral :class:`~unorm.port.Checkpoint` of the NNX ``model``, in the canonical
    channels-first layout.

    ``input_shape``: one sample's shape in Flax's channels-last layout (``(28, 28, 1)``),
    no batch axis. With it (recommended) the forward is traced once to record the data
    flow and which Linear layers read a flattened feature map (``flatten_from``), and the
    checkpoint carries a probe (random inputs and the model's eval-mode outputs) on which
    every load is verified. Without it none of these is recorded, with a ``UserWarning``
    where the model has a Linear. BatchNorm settings travel in unorm's convention: an
    ``nnx.BatchNorm`` as the ``flax`` preset with its own ``momentum`` and ``epsilon``.

    Example:
        >>> net = nnx.Sequential(nnx.Conv(1, 2, (3, 3), padding="VALID", rngs=nnx.Rngs(0)),
        ...                      lambda x: x.reshape(x.shape[0], -1),
        ...                      nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
        >>> ckpt = export_checkpoint(net, (4, 4, 1))
        >>> [(la.kind, la.attrs.get("flatten_from")) for la in ckpt.layers]
        [('conv', None), ('dense', [2, 2, 2])]
        >>> ckpt.tensor(ckpt.layers[0], "weight").shape  # Flax's (3, 3, 1, 2), transposed
        (2, 1, 3, 3)
    """
    sample = None if input_shape is None else tuple(int(d) for d in input_shape)
    adapter = _FlaxModel(model, sample)
    if sample is None:
        _warn_unknown_flatten(adapter)
        return plan.export(adapter, source="flax")
    probe = probes.make_input(_canonical_sample(sample))
    return plan.export(adapter, source="flax", probe_input=probe)


def export_model(model: Any, input_shape: tuple[int, ...]) -> Checkpoint:
    """:func:`export_checkpoint` under the signature ``unorm port`` calls for every
    framework (``input_shape``: one sample, channels-last)."""
    return export_checkpoint(model, input_shape)


def load_checkpoint(
    model: Any,
    ckpt: Checkpoint,
    mapping: Mapping[str, str] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Load ``ckpt`` into the NNX ``model`` after every check; nothing changes unless all
    of them pass.

    The model's forward is traced once on the checkpoint's probe input (or on
    ``input_shape``, one channels-last sample, for a checkpoint without a probe) to read
    its data flow, along which its layers pair with the checkpoint's whatever order
    either defines them in (else by order), and which Linear reads a flattened map in
    which order. Checked: kinds, canonical shapes, conv groups, a Linear's
    ``flatten_from``, BatchNorm centre/scale. A unorm :class:`~unorm.flax.BatchNorm`
    takes the checkpoint's BatchNorm settings (its axis, ``use_bias``, ``use_scale`` and
    ``track_running_stats`` stay the model's; ``update_on='backward'`` is refused); an
    ``nnx.BatchNorm`` takes eps and momentum and warns (``UserWarning``) where the
    source's training semantics cannot be expressed by it. With a probe the load is
    verified: an output other than the source's puts every value and setting back and
    raises :class:`~unorm.port.CheckpointError` naming the first layer whose output
    diverges. ``mapping`` (checkpoint layer name -> the model's layer path, ``"fc1"``,
    ``"norms/0"``) pairs those layers explicitly, the rest by order. Retrace your own
    ``nnx.jit`` functions after a load: settings are Python values baked into a trace.

    Example:
        >>> a = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> b = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
        >>> load_checkpoint(b, export_checkpoint(a, (3,)))
        >>> bool(np.array_equal(a.kernel[...], b.kernel[...]))
        True
    """
    probe = probes.Probe.from_tensors(ckpt.tensors, len(ckpt.layers))
    sample: tuple[int, ...] | None
    if probe is not None and probe.input.ndim >= 1:
        sample = tuple(int(d) for d in _to_flax(np.asarray(probe.input)).shape[1:])
    else:
        sample = None if input_shape is None else tuple(int(d) for d in input_shape)
    match = None if mapping is None else plan.match_by_names(mapping)
    plan.load(_FlaxModel(model, sample), ckpt, match)


def _flat_state(model: Any) -> dict[str, Any]:
    state = nnx.state(model, _STATE)
    leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    return {_name(tuple(getattr(k, "key", k) for k in path)): leaf for path, leaf in leaves}


def read_native(model: Any, path: str | os.PathLike[str]) -> Any:
    """Read a ``.msgpack`` file written by :func:`write_native` into ``model`` and return
    it. Names and shapes are checked first: a file that does not fit (or is damaged)
    raises :class:`~unorm.port.CheckpointError` and leaves ``model`` unchanged."""
    try:
        given = serialization.msgpack_restore(Path(path).read_bytes())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it: {err}") from None
    except Exception as err:  # msgpack raises many kinds for damaged files
        raise CheckpointError(f"{path}: not a readable Flax msgpack state: {err}") from None
    if not isinstance(given, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in given.items()
    ):
        raise CheckpointError(f"{path}: not a flat map of arrays by variable path")
    state = nnx.state(model, _STATE)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = [_name(tuple(getattr(k, "key", k) for k in p)) for p, _ in leaves]
    own = {n: tuple(np.shape(leaf)) for n, (_, leaf) in zip(names, leaves, strict=True)}
    plan.check_state_fits(path, "names", {k: tuple(v.shape) for k, v in given.items()}, own)
    values = [
        jnp.asarray(given[n], dtype=jnp.asarray(leaf).dtype)
        for n, (_, leaf) in zip(names, leaves, strict=True)
    ]
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, values))
    nnx.update(model, state)
    return model


def write_native(model: Any, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s variables (not its RNG state) as one flat msgpack map, path ->
    array, at ``path`` atomically (temporary file, then rename)."""
    flat = {name: np.asarray(value) for name, value in _flat_state(model).items()}
    data = serialization.msgpack_serialize(flat)
    with plan.atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)

"""Export a PyTorch model's state to the neutral checkpoint and load one into a model.

Layers with parameters (Conv*d, ConvTranspose*d, Linear, unorm's and PyTorch's BatchNorm)
are matched along the model's data flow, read from a torch.fx trace of its forward or,
where fx cannot trace it (``transformers``' models branch on values), by running the
forward once on the probe's input with every torch call observed; by order where neither
works. Pooling, activations, Flatten and Dropout carry nothing. PyTorch's
layout is the canonical one, so tensors move as they are; a Linear after a Flatten of a
``(C, H, W)`` map records ``flatten_from`` so channels-last frameworks can permute it.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .._core import port_plan as plan
from .._core import probe as probes
from .._core.flow import FlowNode, complete
from .._core.port_plan import ROLES, PortModel, Slot, kind_of, present_roles
from ..port import Checkpoint, CheckpointError, Layer
from ..spec import BatchNormSpec, ScaledWSSpec
from . import internals
from .batchnorm import BatchNorm
from .ws import _ScaledStd

__all__ = ["export_checkpoint", "export_model", "load_checkpoint", "read_native", "write_native"]

# Checkpoint role -> attribute of a PyTorch module: a BatchNorm's gamma is its weight.
_ATTRS = {role: role for roles in ROLES.values() for role in roles} | {
    "gamma": "weight",
    "beta": "bias",
}


# The modules the checkpoint describes (transposed convolutions first: they are convolutions
# too).
_KINDS: list[tuple[str, type | tuple[type, ...]]] = [
    ("conv_transpose", internals.ConvTransposeBase),
    ("conv", internals.ConvBase),
    ("dense", nn.Linear),
    ("batchnorm", (BatchNorm, internals.NativeBatchNorm)),
]


def _param_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    out = []
    for name, module in model.named_modules():
        kind = kind_of(module, _KINDS)
        if kind is not None:
            out.append((name or type(module).__name__, module, kind))
    return out


def _native_spec(module: nn.Module) -> BatchNormSpec:
    assert isinstance(module, internals.NativeBatchNorm)
    # nn.BatchNorm's own argument names are the ones from_native reads for "torch".
    names = ("eps", "momentum", "affine", "track_running_stats")
    native = {n: getattr(module, n) for n in names}
    native["bias"] = module.bias is not None or not module.affine  # bias=False: no shift
    return BatchNormSpec.from_native("torch", **native)


def _flatten_shapes(model: nn.Module, example: torch.Tensor | None) -> dict[int, list[int]]:
    """Input shape (without batch) of every Linear (by ``id``) fed by a Flatten of a
    feature map."""
    if example is None:
        return {}
    shapes: dict[int, list[int]] = {}
    pending: list[list[int]] = []
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Flatten):
            hooks.append(
                module.register_forward_hook(lambda m, i, o: pending.append(list(i[0].shape[1:])))
            )
        elif isinstance(module, nn.Linear):

            def grab(m: nn.Module, i: Any, o: Any) -> None:
                if pending and len(pending[-1]) > 1:
                    shapes[id(m)] = pending[-1]
                pending.clear()

            hooks.append(module.register_forward_hook(grab))
    try:
        with _eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, then every module's own training flag back
    (``model.train(flag)`` would also flip a BatchNorm the user keeps in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _first_tensor(output: Any) -> torch.Tensor:
    """A model's output tensor: the tensor itself, or the first tensor of a tuple, list
    or mapping (``transformers`` returns a ``ModelOutput`` whose first set field is the
    logits)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    if isinstance(values, (tuple, list)) or isinstance(output, dict):
        for value in values:
            if isinstance(value, torch.Tensor):
                return value
    raise CheckpointError(f"the model's output is a {type(output).__name__}, not a tensor")


# Functions and methods of a traced forward that the flow keeps (unorm._core.flow).
_MERGES: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    torch.cat: "concat",
    torch.concat: "concat",
    "add": "add",
    "add_": "add",
    "mul": "mul",
    "mul_": "mul",
}


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with the layers the checkpoint describes as leaves."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, module_qualified_name)


def _nodes_in(args: Any) -> Iterator[fx.Node]:
    """Every fx node in a call's arguments, nested tuples, lists and dicts included."""
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, (tuple, list)):
        for a in args:
            yield from _nodes_in(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _nodes_in(a)


def _unique(values: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(values))


def flow_of(model: nn.Module, targets: list[tuple[str, nn.Module, str]]) -> list[FlowNode] | None:
    """``model``'s data flow over ``targets`` (:mod:`unorm._core.flow`), read from a
    torch.fx trace of its forward (nothing runs); None where it does not trace, takes
    several inputs, calls a layer other than once or combines tensors in a way the flow
    has no operation for. Shape arithmetic (``x.size(0)``) and ``torch.flatten`` are
    contracted like activations."""
    index_of = {name: i for i, (name, _, _) in enumerate(targets)}
    try:
        graph = _LeafTracer({id(m) for _, m, _ in targets}).trace(model)
    except Exception:  # control flow on values, unsupported ops: fall back to order
        return None
    nodes: list[FlowNode] = []
    where: dict[fx.Node, int] = {}
    for n in graph.nodes:
        ins = [where[a] for a in _nodes_in((n.args, n.kwargs)) if a in where]
        if n.op == "placeholder":
            if nodes:
                return None
            nodes.append(FlowNode("input"))
            where[n] = 0
        elif n.op == "call_module" and n.target in index_of:
            if len(_unique(ins)) != 1:
                return None
            nodes.append(FlowNode("layer", (ins[0],), index_of[str(n.target)]))
            where[n] = len(nodes) - 1
        elif n.op in ("call_module", "call_function", "call_method"):
            merge = _MERGES.get(n.target) if n.op != "call_module" else None
            if merge is not None and len(_unique(ins)) >= 2:  # x * sigmoid(x): an activation
                nodes.append(FlowNode(merge, tuple(ins)))
                where[n] = len(nodes) - 1
            elif len(_unique(ins)) == 1:
                where[n] = ins[0]  # an activation, pooling, reshape, flatten: contracted
            elif ins:
                return None  # tensors combined by an operation the flow does not know
    return complete(nodes, len(targets))


# The same merges as functions and Tensor methods, as a TorchFunctionMode sees them.
_RUN_MERGES: dict[Any, str] = {
    torch.add: "add",
    torch.Tensor.add: "add",
    torch.Tensor.add_: "add",
    torch.Tensor.__add__: "add",
    torch.Tensor.__radd__: "add",
    torch.Tensor.__iadd__: "add",
    torch.mul: "mul",
    torch.Tensor.mul: "mul",
    torch.Tensor.mul_: "mul",
    torch.Tensor.__mul__: "mul",
    torch.Tensor.__rmul__: "mul",
    torch.Tensor.__imul__: "mul",
    torch.cat: "concat",
    torch.concat: "concat",
    torch.concatenate: "concat",
}


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a call's arguments or results, nested containers included."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


class _FlowRecorder(torch.overrides.TorchFunctionMode):
    """Records a forward's data flow as it runs: every torch function and Tensor method
    is seen here (the layers' own insides are skipped), tensors are followed by identity
    (each one kept alive, so an id is never reused) and layer calls come from hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[FlowNode] = [FlowNode("input")]
        self.where: dict[int, tuple[torch.Tensor, int]] = {}
        self.inside = 0  # > 0 while a recorded layer runs
        self.unknown = False  # tensors combined by an operation the flow has no name for

    def node_of(self, t: torch.Tensor) -> int | None:
        held = self.where.get(id(t))
        return held[1] if held is not None and held[0] is t else None

    def follow(self, value: Any, node: int) -> None:
        for t in _tensors_in(value):
            self.where[id(t)] = (t, node)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.inside:
            return out
        ins = _unique(n for t in _tensors_in((args, kwargs)) if (n := self.node_of(t)) is not None)
        merge = _RUN_MERGES.get(func)
        if merge is not None and len(ins) >= 2:
            self.nodes.append(FlowNode(merge, tuple(ins)))
            self.follow(out, len(self.nodes) - 1)
        elif len(ins) == 1:
            self.follow(out, ins[0])  # an activation, pooling, reshape: contracted
        elif len(ins) > 1:
            self.unknown = True
        return out


Probed = tuple[np.ndarray, dict[str, np.ndarray]]


def _flow_by_running(
    model: nn.Module, targets: list[tuple[str, nn.Module, str]], x: np.ndarray
) -> tuple[list[FlowNode] | None, Probed | None]:
    """``model``'s data flow over ``targets`` read by running its forward once on ``x``
    (eval mode, no gradients, state untouched), for models torch.fx cannot trace (control
    flow on values, as ``transformers``' models have); None where a layer's input does
    not come from the model's input or tensors are combined in a way the flow does not
    name. The flow is one forward's: a branch a value would switch is seen as taken.

    The same pass gives what :func:`run_probe` would on ``x`` (the output and every
    layer's first output; None where the model does not run), so an export whose probe
    input is ``x`` runs a large model once, not twice."""
    recorder = _FlowRecorder()
    fail = False
    seen: dict[str, np.ndarray] = {}
    names = {id(module): name for name, module, _ in targets}

    def before(index: int) -> Any:
        def pre(module: nn.Module, args: Any) -> None:
            nonlocal fail
            if recorder.inside:
                return
            ins = _unique(n for t in _tensors_in(args) if (n := recorder.node_of(t)) is not None)
            if len(ins) != 1:
                fail = True
            else:
                recorder.nodes.append(FlowNode("layer", (ins[0],), index))
            recorder.inside += 1

        return pre

    def after(module: nn.Module, args: Any, out: Any) -> None:
        recorder.inside -= 1
        name = names[id(module)]
        if name not in seen and isinstance(out, torch.Tensor):
            seen[name] = out.detach().cpu().double().numpy()
        if not recorder.inside and not fail:
            recorder.follow(out, len(recorder.nodes) - 1)

    hooks = []
    for index, (_, module, _) in enumerate(targets):
        hooks.append(module.register_forward_pre_hook(before(index)))
        hooks.append(module.register_forward_hook(after))
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    try:
        inp = torch.from_numpy(np.asarray(x)).to(device=device, dtype=dtype)
        recorder.follow(inp, 0)
        with _eval_mode(model), torch.no_grad(), recorder:
            output = _first_tensor(model(inp))
    except Exception:  # a model that does not run on the example: matched by order
        return None, None
    finally:
        for hook in hooks:
            hook.remove()
    probed = (output.detach().cpu().double().numpy(), seen)
    if fail or recorder.unknown:
        return None, probed
    return complete(recorder.nodes, len(targets)), probed


# What flattens a feature map in a forward: torch.flatten, Tensor.flatten/view/reshape.
_FLATTENS: tuple[Any, ...] = (torch.flatten, "flatten", "view", "reshape")


def _traced_flatten_shapes(model: nn.Module, example: torch.Tensor | None) -> dict[int, list[int]]:
    """:func:`_flatten_shapes` for a flatten written in ``forward`` (``torch.flatten(x,
    1)``, ``x.view(x.size(0), -1)``): from a torch.fx trace whose shapes are propagated
    with ``example``, each Linear whose input is, through parameter-free one-input ops, a
    flatten of a map of rank >= 3 reads ``[C, *spatial]``; empty where the model does not
    trace."""
    if example is None:
        return {}
    from torch.fx.passes.shape_prop import ShapeProp

    targets = _param_layers(model)
    try:
        graph = _LeafTracer({id(m) for _, m, _ in targets}).trace(model)
        traced = fx.GraphModule(model, graph)
        with _eval_mode(traced), torch.no_grad():
            ShapeProp(traced).propagate(example)
    except Exception:  # does not trace, or its shapes do not propagate: hooks only
        return {}
    modules = dict(model.named_modules())
    out: dict[int, list[int]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.Linear):
            continue
        source = node.args[0] if node.args else None
        while isinstance(source, fx.Node):
            meta = source.meta.get("tensor_meta")
            feeds = [a for a in _nodes_in((source.args, source.kwargs))]
            if source.op in ("call_function", "call_method") and source.target in _FLATTENS:
                shape = feeds[0].meta.get("tensor_meta") if feeds else None
                if shape is not None and len(shape.shape) >= 3 and meta is not None:
                    out[id(modules[str(node.target)])] = [int(d) for d in shape.shape[1:]]
                break
            if source.op == "call_module" and str(source.target) in {n for n, _, _ in targets}:
                break  # a layer with parameters: no flatten between them
            if len(feeds) != 1:
                break
            source = feeds[0]
    return out


def run_probe(
    model: nn.Module, targets: list[tuple[str, nn.Module, str]], x: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``model``'s eval-mode output on ``x`` (canonical, as PyTorch's layout is) and the
    output of every layer in ``targets`` (its first call), as float64 NumPy; no state
    changes (running statistics stay, training flags come back)."""
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    seen: dict[str, np.ndarray] = {}

    def keeper(name: str) -> Any:
        def keep(module: nn.Module, args: Any, out: Any) -> None:
            if name not in seen and isinstance(out, torch.Tensor):
                seen[name] = out.detach().cpu().double().numpy()

        return keep

    hooks = [m.register_forward_hook(keeper(name)) for name, m, _ in targets]
    try:
        with _eval_mode(model), torch.no_grad():
            output = _first_tensor(model(torch.from_numpy(x).to(device=device, dtype=dtype)))
    finally:
        for hook in hooks:
            hook.remove()
    return output.detach().cpu().double().numpy(), seen


def export_checkpoint(model: nn.Module, example: torch.Tensor | None = None) -> Checkpoint:
    """The neutral :class:`~unorm.port.Checkpoint` of ``model``'s state.

    ``example``: an input batch, run once in eval mode (running statistics untouched) to
    find which Linear layers follow a Flatten of a feature map (needed where the model has
    one and the checkpoint will be loaded into a channels-last framework); with it the
    checkpoint also carries a probe (:mod:`unorm._core.probe`: random inputs of the
    example's sample shape and the model's outputs on them), on which every load is
    verified. Without it the checkpoint has no probe and loads unverified, with a warning.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        >>> ckpt = export_checkpoint(net, torch.zeros(1, 1, 4, 4))
        >>> [(la.kind, la.attrs.get("flatten_from")) for la in ckpt.layers]
        [('conv', None), ('dense', [2, 2, 2])]
    """
    flat = _flatten_shapes(model, example) | _traced_flatten_shapes(model, example)
    probe = None if example is None else probes.make_input(tuple(example.shape[1:]))
    adapter = _TorchModel(model, flat, probe)
    return plan.export(adapter, source="torch", probe_input=probe)


class _TorchModel(PortModel[nn.Module]):
    """A PyTorch model for :mod:`unorm._core.port_plan`. PyTorch's layouts and flatten
    order are the canonical ones, so tensors move as they are (cast to each one's dtype)."""

    def __init__(
        self, model: nn.Module, flat: dict[int, list[int]], example: np.ndarray | None = None
    ) -> None:
        self._model = model
        self._targets = _param_layers(model)
        self._flat = flat  # id of a Linear -> the map it reads flattened
        self._example = example  # an input to read the flow by running, where fx fails
        self._probed: Probed | None = None  # what that run saw, for run_probe(example)

    def run_probe(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        probed, self._probed = self._probed, None  # one use; cleared by every write
        if probed is not None and self._example is not None and np.array_equal(x, self._example):
            return probed
        return run_probe(self._model, self._targets, x)

    def flow(self) -> list[FlowNode] | None:
        traced = flow_of(self._model, self._targets)
        if traced is not None or self._example is None:
            return traced
        flow, self._probed = _flow_by_running(self._model, self._targets, self._example)
        return flow

    def layers(self) -> list[tuple[str, nn.Module, str]]:
        return self._targets

    def slots(self, handle: nn.Module, kind: str) -> dict[str, Slot]:
        return {role: Slot(tuple(t.shape)) for role, t in present_roles(handle, kind, _ATTRS)}

    def read(
        self, handle: nn.Module, kind: str, flatten_from: list[int] | None
    ) -> dict[str, np.ndarray]:
        return {role: _numpy(t) for role, t in present_roles(handle, kind, _ATTRS)}

    def to_native(
        self,
        handle: nn.Module,
        kind: str,
        role: str,
        value: np.ndarray,
        flatten_from: list[int] | None,
    ) -> torch.Tensor:
        dst = getattr(handle, _ATTRS[role])
        return torch.from_numpy(np.array(value, order="C")).to(dst.dtype)

    def assign(self, handle: nn.Module, role: str, value: torch.Tensor) -> None:
        self._probed = None  # the model changes: what a run saw before is stale
        with torch.no_grad():
            getattr(handle, _ATTRS[role]).copy_(value)

    def flatten_from(self, handle: nn.Module) -> list[int] | None:
        return self._flat.get(id(handle))

    def groups(self, handle: nn.Module) -> int:
        return int(handle.groups)  # type: ignore[arg-type]

    def ws_spec(self, handle: nn.Module) -> ScaledWSSpec | None:
        return handle.ws if isinstance(handle, _ScaledStd) else None

    def batchnorm_spec(self, handle: nn.Module, name: str) -> BatchNormSpec:
        return handle.spec if isinstance(handle, BatchNorm) else _native_spec(handle)

    def native_batchnorm(self, handle: nn.Module) -> bool:
        return not isinstance(handle, BatchNorm)

    def set_spec(
        self, handle: nn.Module, spec: BatchNormSpec | ScaledWSSpec, source: Layer
    ) -> None:
        self._probed = None
        if isinstance(spec, ScaledWSSpec):
            assert isinstance(handle, _ScaledStd)
            handle.ws = spec
            return
        if isinstance(handle, BatchNorm):
            handle.spec = spec
            return
        assert isinstance(handle, internals.NativeBatchNorm)
        handle.eps = spec.eps
        handle.momentum = spec.momentum
        plan.warn_native_gaps(spec, "torch", "nn.BatchNorm", "unorm.torch.convert()", source)


def load_checkpoint(
    model: nn.Module, ckpt: Checkpoint, mapping: Mapping[str, str] | None = None
) -> None:
    """Load ``ckpt`` into ``model`` (layers matched by order, everything checked first).

    Nothing is changed unless every layer matches: kinds, shapes, conv groups and a
    Linear's ``flatten_from`` (a valid list of sizes whose product is its input size). A
    unorm :class:`BatchNorm` takes the checkpoint's BatchNorm settings (a ported Keras or
    MXNet layer keeps behaving as it did at home, e.g. its eps and momentum); its feature
    axis, ``affine`` and ``track_running_stats`` stay the model's. A native
    ``nn.BatchNorm*d`` takes eps and momentum and warns where the source's training
    semantics (running-variance estimator, non-finite guard, one value per channel,
    update in backward) cannot be expressed by it. A checkpoint with a probe (exported
    with an example input) is verified: ``model`` runs on the probe's input in eval mode,
    and outputs other than the source's put every value and setting back and raise
    :class:`~unorm.port.CheckpointError` naming the first layer whose output diverges.
    Layers pair along the data flow where both sides record one, else by order;
    ``mapping`` (checkpoint layer name -> ``model``'s module name) pairs the layers it
    names explicitly, the rest by order.

    Example:
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> load_checkpoint(b, export_checkpoint(a, torch.zeros(1, 3)))
        >>> bool(torch.equal(a.weight, b.weight))
        True
    """
    match = None if mapping is None else plan.match_by_names(mapping)
    probe = probes.Probe.from_tensors(ckpt.tensors, len(ckpt.layers))
    plan.load(_TorchModel(model, {}, None if probe is None else probe.input), ckpt, match)


def read_native(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a PyTorch ``state_dict`` file (``torch.save(model.state_dict(), path)``) into
    ``model`` and return it. Keys and shapes are checked first: a file that does not fit
    raises :class:`~unorm.port.CheckpointError` and leaves ``model`` unchanged.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for damaged files
        raise CheckpointError(f"{path}: not a readable PyTorch state_dict: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    plan.check_state_fits(
        path, "keys", {key: tuple(value.shape) for key, value in state.items()}, own
    )
    model.load_state_dict(state)
    return model


def write_native(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save ``model.state_dict()`` to ``path`` atomically (temporary file, then rename)."""
    with plan.atomic_file(path) as tmp:
        torch.save(model.state_dict(), tmp)


def export_model(model: nn.Module, input_shape: tuple[int, ...]) -> Checkpoint:
    """:func:`export_checkpoint` with a zero example input of ``input_shape`` (no batch
    axis), as ``unorm port`` calls it for the seed networks."""
    example = torch.zeros((1, *input_shape), dtype=next(model.parameters()).dtype)
    return export_checkpoint(model, example)

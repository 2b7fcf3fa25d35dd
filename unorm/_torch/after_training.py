"""BatchNorm after training for PyTorch (``SPEC.md`` section 8): ``fold``, ``recalibrate``
and ``freeze``.

The decisions and messages are the core's (:mod:`unorm._core.after_training`); this module
reads a model's data flow with ``torch.fx`` symbolic tracing, moves the weights, and runs
the recalibration pass.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch import Tensor, fx, nn

from .._core import after_training as core
from .._core.layer_kinds import CHANNELS_FIRST_LAYOUTS
from . import internals
from .batchnorm import BatchNorm

__all__ = ["FoldEntry", "FoldError", "FoldWarning", "fold", "freeze", "recalibrate"]

FoldEntry = core.FoldEntry
FoldError = core.FoldError
FoldWarning = core.FoldWarning


# -- what counts as a BatchNorm, and what it holds -----------------------------------------


def is_frozen_native(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen BatchNorm in the style of torchvision's
    ``FrozenBatchNorm2d``: buffers ``weight``, ``bias``, ``running_mean`` and
    ``running_var``, no parameters (torchvision is matched by its shape, not imported)."""
    names = {"weight", "bias", "running_mean", "running_var"}
    return (
        type(module).__name__.startswith("FrozenBatchNorm")
        and names <= set(module._buffers)
        and not module._parameters
    )


def _is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, (BatchNorm, internals.NativeBatchNorm)) or is_frozen_native(m)


@dataclass(frozen=True)
class _BN:
    """A BatchNorm's inference parameters and configuration, whichever class it is."""

    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor | None
    var: Tensor | None
    eps: float
    axis: int
    rank: int | None  # the input rank the layer accepts, None if several
    num_features: int
    tracks: bool


_NATIVE_RANKS = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}


def _bn_view(m: nn.Module) -> _BN | None:
    if isinstance(m, BatchNorm):
        return _BN(
            m.weight, m.bias, m.running_mean, m.running_var, m.spec.eps, m.spec.axis,
            m.num_dims, m.num_features, m.track_running_stats,
        )  # fmt: skip
    if isinstance(m, internals.NativeBatchNorm):
        rank = next((r for cls, r in _NATIVE_RANKS.items() if isinstance(m, cls)), None)
        return _BN(
            m.weight, m.bias, m.running_mean, m.running_var, float(m.eps), 1, rank,
            m.num_features, m.track_running_stats,
        )  # fmt: skip
    if is_frozen_native(m):
        buffers = m._buffers
        # Before pytorch/vision#2169 FrozenBatchNorm2d had no eps (0): its absence is 0.
        rank = 4 if type(m).__name__.endswith("2d") else None
        w = buffers["weight"]
        assert w is not None
        return _BN(
            w, buffers["bias"], buffers["running_mean"], buffers["running_var"],
            float(getattr(m, "eps", 0.0)), 1, rank, int(w.shape[0]), True,
        )  # fmt: skip
    return None


def _producer_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "dense"
    if isinstance(m, internals.ConvTransposeBase):
        return "conv_transpose"
    if isinstance(m, internals.ConvBase):
        # A depthwise convolution's (I*M, 1, *k) weight has its output channels on axis 0
        # as any convolution's: PyTorch's layout of it is the grouped one.
        return "conv"
    return None


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    assert isinstance(m, internals.ConvBase)
    return m.out_channels


# -- fold ------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, with every BatchNorm kind a leaf (unorm's layer checks its
    input with Python control flow, which symbolic tracing cannot follow)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A type test only: reading a parameter here would record it in the graph.
        return _is_batch_norm(m) or super().is_leaf_module(m, module_qualified_name)


def _describe(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "placeholder":
        return "the model's input"
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} {node.target!r}"
    if node.op == "call_function":
        return f"the result of {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"the result of .{node.target}()"
    return f"{node.op} {node.target!r}"


def _uses(gm: fx.GraphModule, name: str) -> int:
    """How often layer ``name`` is used: its calls, reads of its tensors, and other layers
    holding one of its parameters (tied weights)."""
    calls = sum(
        1
        for n in gm.graph.nodes
        if (n.op == "call_module" and n.target == name)
        or (n.op == "get_attr" and str(n.target).startswith(name + "."))
    )
    own = {id(p) for p in gm.get_submodule(name).parameters(recurse=False)}
    shared = 0
    for other, module in gm.named_modules():
        if other != name and any(id(p) in own for p in module.parameters(recurse=False)):
            shared += 1
    return calls + shared


def _shapes(gm: fx.GraphModule, example: Any) -> dict[str, tuple[int, ...]]:
    """Each node's output shape on ``example`` (a tensor, or a tuple of the inputs)."""
    args = example if isinstance(example, tuple) else (example,)
    shapes: dict[str, tuple[int, ...]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        _Recorder(gm).run(*args)
    return shapes


def _candidate(
    gm: fx.GraphModule, node: fx.Node, shapes: Mapping[str, tuple[int, ...]]
) -> core.FoldCandidate:
    modules = dict(gm.named_modules())
    bn_name = str(node.target)
    bn = _bn_view(modules[bn_name])
    assert bn is not None
    source = node.args[0] if node.args else None
    base = core.FoldCandidate(
        bn_name,
        tracks_running_stats=bn.tracks,
        bn_axis=bn.axis,
        num_features=bn.num_features,
    )
    if not isinstance(source, fx.Node):
        return dataclasses.replace(base, source="not a tensor of the model")
    kind = _producer_kind(modules[str(source.target)]) if source.op == "call_module" else None
    if kind is None:
        return dataclasses.replace(base, source=_describe(source, modules))
    name = str(source.target)
    producer = modules[name]
    rank = len(shapes[source.name]) if source.name in shapes else bn.rank
    if rank is None and kind != "dense":
        # A convolution's weight fixes its spatial rank; its input is taken as batched
        # (PyTorch also takes an unbatched one: an example input shows which).
        assert isinstance(producer, internals.ConvBase)
        rank = producer.weight.dim()
    return dataclasses.replace(
        base,
        producer=name,
        producer_kind=kind,
        other_users=tuple(_describe(u, modules) for u in source.users if u is not node),
        producer_uses=_uses(gm, name),
        channel_axis=-1 if kind == "dense" else 1,
        rank=rank,
        out_channels=_out_channels(producer),
    )


@torch.no_grad()
def _fold_into(producer: nn.Module, kind: str, bn: _BN) -> None:
    """``W' = W * s`` on the output-channel axes, ``b' = (b - mean) * s + beta``, computed in
    float64 and stored in the producer's dtype (``SPEC.md`` section 8)."""
    weight, old = producer.weight, producer.bias
    assert isinstance(weight, Tensor) and (old is None or isinstance(old, Tensor))
    assert bn.mean is not None and bn.var is not None
    groups = int(getattr(producer, "groups", 1))
    plan = core.fold_plan(kind, CHANNELS_FIRST_LAYOUTS[kind], tuple(weight.shape), groups)
    shape = plan.view or tuple(weight.shape)
    var = bn.var.detach().to(torch.float64)
    mean = bn.mean.detach().to(torch.float64)
    gamma = torch.ones_like(var) if bn.weight is None else bn.weight.detach().to(torch.float64)
    beta = torch.zeros_like(var) if bn.bias is None else bn.bias.detach().to(torch.float64)
    s = gamma / torch.sqrt(var + bn.eps)
    # Channel o is the row-major index over the sizes of plan.axes (sorted, as unit_plan
    # gives them): (group, channel in group) for a grouped transposed convolution, whose
    # axis 1 alone has O/g entries (fuse_conv_bn_eval fails there, pytorch/pytorch#180995).
    broadcast = [shape[a] if a in plan.axes else 1 for a in range(len(shape))]
    w64 = weight.detach().to(torch.float64).reshape(shape) * s.reshape(broadcast)
    weight.copy_(w64.reshape(weight.shape).to(weight.dtype))
    b64 = torch.zeros_like(var) if old is None else old.detach().to(torch.float64)
    new_bias = ((b64 - mean) * s + beta).to(weight.dtype)
    if old is None:
        producer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        old.copy_(new_bias.to(old.dtype))


def fold(model: nn.Module, strict: bool = False, example: Any = None) -> fx.GraphModule:
    """A copy of ``model`` with every BatchNorm that directly follows a convolution, a
    transposed convolution or a ``nn.Linear`` folded into that layer (``SPEC.md`` section 8).

    Works for ``nn.Conv1d/2d/3d`` (grouped and depthwise too), ``nn.ConvTranspose1d/2d/3d``
    (grouped too) and ``nn.Linear``, followed by unorm's :class:`BatchNorm` in every preset,
    ``nn.BatchNorm1d/2d/3d`` or a torchvision-style ``FrozenBatchNorm2d``. The new weight and
    bias are computed in float64 and stored in the layer's dtype; the result computes the
    unfolded model's eval-mode output and is returned in eval mode as a
    ``torch.fx.GraphModule``. ``model`` itself is untouched.

    A BatchNorm that cannot be folded exactly (its input feeds another layer too, is no
    such layer's output, or meets it on another axis; ``track_running_stats=False``) stays
    in place and is reported in a :class:`FoldWarning`; ``strict=True`` raises
    :class:`FoldError` instead. The returned module's ``fold_report`` lists every
    BatchNorm as a :class:`FoldEntry`.

    Args:
        model: the trained model; ``torch.fx`` must be able to trace it (else ``ValueError``
            naming what failed).
        strict: raise instead of leaving a BatchNorm in place (default False).
        example: an input (or a tuple of inputs) that shows the ranks where the model does
            not (a ``nn.Linear`` before a ``nn.BatchNorm1d``, which takes rank 2 and 3).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> folded = fold(net)
        >>> [type(m).__name__ for m in folded.children()]
        ['Conv2d', 'ReLU']
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(folded(x), net(x), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[misc]
            raise ValueError(
                f"fold needs initialised layers: {name or 'model'!r} is a lazy module that has "
                "not run; call the model once first"
            )
    work = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(work)
    except Exception as err:  # torch.fx raises many types; one message says what to do
        raise ValueError(
            f"fold needs a model torch.fx can trace symbolically; tracing "
            f"{type(model).__name__} failed: {type(err).__name__}: {err}"
        ) from err
    gm = fx.GraphModule(work, graph, class_name=type(model).__name__ + "Folded")
    shapes = _shapes(gm, example) if example is not None else {}
    modules = dict(gm.named_modules())
    entries: list[core.FoldEntry] = []
    plans: list[tuple[fx.Node, core.FoldCandidate]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_batch_norm(modules[str(node.target)]):
            continue
        c = _candidate(gm, node, shapes)
        reason = core.fold_refusal(c)
        entries.append(core.FoldEntry(c.bn, c.producer if reason is None else None, reason))
        if reason is None:
            plans.append((node, c))
    message = core.finish_report(entries, strict)
    for node, c in plans:
        assert c.producer is not None and c.producer_kind is not None
        view = _bn_view(modules[c.bn])
        assert view is not None
        _fold_into(modules[c.producer], c.producer_kind, view)
        source = node.args[0]
        assert isinstance(source, fx.Node)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.fold_report = tuple(entries)  # type: ignore[assignment]
    if message is not None:
        warnings.warn(message, FoldWarning, stacklevel=2)
    return gm.eval()


# -- freeze ----------------------------------------------------------------------------


def freeze(model: nn.Module, trainable: bool = False, *, convert_native: bool = True) -> nn.Module:
    """Freeze every BatchNorm of ``model`` (``SPEC.md`` section 8, *Frozen mode*): each
    normalises with its running statistics in training and in eval mode and never updates
    them; ``weight`` and ``bias`` keep learning with ``trainable=True`` and are fixed
    (``requires_grad=False``) by default, as torchvision's ``FrozenBatchNorm2d``.

    Native ``nn.BatchNorm*d`` layers are first converted to unorm's :class:`BatchNorm`
    (``preset="torch"``, :func:`~unorm.torch.convert`) unless ``convert_native=False``, in
    which case they are left as they are. Works in place and returns the model (a new
    object when ``model`` itself is a native BatchNorm). A BatchNorm with
    ``track_running_stats=False`` is a ``ValueError``, before any layer changes.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> net = freeze(net).train()
        >>> net[1].frozen, net[1].training, net[1].weight.requires_grad
        (True, False, False)
    """
    from .convert import convert

    if not isinstance(trainable, bool):
        raise ValueError(f"trainable must be True or False, got {trainable!r}")
    for name, m in model.named_modules():
        native = convert_native and isinstance(m, internals.NativeBatchNorm)
        if (isinstance(m, BatchNorm) or native) and not m.track_running_stats:
            raise ValueError(core.freeze_needs_running_stats(name or type(m).__name__))
    if convert_native:
        model = convert(model, preset="torch")
    for m in model.modules():
        if isinstance(m, BatchNorm):
            m.frozen = True
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(trainable)
    return model


# -- recalibrate -----------------------------------------------------------------------


class _Accumulator:
    """Per-feature ``(N, mean, M2)`` of one BatchNorm's input over the batches seen, in
    float64, merged batch by batch with Chan's pairwise formula (exact, as the k-way merge
    of ``SPEC.md`` section 3)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.count = 0
        self.batches = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.last_finite: Tensor | None = None

    def add(self, x: Tensor) -> None:
        ax = self.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != ax]
        n = x.numel() // x.shape[ax] if x.shape[ax] else 0
        if n == 0:
            self.last_finite = None
            return
        # In float32 at least (SPEC.md section 2, *Numerics*), without a float64 copy of the
        # input (it made recalibrate 2.7x the training passes on CPU); the batch's
        # statistics are merged in float64.
        work = x.detach()
        if work.dtype in (torch.float16, torch.bfloat16):
            work = work.float()
        var, mean = torch.var_mean(work, dim=dims, correction=0)
        self.add_moments(n, mean.double(), var.double() * n)

    def add_moments(self, n: int, mean: Tensor, m2: Tensor) -> None:
        """Merge a batch's ``n`` values per feature with their float64 ``mean`` and ``m2``."""
        self.last_finite = torch.isfinite(mean).all() & torch.isfinite(m2).all()
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean, m2
        else:
            self.mean, self.m2 = core.merge_moments(self.count, self.mean, self.m2, n, mean, m2)
        self.count += n
        self.batches += 1


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise ValueError(
            "batches must yield tensors, tuples or lists of inputs, or mappings of keyword "
            f"inputs, got {type(batch).__name__}"
        )


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    progress: bool | IO[str] = False,
    process_group: Any = None,
) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact statistics of its input over
    all of ``batches`` (``SPEC.md`` section 8, *Recalibrate*; "precise BN").

    Each batch runs through ``model`` in training mode without gradients; every BatchNorm
    normalises with its batch statistics as in training, and its input's per-channel
    count, mean and M2 (float64) are merged exactly over the batches, so an uneven last
    batch weighs by its count. Then ``running_mean`` is the merged mean, ``running_var``
    ``M2/(N-1)`` (``M2/N`` for a layer whose ``running_var="biased"``, as the ``keras`` and
    ``mxnet`` presets) and ``num_batches_tracked`` the number of batches. Works for unorm's
    :class:`BatchNorm` and ``nn.BatchNorm*d``; frozen layers keep their statistics. Each
    module's train/eval mode and every other tensor are as before.

    Args:
        model: the model, changed in place and returned.
        batches: an iterable of inputs: a tensor, a tuple or list (positional inputs) or a
            mapping (keyword inputs) per batch, e.g. a ``DataLoader`` of inputs only.
        progress: draw a progress bar on ``sys.stderr`` (True) or on the given stream.
        process_group: under an initialised ``torch.distributed`` with more than one rank,
            the ranks whose statistics are merged (default: the whole world). Each rank
            passes its own share of the data (uneven shares, none at all on some ranks) and
            every rank ends with the statistics of all of it, as one process seeing every
            batch; every rank must call. A model holding ``SyncBatchNorm`` layers
            synchronises every batch, so there every rank must pass as many batches.

    Raises ``ValueError``, leaving the model unchanged, for a model without such a
    BatchNorm, no batches, a batch giving non-finite statistics, a BatchNorm that saw no
    values, or what the training forward pass itself refuses.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> data = [torch.randn(8, 3), torch.randn(5, 3)]
        >>> _ = recalibrate(net, data)
        >>> h = net[0](torch.cat(data)).detach()
        >>> torch.allclose(net[1].running_mean, h.mean(0), atol=1e-6)
        True
    """
    targets: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        native = isinstance(m, internals.NativeBatchNorm)
        if ((isinstance(m, BatchNorm) and not m.frozen) or native) and m.track_running_stats:
            targets[name] = m
    if not targets:
        raise ValueError(core.NO_BATCHNORM)
    modes = {m: m.training for m in model.modules()}
    saved = {
        name: [t.detach().clone() for t in _state(m)]
        for name, m in targets.items()  # restored on any failure
    }
    acc = {
        name: _Accumulator(m.spec.axis if isinstance(m, BatchNorm) else 1)
        for name, m in targets.items()
    }

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                acc[name].add(args[0])

        return hook

    # nn.BatchNorm*d computes its batch statistics anyway: with momentum 1 its kernel
    # writes them into the running buffers (the unbiased variance), which saves a pass
    # over every input. (Not SyncBatchNorm: its statistics would be every rank's.)
    kernel_stats = {
        name: m
        for name, m in targets.items()
        if isinstance(m, internals.NativeBatchNorm) and not isinstance(m, nn.SyncBatchNorm)
    }
    momenta = {name: m.momentum for name, m in kernel_stats.items()}
    counts: dict[str, int] = {}

    def count_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            counts[name] = x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0

        return hook

    def read_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            n = counts.pop(name, 0)
            if n > 1:  # one value per channel is refused by the layer itself
                rm, rv, _ = _state(module)
                acc[name].add_moments(n, rm.double(), rv.double() * (n - 1))

        return hook

    handles = []
    for name, m in targets.items():
        if name in kernel_stats:
            handles.append(m.register_forward_pre_hook(count_for(name)))
            handles.append(m.register_forward_hook(read_for(name)))
        else:
            handles.append(m.register_forward_pre_hook(hook_for(name)))
    with torch.no_grad():
        for m in kernel_stats.values():
            m.momentum = 1.0
            rm, rv, _ = _state(m)
            rm.zero_()  # finite starting values: 0 * inf would be NaN, not 0
            rv.fill_(1.0)

    # Batch Renormalization's statistics (and a running_std) move in every training call:
    # put back after each batch, so that every batch meets the model as it was and they
    # end as they were (SPEC.md section 8: only the running statistics change).
    extra = [
        (buffer, buffer.detach().clone())
        for m in targets.values()
        for key, buffer in m.named_buffers(recurse=False)
        if key not in _RECALIBRATED and buffer is not None
    ]

    def put_back() -> None:
        with torch.no_grad():
            for buffer, value in extra:
                buffer.copy_(value)

    def run_one(batch: Any) -> str | None:
        _run(model, batch)
        put_back()
        flags = [(n, a.last_finite) for n, a in acc.items() if a.last_finite is not None]
        for a in acc.values():
            a.last_finite = None
        # One host synchronisation per batch, for all layers together.
        if flags and not bool(torch.stack([f for _, f in flags]).all()):
            return next(n for n, f in flags if not bool(f))
        return None

    distributed = _world_size(process_group) > 1
    try:
        model.train()
        failure: ValueError | None = None
        with torch.no_grad():
            try:
                seen = core.run_batches(batches, run_one, progress, allow_empty=distributed)
            except ValueError as err:
                if not distributed:
                    raise
                failure, seen = err, 0  # raised after the other ranks have heard of it
        if distributed and _merge_ranks(acc, targets, failure, seen, process_group) == 0:
            raise ValueError(core.EMPTY_BATCHES)
        core.check_counts({name: a.count for name, a in acc.items()})
    except BaseException:
        _restore(targets, saved)
        put_back()
        raise
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for name, momentum in momenta.items():
            kernel_stats[name].momentum = momentum
    with torch.no_grad():
        for name, m in targets.items():
            a = acc[name]
            assert a.mean is not None and a.m2 is not None
            unbiased = m.spec.unbiased if isinstance(m, BatchNorm) else True
            var = a.m2 / (a.count - 1) if unbiased and a.count > 1 else a.m2 / a.count
            rm, rv, tracked = _state(m)
            rm.copy_(a.mean.to(rm.dtype))
            rv.copy_(var.to(rv.dtype))
            tracked.fill_(a.batches)
            std = getattr(m, "running_std", None)
            if isinstance(std, Tensor) and isinstance(m, BatchNorm):
                # renorm_running="stddev" keeps sqrt(var + eps)
                std.copy_(torch.sqrt(var + m.spec.eps).to(std.dtype))
    return model


#: The buffers recalibrate sets; a BatchNorm's others are left as they were.
_RECALIBRATED = ("running_mean", "running_var", "num_batches_tracked")


def _world_size(group: Any) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


@torch.no_grad()
def _merge_ranks(
    acc: Mapping[str, _Accumulator],
    targets: Mapping[str, nn.Module],
    failure: ValueError | None,
    seen: int,
    group: Any,
) -> int:
    """Merge every rank's statistics into ``acc`` exactly (each rank ends with all of
    them); the number of batches over all ranks. A failure on any rank (this one's is
    ``failure``) is raised on every rank, after one collective, so no rank waits for ever.
    """
    import torch.distributed as dist

    first = _state(next(iter(targets.values())))[0]
    device = first.device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    status = torch.tensor([float(failure is not None), float(seen)], dtype=torch.float64)
    status = status.to(device)
    dist.all_reduce(status, group=group)
    if failure is not None:
        raise failure
    if status[0] > 0:
        raise ValueError(
            "recalibrate failed on another rank (its error says why); the model is unchanged"
        )
    world = _world_size(group)
    for name in sorted(acc):  # the same order on every rank
        a, channels = acc[name], _state(targets[name])[0].shape[0]
        local = torch.zeros(2 + 2 * channels, dtype=torch.float64, device=device)
        local[0], local[1] = a.count, a.batches
        if a.mean is not None and a.m2 is not None:
            local[2 : 2 + channels] = a.mean.to(device)
            local[2 + channels :] = a.m2.to(device)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        a.count, a.batches, a.mean, a.m2 = 0, 0, None, None
        for part in parts:  # in rank order: every rank merges identically
            n = int(part[0])
            a.batches += int(part[1])
            if n == 0:
                continue
            mean, m2 = part[2 : 2 + channels], part[2 + channels :]
            if a.mean is None or a.m2 is None:
                a.mean, a.m2 = mean, m2
            else:
                a.mean, a.m2 = core.merge_moments(a.count, a.mean, a.m2, n, mean, m2)
            a.count += n
    return int(status[1])


def _state(m: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    rm, rv, tracked = m.running_mean, m.running_var, m.num_batches_tracked
    assert isinstance(rm, Tensor) and isinstance(rv, Tensor) and isinstance(tracked, Tensor)
    return rm, rv, tracked


@torch.no_grad()
def _restore(targets: Mapping[str, nn.Module], saved: Mapping[str, list[Tensor]]) -> None:
    for name, m in targets.items():
        for t, old in zip(_state(m), saved[name], strict=True):
            t.copy_(old)

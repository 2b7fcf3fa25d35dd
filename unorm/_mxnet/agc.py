"""Adaptive Gradient Clipping (Brock et al. 2021, arXiv 2102.06171) for Gluon 1.9.

Per output unit ``i`` of a parameter ``W`` with effective gradient ``G``:
``max_i = clipping * max(||W_i||, eps)``; where ``||G_i||`` is finite and above ``max_i``,
``G_i <- G_i * max_i / max(||G_i||, 1e-6)`` (SPEC.md section 5). The output-unit axes come
from the layer owning the parameter (``unorm.spec.output_unit_axes("mxnet", kind, ndim)``):
Dense ``(units, in)`` and Conv ``(O, I/g, *k)`` axis 0, Conv*DTranspose ``(I, O/g, *k)``
axis 1, Embedding one unit per row; parameters of rank <= 1 are one unit. A grouped
transposed convolution (``groups = g > 1``) is clipped on the view ``(g, I/g, O/g, *k)``
of its weight and gradient with unit axes ``(0, 2)``: axis 1 alone would gather the output
channels ``j, j + O/g, ...`` of all groups into one unit. A convolution built
channels-last (``layout="NHWC"`` or ``"NDHWC"``) stores Conv ``(O, *k, I/g)`` and
Conv*DTranspose ``(I, *k, O/g)``: the unit axis is 0, respectively the last, and a grouped
one is clipped on the view ``(g, I/g, *k, O/g)`` with unit axes ``(0, last)``.

The *effective* gradient is what the optimizer consumes: ``Trainer.step(batch_size)``
multiplies the stored gradient by ``rescale_grad = 1/batch_size`` (times the Trainer's own
scale, e.g. a loss scaler's ``1/loss_scale``) inside the optimizer, after the all-reduce.
Clipping is not scale-invariant, so the norms here are those of ``rescale_grad * grad``,
and the same per-unit factor is applied to the stored gradient; the optimizer's product is
then the clipped effective gradient, whichever way the loss was written (sum or mean).

All work stays on the device (norms, thresholds and the per-unit ``where``); there is no
host synchronisation per tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from .._core.agc_plan import Param, Target, layer_unit_axes, resolve
from .._core.layer_kinds import KernelLayout
from ..spec import AGC_GRAD_NORM_FLOOR, AGCSpec, UnitAxes
from . import internals
from .plugin import PLUGIN

__all__ = ["AGC", "adaptive_clip_grad", "final_classifier", "unit_axes_of"]


def _blocks(block: Any) -> Iterator[Any]:
    """``block`` and all its descendants, depth first, in registration order."""
    yield block
    for _, child in internals.children(block):
        yield from _blocks(child)


def _layer_kind(block: Any) -> str | None:
    """The SPEC.md layer kind of ``block`` (its weight's layout), or None: not a layer AGC
    knows."""
    nn = gluon.nn
    if isinstance(block, (nn.Conv1DTranspose, nn.Conv2DTranspose, nn.Conv3DTranspose)):
        return "conv_transpose"
    if isinstance(block, (nn.Conv1D, nn.Conv2D, nn.Conv3D)):
        return "conv"  # depthwise (groups = channels) has the same layout and unit axis
    if isinstance(block, nn.Dense):
        return "dense"
    if isinstance(block, nn.Embedding):
        return "embedding"
    return None


#: The weight layout of a convolution built channels-last (``layout="NHWC"``, ``"NDHWC"``):
#: Gluon stores Conv ``(O, *k, I/g)`` and Conv*DTranspose ``(I, *k, O/g)``, the logical
#: axes ``a`` first, ``b`` last, not the declared channels-first ``(a, b, *k)``.
_CHANNELS_LAST = KernelLayout("a k b")


def _weight_layout(block: Any, kind: str) -> KernelLayout | None:
    """The layout of ``block``'s weight where it is not the plug-in's declared one for
    ``kind`` (a convolution whose layout string does not start with ``"NC"``), else None."""
    if kind not in ("conv", "conv_transpose"):
        return None
    layout = internals.layer_arguments(block).get("layout")
    if layout is None or str(layout).upper().startswith("NC"):
        return None
    return _CHANNELS_LAST


class _Owner:
    """The Block that registered a parameter: its type name and, for the weight of a layer
    AGC knows, the kind, group count and (channels-last) layout."""

    __slots__ = ("groups", "kind", "layout", "type_name")

    def __init__(
        self,
        type_name: str,
        kind: str | None = None,
        groups: int = 1,
        layout: KernelLayout | None = None,
    ) -> None:
        self.type_name = type_name
        self.kind = kind
        self.groups = groups
        self.layout = layout


def _registered(block: Any) -> list[Any]:
    """The parameters ``block`` itself holds, not its children's: those it registered as
    attributes, then any it created with ``block.params.get`` without assigning one."""
    own = list(internals.own_parameters(block).values())
    seen = {p.name for p in own}
    return own + [p for name, p in block.params.items() if name not in seen]


def _owners(root: Any) -> dict[str, _Owner]:
    """The owning Block of every parameter of ``root``, by parameter name; the kind only
    for the weight of a layer AGC knows. A parameter shared by several Blocks takes the
    first that owns it as a known layer's weight, else the first that holds it."""
    owners: dict[str, _Owner] = {}
    for block in _blocks(root):
        kind = _layer_kind(block)
        for param in _registered(block):
            if kind is not None and param is block.weight:
                known = owners.get(param.name)
                if known is None or known.kind is None:
                    owners[param.name] = _Owner(
                        type(block).__name__,
                        kind,
                        internals.groups(block),
                        _weight_layout(block, kind),
                    )
            else:
                owners.setdefault(param.name, _Owner(type(block).__name__))
    return owners


def _params(table: Mapping[str, Any], root: Any) -> list[Param]:
    """The core's records of the parameters in ``table``, with their owners in ``root``
    (None: a bare parameter list, which no layer owns)."""
    owners = {} if root is None else _owners(root)
    out = []
    for name, param in table.items():
        owner = owners.get(name)
        if owner is None:
            out.append(Param(name, name, tuple(param.shape)))
        else:
            out.append(
                Param(
                    name,
                    name,
                    tuple(param.shape),
                    owner.type_name,
                    owner.kind,
                    owner.groups,
                    layout=owner.layout,
                )
            )
    return out


def unit_axes_of(block: Any) -> dict[str, UnitAxes]:
    """The output-unit axes of every weight whose layer AGC knows, by parameter name.

    The axes come from the owning layer (SPEC.md section 5): Dense, Conv and Embedding
    axis 0, Conv*DTranspose ``(I, O/g, *k)`` axis 1. A grouped transposed convolution
    (``groups = g > 1``) reports ``(0, 2)``: axes of its weight *viewed* as
    ``(g, I/g, O/g, *k)``, which :func:`adaptive_clip_grad` and :class:`AGC` apply when given
    the Block. As ``unit_axes`` overrides they would apply to the weight itself, so pass the
    Block, not its ParameterDict, for such layers. A channels-last convolution
    (``layout="NHWC"``) stores Conv ``(O, *k, I/g)`` (axis 0) and Conv*DTranspose
    ``(I, *k, O/g)`` (the last axis; grouped: ``(0, last)`` of ``(g, I/g, *k, O/g)``).
    Biases (rank 1) are not listed: they are one unit.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.HybridSequential(prefix="net_")
        >>> with net.name_scope():
        ...     net.add(gluon.nn.Conv2DTranspose(4, 3, in_channels=2), gluon.nn.Dense(3),
        ...             gluon.nn.Conv2DTranspose(4, 3, in_channels=2, groups=2))
        >>> unit_axes_of(net)
        {'net_conv0_weight': 1, 'net_dense0_weight': 0, 'net_conv1_weight': (0, 2)}
    """
    return layer_unit_axes(_params(dict(block.collect_params().items()), block), PLUGIN.layouts)


def final_classifier(block: Any) -> Any:
    """The last ``gluon.nn.Dense`` layer of ``block`` (depth first, registration order).

    AGC leaves the final classifier unclipped (weight and bias), as the paper does:
    ``AGC(trainer, net, exclude=[final_classifier(net)])``. Raises ``ValueError`` when
    ``block`` has no Dense layer.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.HybridSequential(prefix="m_")
        >>> with net.name_scope():
        ...     net.add(gluon.nn.Dense(4), gluon.nn.Dense(2))
        >>> final_classifier(net).name
        'm_dense1'
    """
    dense = [b for b in _blocks(block) if isinstance(b, gluon.nn.Dense)]
    if not dense:
        raise ValueError(f"block {block.name!r} has no Dense layer to take as the classifier")
    return dense[-1]


def _param_table(params: Any) -> tuple[dict[str, Any], Any]:
    """Parameters by name, and the block they came from (or None)."""
    if isinstance(params, gluon.Block):
        return dict(params.collect_params().items()), params
    if isinstance(params, (gluon.ParameterDict, Mapping)):
        return dict(params.items()), None
    if isinstance(params, gluon.Parameter):
        return {params.name: params}, None
    if isinstance(params, Iterable):
        table = {}
        for p in params:
            if not isinstance(p, gluon.Parameter):
                raise ValueError(
                    f"params must be a Block, a ParameterDict or Parameters, got {p!r}"
                )
            table[p.name] = p
        return table, None
    raise ValueError(f"params must be a Block, a ParameterDict or Parameters, got {params!r}")


def _matcher(table: Mapping[str, Any], root: Any) -> Callable[[Any], list[str] | None]:
    """How an ``exclude`` item or ``unit_axes`` key names parameters: a Block (or a block
    name) all of its parameters, a Parameter (or a parameter name) itself."""
    blocks = {b.name: b for b in _blocks(root)} if root is not None else {}

    def match(item: Any) -> list[str] | None:
        if isinstance(item, gluon.Block):
            return [n for n in item.collect_params() if n in table]
        if isinstance(item, gluon.Parameter):
            return [item.name] if item.name in table else []
        if isinstance(item, str):
            if item in table:
                return [item]
            block = blocks.get(item)
            return [] if block is None else [n for n in block.collect_params() if n in table]
        return None

    return match


def _single(item: Any) -> bool:
    return isinstance(item, (str, gluon.Block, gluon.Parameter))


def _name_of(item: Any) -> str:
    return str(item.name) if isinstance(item, (gluon.Block, gluon.Parameter)) else str(item)


def _resolve(params: Any, exclude: Any, unit_axes: Any) -> list[_Target]:
    table, root = _param_table(params)
    plan = resolve(
        _params(table, root),
        PLUGIN.layouts,
        match=_matcher(table, root),
        exclude=exclude,
        unit_axes=unit_axes,
        single=_single,
        name_of=_name_of,
    )
    # Parameters that take no gradient are left alone (as Gluon's optimizers do).
    return [
        _Target(table[t.key], t)  # type: ignore[index]
        for t in plan.targets
        if table[t.key].grad_req != "null"  # type: ignore[index]
    ]


class _Target:
    """One parameter to clip and its core target (unit axes, grouped view)."""

    __slots__ = ("param", "plan")

    def __init__(self, param: Any, plan: Target) -> None:
        self.param = param
        self.plan = plan


def _check_grads(targets: list[_Target]) -> None:
    """Refuse gradients AGC cannot clip, for every target, before any is clipped."""
    for target in targets:
        name = target.param.name
        for grad in target.param.list_grad():
            dtype = np.dtype(grad.dtype)
            if dtype.kind != "f":
                raise ValueError(
                    f"the gradient of {name!r} must have a floating-point dtype, got {dtype.name}"
                )
            if grad.stype != "default":
                raise ValueError(
                    f"AGC needs dense gradients, the gradient of {name!r} has storage type "
                    f"{grad.stype!r}; create the layer with sparse_grad=False"
                )


def _clip(grad: Any, weight: Any, target: _Target, spec: AGCSpec, rescale: float) -> None:
    """Clip one gradient array in place (see the module docstring); checked by
    :func:`_check_grads` first."""
    if grad.size == 0:
        return
    dtype = np.dtype(grad.dtype)
    view = target.plan.view or tuple(grad.shape)
    reduce = target.plan.reduce_axes if target.plan.axes else tuple(range(len(view)))
    work = np.float64 if dtype == np.float64 else np.float32  # norms in float32 or wider
    g = grad if dtype == work else grad.astype(work)
    w = weight if np.dtype(weight.dtype) == work else weight.astype(work)
    if view != tuple(grad.shape):
        # A grouped transposed convolution: reshape is a view of a default-layout array
        # (parameter gradients are), so writing into it writes the gradient itself.
        g, w = g.reshape(view), w.reshape(view)
    if reduce:
        g_norm = mx.nd.norm(g, ord=2, axis=reduce, keepdims=True)
        w_norm = mx.nd.norm(w, ord=2, axis=reduce, keepdims=True)
    else:  # every entry is its own unit
        g_norm, w_norm = mx.nd.abs(g), mx.nd.abs(w)
    if rescale != 1.0:
        g_norm = g_norm * rescale
    max_norm = mx.nd.maximum(w_norm, spec.eps) * spec.clipping
    clip = mx.nd.contrib.isfinite(g_norm) * (g_norm > max_norm)
    factor = max_norm / mx.nd.maximum(g_norm, AGC_GRAD_NORM_FLOOR)
    # Units left alone are multiplied by exactly 1.0, which keeps their bits.
    scale = mx.nd.where(clip, factor, mx.nd.ones_like(factor))
    if dtype == work:
        mx.nd.broadcast_mul(g, scale, out=g)  # g is the gradient, in the view's shape
    else:
        grad[:] = mx.nd.broadcast_mul(g, scale).astype(dtype).reshape(grad.shape)


def _check_positive(value: object, name: str) -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _clip_targets(targets: list[_Target], spec: AGCSpec, rescale: float) -> None:
    """Clip every target's gradient on every device; :func:`_check_grads` ran before, so
    nothing here refuses a gradient after others were clipped."""
    for target in targets:
        for grad, weight in zip(target.param.list_grad(), target.param.list_data(), strict=True):
            _clip(grad, weight, target, spec, rescale)


def adaptive_clip_grad(
    params: Any,
    clipping: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: Any = (),
    unit_axes: int | Mapping[Any, UnitAxes] | None = None,
    rescale_grad: float = 1.0,
) -> None:
    """Clip the gradients of ``params`` in place with AGC (SPEC.md section 5).

    ``params``: a Block (output-unit axes come from its layers), a ``ParameterDict`` or
    Parameters (then every parameter of rank >= 2 needs a ``unit_axes`` entry).
    ``clipping`` (0.01) and ``eps`` (1e-3) as in the paper. ``exclude``: parameters,
    parameter names, Blocks or block names left unclipped (a Block excludes its weight and
    bias). ``unit_axes``: per-parameter override, by name or Parameter, an int, a tuple of
    ints or None (one unit). ``rescale_grad``: the factor the optimizer will multiply the
    stored gradient by; norms are those of ``rescale_grad * grad``. Call it between
    ``trainer.allreduce_grads()`` and ``trainer.update(batch_size)`` with
    ``rescale_grad=1/batch_size``, or let :class:`AGC` do it. Parameters with
    ``grad_req='null'`` are skipped; non-finite unit gradients are left as they are. Bad
    arguments and gradients AGC cannot clip (integer dtype, sparse storage) raise
    ``ValueError`` before any gradient changes.

    Example:
        >>> import mxnet as mx
        >>> from mxnet import autograd, gluon
        >>> layer = gluon.nn.Dense(1, in_units=2, use_bias=False)
        >>> layer.initialize(mx.init.Constant(1.0))
        >>> x = mx.nd.array([[300.0, 400.0]])
        >>> x.attach_grad()
        >>> with autograd.record():
        ...     y = layer(x)
        >>> y.backward()
        >>> adaptive_clip_grad(layer, clipping=0.01)  # ||G|| = 500 > 0.01 * sqrt(2)
        >>> layer.weight.grad().asnumpy().round(5).tolist()
        [[0.00849, 0.01131]]
    """
    spec = AGCSpec(clipping=clipping, eps=eps)
    rescale = _check_positive(rescale_grad, "rescale_grad")
    targets = _resolve(params, exclude, unit_axes)
    _check_grads(targets)
    _clip_targets(targets, spec, rescale)


class AGC:
    """A Gluon ``Trainer`` wrapper whose ``step`` clips the effective gradient with AGC.

    ``AGC(trainer, params, *, clipping=0.01, eps=1e-3, exclude=(), unit_axes=None)``;
    ``params`` and the keywords as in :func:`adaptive_clip_grad` (pass the model Block so
    the unit axes come from its layers). ``step(batch_size)`` does what
    ``trainer.step(batch_size)`` does, with AGC in between: all-reduce the gradients across
    devices, clip ``rescale_grad * grad`` with ``rescale_grad = trainer scale /
    batch_size``, then update. Every device holds the same reduced gradient and clips it
    the same way. Gluon's manual form ``agc.allreduce_grads(); agc.update(batch_size)``
    clips too: ``update`` clips the (already all-reduced) effective gradient with the same
    rescale, then updates. With several devices, create the Trainer with
    ``update_on_kvstore=False`` (otherwise the kvstore updates the weights during the
    all-reduce, before any clipping); ``step`` and ``update`` refuse it with a
    ``ValueError``, as they refuse a bad ``batch_size`` or a gradient AGC cannot clip,
    before any gradient or weight changes. Other attributes (``learning_rate``,
    ``set_learning_rate``, ``allreduce_grads``, ``save_states``...) are the trainer's.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.Dense(2, in_units=3)
        >>> net.initialize()
        >>> agc = AGC(gluon.Trainer(net.collect_params(), "sgd"), net, clipping=0.02)
        >>> agc.spec.clipping, agc.learning_rate
        (0.02, 0.01)
    """

    def __init__(
        self,
        trainer: Any,
        params: Any,
        *,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: Any = (),
        unit_axes: int | Mapping[Any, UnitAxes] | None = None,
    ) -> None:
        self.trainer = trainer
        self.spec = AGCSpec(clipping=clipping, eps=eps)
        self._targets = _resolve(params, exclude, unit_axes)

    def _prepare(self, batch_size: float) -> float:
        """Every check of a step, before anything changes; returns the rescale factor
        ``trainer scale / batch_size`` the optimizer will apply."""
        batch = _check_positive(batch_size, "batch_size")
        scale = internals.trainer_scale(self.trainer)
        rescale = _check_positive(scale / batch, "the trainer's scale / batch_size")
        trainer = self.trainer
        internals.ensure_kvstore(trainer)  # settles update_on_kvstore, changes nothing
        if internals.updates_on_kvstore(trainer):
            raise ValueError(
                "AGC clips between the all-reduce and the update: create the gluon.Trainer "
                "with update_on_kvstore=False"
            )
        _check_grads(self._targets)
        return rescale

    def step(self, batch_size: float, ignore_stale_grad: bool = False) -> None:
        """All-reduce, clip the effective gradients, update: ``trainer.step`` with AGC.

        ``batch_size`` as in ``gluon.Trainer.step``: the optimizer multiplies the gradient
        by ``trainer scale / batch_size``, and AGC clips that effective gradient.
        """
        rescale = self._prepare(batch_size)  # refuses update_on_kvstore, Gluon's assertion
        self.trainer.allreduce_grads()
        _clip_targets(self._targets, self.spec, rescale)
        self.trainer.update(batch_size, ignore_stale_grad)

    def update(self, batch_size: float, ignore_stale_grad: bool = False) -> None:
        """Clip the effective gradients, then update: ``trainer.update`` with AGC.

        For Gluon's manual form ``agc.allreduce_grads(); agc.update(batch_size)`` (e.g. to
        look at the reduced gradients in between): the gradients are clipped as
        :meth:`step` clips them (norms of ``trainer scale / batch_size`` times the stored
        gradient), so the two forms take the same step. Without a preceding all-reduce each
        device clips its own gradient, as Gluon's ``update`` then updates from it.
        """
        rescale = self._prepare(batch_size)
        _clip_targets(self._targets, self.spec, rescale)
        self.trainer.update(batch_size, ignore_stale_grad)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

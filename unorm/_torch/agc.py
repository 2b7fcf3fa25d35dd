"""Adaptive Gradient Clipping for PyTorch (``SPEC.md`` section 5; Brock et al. 2021,
arXiv 2102.06171).

The output-unit axis of every parameter comes from the layer that owns it (Linear and
Conv: axis 0; ConvTranspose: axis 1, per group; Embedding: rows), never from the
tensor's rank, and can be overridden per parameter. The clip runs on device with no host
synchronisation: per-unit norms in float32 or wider, a ``torch.where`` for the decision,
one in-place multiply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from .._core.agc_plan import Param, Resolution, Target, items_of, layer_unit_axes, resolve
from ..spec import AGC_GRAD_NORM_FLOOR, AGCSpec, UnitAxes
from . import internals
from .plugin import PLUGIN

__all__ = [
    "AGC",
    "ExcludeSpec",
    "UnitAxesOverride",
    "adaptive_clip_grad_",
    "final_classifier",
    "unit_axes_of",
]

#: What ``exclude`` accepts: names of parameters or modules, modules, parameters.
ExcludeSpec: TypeAlias = str | nn.Module | Tensor | Iterable[str | nn.Module | Tensor]
#: ``unit_axes`` overrides: one axis for every parameter of rank >= 2, or per parameter
#: (keyed by qualified name or by the parameter itself).
UnitAxesOverride: TypeAlias = int | Mapping[str | Tensor, UnitAxes] | None

_HALF = (torch.float16, torch.bfloat16)
# Parameters of rank >= 2 of layers outside the layer-kind table, whose rows are output
# units (attention projections, recurrent gate matrices).
_ROW_MAJOR_PARAMS = re.compile(
    r"^(in_proj_weight|[qkv]_proj_weight|weight_(ih|hh|hr)_l\d+(_reverse)?)$"
)
_LAYOUTS = PLUGIN.layouts


def _describe(module: nn.Module, pname: str, param: Tensor, qualified: str) -> Param:
    """``param``, owned directly by ``module``, as the core resolution sees it."""
    owner = type(module).__name__
    shape = tuple(param.shape)
    if isinstance(module, internals.ConvTransposeBase):
        return Param(id(param), qualified, shape, owner, "conv_transpose", module.groups)
    if isinstance(module, internals.ConvBase):
        return Param(id(param), qualified, shape, owner, "conv")
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return Param(id(param), qualified, shape, owner, "dense")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return Param(id(param), qualified, shape, owner, "embedding")
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and _ROW_MAJOR_PARAMS.match(pname):
        return Param(id(param), qualified, shape, owner, axes=0)
    if isinstance(module, nn.MultiheadAttention) and pname in ("bias_k", "bias_v"):
        return Param(id(param), qualified, shape, owner, axes=None)  # (1, 1, E): one unit
    return Param(id(param), qualified, shape, owner)


def _module_params(module: nn.Module) -> tuple[list[Param], dict[int, Tensor]]:
    """Every parameter of ``module`` once (a shared one under its first owner, as
    ``named_parameters`` does), and the tensors by key."""
    params: list[Param] = []
    tensors: dict[int, Tensor] = {}
    for mname, sub in module.named_modules():
        for pname, param in sub.named_parameters(recurse=False):
            if id(param) in tensors:
                continue
            qualified = f"{mname}.{pname}" if mname else pname
            if isinstance(param, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"parameter {qualified!r} of {type(sub).__name__} has no shape yet (a "
                    "lazy module): run the model once before AGC reads its layers"
                )
            params.append(_describe(sub, pname, param, qualified))
            tensors[id(param)] = param
    return params, tensors


def _matcher(params: list[Param], tensors: dict[int, Tensor]) -> Callable[[Any], list[int] | None]:
    """How an ``exclude`` item or ``unit_axes`` key names parameters: a module all of its
    parameters, a tensor itself, a name the parameter or module of that qualified name."""

    def match(item: Any) -> list[int] | None:
        if isinstance(item, nn.Module):
            owned = {id(p) for p in item.parameters()}
            return [p.key for p in params if p.key in owned]  # type: ignore[misc]
        if isinstance(item, Tensor):
            return [id(item)] if id(item) in tensors else []
        if isinstance(item, str):
            return [
                p.key  # type: ignore[misc]
                for p in params
                if p.name == item or p.name.startswith(item + ".")
            ]
        return None

    return match


def _single(item: object) -> bool:
    # A module or a tensor is one item although it is iterable.
    return isinstance(item, (str, nn.Module, Tensor))


def _name_of(item: object) -> str:
    if isinstance(item, Tensor):
        return f"tensor of shape {tuple(item.shape)}"
    if isinstance(item, nn.Module):
        return f"{type(item).__name__} module"
    return str(item)


def _resolve(
    params: list[Param], tensors: dict[int, Tensor], exclude: ExcludeSpec, unit_axes: object
) -> Resolution:
    return resolve(
        params,
        _LAYOUTS,
        match=_matcher(params, tensors),
        exclude=exclude,
        unit_axes=unit_axes,
        single=_single,
        name_of=_name_of,
    )


def _bare(tensors: Iterable[Tensor]) -> list[Param]:
    """Parameters given without their module, named by their position."""
    return [Param(id(t), f"parameters[{i}]", tuple(t.shape)) for i, t in enumerate(tensors)]


def unit_axes_of(module: nn.Module) -> dict[str, UnitAxes]:
    """The output-unit axes (non-negative) of every parameter of rank >= 2 whose layer AGC
    knows, by qualified name (``SPEC.md`` section 5). A grouped transposed convolution
    reports the axes of its weight viewed as ``(g, I/g, O/g, *k)``, which AGC clips on.

    Example:
        >>> unit_axes_of(nn.Sequential(nn.Linear(4, 3), nn.ConvTranspose2d(4, 2, 3, groups=2)))
        {'0.weight': 0, '1.weight': (0, 2)}
    """
    return layer_unit_axes(_module_params(module)[0], _LAYOUTS)


def final_classifier(model: nn.Module) -> nn.Module:
    """The model's final classifier: its last ``nn.Linear`` in registration order.

    The paper excludes it from AGC: ``exclude=final_classifier(model)`` (weight and bias).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> final_classifier(net) is net[2]
        True
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to treat as the classifier")
    return linears[-1]


@torch.no_grad()
def _clip_one(param: Tensor, grad: Tensor, target: Target, settings: AGCSpec) -> None:
    g = grad if target.view is None else grad.view(target.view)
    w = param.detach() if target.view is None else param.detach().view(target.view)
    norm_dtype = torch.float32 if g.dtype in _HALF else None
    if target.axes and not target.reduce_axes:
        # Every axis indexes the units: each entry is its own unit. (vector_norm reads
        # dim=() as "every axis", which would make the whole tensor one unit.)
        w_norm, g_norm = w.abs().to(norm_dtype or w.dtype), g.abs().to(norm_dtype or g.dtype)
    else:
        dims = target.reduce_axes if target.axes else None  # no unit axes: one unit
        w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=norm_dtype)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=norm_dtype)
    max_norm = settings.clipping * w_norm.clamp(min=settings.eps)
    clip = torch.isfinite(g_norm) & (g_norm > max_norm)
    # Units under the threshold are multiplied by exactly 1: unchanged, bit for bit.
    factor = torch.where(clip, max_norm / g_norm.clamp(min=AGC_GRAD_NORM_FLOOR), 1.0)
    if g.dtype in _HALF:
        g.copy_(g.float() * factor)
    else:
        g.mul_(factor.to(g.dtype))


def adaptive_clip_grad_(
    parameters_or_module: nn.Module | Tensor | Iterable[Tensor],
    clipping: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: ExcludeSpec = (),
    unit_axes: UnitAxesOverride = None,
) -> None:
    """Clip the ``.grad`` of parameters in place, unit-wise (``SPEC.md`` section 5).

    For each output unit ``i``: ``max_i = clipping * max(||W_i||, eps)``; where
    ``||G_i|| > max_i`` the unit's gradient becomes ``G_i * max_i / max(||G_i||, 1e-6)``.
    Units under the threshold and units whose gradient norm is not finite are untouched,
    so ``torch.amp.GradScaler`` still sees inf/nan. Call it on the effective gradient:
    after ``scaler.unscale_(optimizer)`` and after data-parallel all-reduce.

    Args:
        parameters_or_module: a module (its layers give each parameter's output-unit
            axis), or parameters; parameters of rank >= 2 then need ``unit_axes``.
        clipping: 0.01. The largest allowed ratio ``||G_i|| / max(||W_i||, eps)``.
        eps: 1e-3. The floor under a unit's weight norm.
        exclude: parameter or module names, modules or parameters left unclipped,
            e.g. ``final_classifier(model)``.
        unit_axes: an axis for every parameter of rank >= 2, or overrides per
            parameter (qualified name or the parameter itself).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> net(torch.randn(2, 3, 3, 3)).sum().backward()
        >>> adaptive_clip_grad_(net, clipping=0.01, exclude=final_classifier(net))
    """
    settings = AGCSpec(clipping=clipping, eps=eps)
    if isinstance(parameters_or_module, nn.Module):
        described, tensors = _module_params(parameters_or_module)
    else:
        given = (
            [parameters_or_module]
            if isinstance(parameters_or_module, Tensor)
            else list(parameters_or_module)
        )
        tensors = {}
        for tensor in given:
            tensors.setdefault(id(tensor), tensor)
        described = _bare(tensors.values())
    plan = _resolve(described, tensors, exclude, unit_axes)
    pairs = [(tensors[t.key], t) for t in plan.targets]  # type: ignore[index]
    _check_grads(pairs)
    for param, target in pairs:
        if param.grad is not None:
            _clip_one(param, param.grad, target, settings)


def _check_grads(pairs: Iterable[tuple[Tensor, Target]]) -> None:
    """Refuse, before any gradient changes, a gradient AGC cannot clip: sparse ones
    (``nn.Embedding(sparse=True)``) have no per-row norm kernel in PyTorch."""
    for param, target in pairs:
        if param.grad is not None and param.grad.layout != torch.strided:
            raise ValueError(
                f"AGC needs dense gradients, the gradient of {target.name!r} has layout "
                f"{param.grad.layout}; create the layer with sparse=False"
            )


class AGC(torch.optim.Optimizer):
    """An optimizer wrapper that clips gradients with AGC before every step.

    ``AGC(optimizer, module)`` behaves as ``optimizer`` (same ``param_groups``,
    ``state`` and ``state_dict``, so LR schedulers and checkpoints work) except that
    ``step()`` first applies :func:`adaptive_clip_grad_` to the optimizer's parameters,
    with output-unit axes from ``module``'s layers.

    With ``torch.amp.GradScaler``: ``scaler.scale(loss).backward()``,
    ``scaler.step(agc)``, ``scaler.update()``. The scaler unscales the gradients before
    it calls ``agc.step()``, so AGC sees the true gradient; a step with inf/nan
    gradients is skipped by the scaler before AGC runs.

    Args:
        optimizer: the optimizer to wrap.
        module: the model whose layers own the optimizer's parameters.
        clipping, eps, exclude, unit_axes: as in :func:`adaptive_clip_grad_`.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = AGC(torch.optim.SGD(net.parameters(), lr=0.1), net,
        ...           exclude=final_classifier(net))
        >>> net(torch.randn(3, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        module: nn.Module,
        clipping: float = 0.01,
        eps: float = 1e-3,
        *,
        exclude: ExcludeSpec = (),
        unit_axes: UnitAxesOverride = None,
    ) -> None:
        self.settings = AGCSpec(clipping=clipping, eps=eps)
        self.optimizer = optimizer
        self.module = module
        self._exclude = exclude
        self._unit_axes = unit_axes
        self._params, self._tensors = _module_params(module)
        self._use(self._plan(optimizer.param_groups))
        # Initialise the base class's hook machinery over the same group dicts, then
        # share the wrapped optimizer's groups and state, so both always agree.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._ready = True

    def _plan(self, groups: Iterable[Mapping[str, Any]]) -> Resolution:
        """The targets of every parameter of ``groups``, resolved with the module's
        layers, ``exclude`` and ``unit_axes``; refuses a parameter of rank >= 2 that no
        layer of the module owns and no ``unit_axes`` entry covers."""
        extra: dict[int, Tensor] = {}
        unowned: list[Param] = []

        def add(tensor: Tensor, name: str) -> None:
            if id(tensor) not in self._tensors and id(tensor) not in extra:
                extra[id(tensor)] = tensor
                # Such a tensor is named in unit_axes or exclude by itself (no name exists).
                shape = tuple(tensor.shape)
                unowned.append(Param(id(tensor), name, shape, named_by="<the tensor itself>"))

        for g, group in enumerate(groups):
            listed = group["params"]
            for i, tensor in enumerate([listed] if isinstance(listed, Tensor) else listed):
                add(tensor, f"param_groups[{g}][{i}]")
        # Tensors named in unit_axes or exclude that no layer owns may join the optimizer
        # later (add_param_group): they are known by themselves.
        named = list(self._unit_axes) if isinstance(self._unit_axes, Mapping) else []
        for item in [*named, *items_of(self._exclude, _single)]:
            if isinstance(item, Tensor):
                add(item, f"tensor of shape {tuple(item.shape)}")
        return _resolve(
            self._params + unowned, {**self._tensors, **extra}, self._exclude, self._unit_axes
        )

    def _use(self, plan: Resolution) -> None:
        """Clip from now on as ``plan`` says (its targets by key, its excluded keys)."""
        self._targets: dict[Hashable, Target] = plan.by_key()
        self._excluded = plan.excluded

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer, after the same checks as the
        constructor (every parameter's unit axes known); nothing changes if they fail."""
        if not getattr(self, "_ready", False):  # the base constructor's own groups
            super().add_param_group(param_group)
            return
        plan = self._plan([*self.param_groups, param_group])
        self.optimizer.add_param_group(param_group)
        self._use(plan)
        self.param_groups = self.optimizer.param_groups

    def clip(self) -> None:
        """Clip the gradients of the optimizer's parameters in place (AGC)."""
        pairs: list[tuple[Tensor, Target]] = []
        for group in self.param_groups:
            for param in group["params"]:
                target = self._targets.get(id(param))
                if param.grad is None or id(param) in self._excluded:
                    continue
                if target is None:
                    raise ValueError(
                        f"a parameter of shape {tuple(param.shape)} reached the wrapped "
                        "optimizer without AGC: add parameter groups through "
                        "AGC.add_param_group, which resolves their output-unit axes"
                    )
                pairs.append((param, target))
        _check_grads(pairs)  # every check before any gradient changes
        for param, target in pairs:
            assert param.grad is not None  # pairs hold parameters with a gradient only
            _clip_one(param, param.grad, target, self.settings)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Clip, then step the wrapped optimizer. ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.clip()
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, as the wrapped optimizer does."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (AGC itself has no state)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapped optimizer's state dict."""
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self) -> str:
        s = self.settings
        return f"AGC(clipping={s.clipping}, eps={s.eps}, optimizer={self.optimizer!r})"

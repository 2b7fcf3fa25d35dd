"""Adaptive Gradient Clipping for PyTorch (``SPEC.md``, AGC; Brock et al. 2021,
arXiv 2102.06171).

The output-unit axis of every parameter comes from the layer that owns it (Linear and
Conv: axis 0; ConvTranspose: axis 1, per group; Embedding: rows), never from the
tensor's rank, and can be overridden per parameter. The clip runs on device with no host
synchronisation: per-unit norms in float32 or wider, a ``torch.where`` for the decision,
one in-place multiply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..spec import (
    AGC_GRAD_NORM_FLOOR,
    AGCSpec,
    UnitAxes,
    normalize_unit_axes,
    output_unit_axes,
)

__all__ = ["AGC", "ExcludeSpec", "UnitAxesOverride", "adaptive_clip_grad_", "final_classifier"]

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


@dataclass(frozen=True)
class _Unit:
    """How to find one parameter's units: an optional view, then the unit axes."""

    name: str
    axes: UnitAxes
    view: tuple[int, ...] | None = None


def _layer_unit(module: nn.Module, pname: str, param: Tensor, qualified: str) -> _Unit | None:
    """The unit of ``param`` owned directly by ``module``; None when unknown."""
    if param.dim() <= 1:
        return _Unit(qualified, None)
    if isinstance(module, _ConvTransposeNd):
        if pname == "weight" and module.groups > 1:
            # (I, O/g, *k): output channel j of group k is (k, :, j) of the view
            # (g, I/g, O/g, *k), so the units span axes 0 and 2 (a rank rule would mix groups).
            g = module.groups
            view = (g, param.shape[0] // g, *param.shape[1:])
            return _Unit(qualified, (0, 2), view)
        return _Unit(qualified, output_unit_axes("torch", "conv_transpose", param.dim()))
    if isinstance(module, _ConvNd):
        return _Unit(qualified, output_unit_axes("torch", "conv", param.dim()))
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return _Unit(qualified, output_unit_axes("torch", "dense", param.dim()))
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return _Unit(qualified, output_unit_axes("torch", "embedding", param.dim()))
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and _ROW_MAJOR_PARAMS.match(pname):
        return _Unit(qualified, 0)
    if isinstance(module, nn.MultiheadAttention) and pname in ("bias_k", "bias_v"):
        return _Unit(qualified, None)  # (1, 1, E): a bias vector, one unit
    return None


def _checked(unit: _Unit, param: Tensor) -> _Unit:
    """``unit`` once its axes are known to fit ``param`` (in range and distinct, as
    ``SPEC.md`` asks), so that no bad axis is met mid-clip after other gradients changed."""
    ndim = param.dim() if unit.view is None else len(unit.view)
    try:
        normalize_unit_axes(unit.axes, ndim)
    except ValueError as err:  # the shared message, plus which parameter
        raise ValueError(f"{err} (parameter {unit.name!r} of shape {tuple(param.shape)})") from None
    return unit


def _check_override(override: object) -> None:
    """Refuse an override of the wrong kind before it is looked into (a tuple would be
    compared with tensors, a bool taken for an axis)."""
    if override is None or isinstance(override, Mapping):
        return
    if isinstance(override, bool) or not isinstance(override, int):
        raise ValueError(
            "unit_axes must be an int (every parameter of rank >= 2), a mapping from "
            f"parameter name or parameter to axes, or None, got {override!r}"
        )


def _override(override: UnitAxesOverride, name: str, param: Tensor) -> tuple[bool, UnitAxes]:
    if override is None:
        return False, None
    if isinstance(override, int):
        return (True, override) if param.dim() >= 2 else (False, None)
    for key in (name, param):
        if key in override:
            return True, override[key]
    return False, None


def _check_override_keys(override: UnitAxesOverride, names: set[str], params: set[int]) -> None:
    if override is None or isinstance(override, int):
        return
    for key in override:
        known = key in names if isinstance(key, str) else id(key) in params
        if not known:
            shown = key if isinstance(key, str) else f"tensor of shape {tuple(key.shape)}"
            raise ValueError(f"unit_axes names a parameter that is not clipped: {shown!r}")


def _units_of_module(
    module: nn.Module, override: UnitAxesOverride, skipped: set[int]
) -> dict[int, _Unit]:
    _check_override(override)
    units: dict[int, _Unit] = {}
    for mname, sub in module.named_modules():
        for pname, param in sub.named_parameters(recurse=False):
            qualified = f"{mname}.{pname}" if mname else pname
            if id(param) in units:
                continue  # shared parameter: the first owner decides, as named_parameters does
            forced, axes = _override(override, qualified, param)
            unit = _Unit(qualified, axes) if forced else _layer_unit(sub, pname, param, qualified)
            if unit is None and id(param) in skipped:
                continue  # excluded: its axis does not matter
            if unit is None:
                raise ValueError(
                    f"AGC does not know the output-unit axis of parameter {qualified!r} "
                    f"(shape {tuple(param.shape)}) of {type(sub).__name__}; pass "
                    f"unit_axes={{{qualified!r}: <axis>}} or exclude it"
                )
            units[id(param)] = _checked(unit, param)
    names = {u.name for u in units.values()}
    _check_override_keys(override, names, set(units))
    return units


def _units_of_params(params: Iterable[Tensor], override: UnitAxesOverride) -> dict[int, _Unit]:
    _check_override(override)
    units: dict[int, _Unit] = {}
    for i, param in enumerate(params):
        name = f"parameters[{i}]"
        forced, axes = _override(override, name, param)
        if not forced and param.dim() >= 2:
            raise ValueError(
                f"{name} (shape {tuple(param.shape)}) has rank >= 2 and no unit axis: pass "
                "the module that owns it (its layers decide the axis), or unit_axes"
            )
        units[id(param)] = _checked(_Unit(name, axes), param)
    return units


def _excluded_ids(module: nn.Module | None, exclude: ExcludeSpec) -> set[int]:
    items: list[Any] = [exclude] if isinstance(exclude, (str, nn.Module, Tensor)) else list(exclude)
    out: set[int] = set()
    named = dict(module.named_parameters()) if module is not None else {}
    for item in items:
        if isinstance(item, nn.Module):
            out.update(id(p) for p in item.parameters())
        elif isinstance(item, Tensor):
            out.add(id(item))
        elif isinstance(item, str):
            hits = [p for n, p in named.items() if n == item or n.startswith(item + ".")]
            if not hits:
                raise ValueError(f"exclude names no parameter or module of the model: {item!r}")
            out.update(id(p) for p in hits)
        else:
            raise TypeError(f"exclude items must be names, modules or parameters, got {item!r}")
    return out


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


def _reduce_dims(unit: _Unit, ndim: int) -> tuple[int, ...] | None:
    if unit.axes is None or ndim <= 1:
        return None
    keep = normalize_unit_axes(unit.axes, ndim)
    return tuple(d for d in range(ndim) if d not in keep)


@torch.no_grad()
def _clip_one(param: Tensor, grad: Tensor, unit: _Unit, settings: AGCSpec) -> None:
    g = grad if unit.view is None else grad.view(unit.view)
    w = param.detach() if unit.view is None else param.detach().view(unit.view)
    dims = _reduce_dims(unit, g.dim())
    norm_dtype = torch.float32 if g.dtype in _HALF else None
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
    """Clip the ``.grad`` of parameters in place, unit-wise (``SPEC.md``, AGC).

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
    params: list[Tensor]
    if isinstance(parameters_or_module, nn.Module):
        skipped = _excluded_ids(parameters_or_module, exclude)
        units = _units_of_module(parameters_or_module, unit_axes, skipped)
        params = [*parameters_or_module.parameters()]
    else:
        params = (
            [parameters_or_module]
            if isinstance(parameters_or_module, Tensor)
            else list(parameters_or_module)
        )
        units = _units_of_params(params, unit_axes)
        skipped = _excluded_ids(None, exclude)
    for param in params:
        if param.grad is None or id(param) in skipped:
            continue
        _clip_one(param, param.grad, units[id(param)], settings)


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
        self._skipped = _excluded_ids(module, exclude)
        self._units = _units_of_module(module, unit_axes, self._skipped)
        # Initialise the base class's hook machinery over the same group dicts, then
        # share the wrapped optimizer's groups and state, so both always agree.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        unowned = [
            tuple(p.shape)
            for group in self.param_groups
            for p in group["params"]
            if id(p) not in self._units and p.dim() >= 2
        ]
        if unowned:
            raise ValueError(
                f"the optimizer has parameters of rank >= 2 that module does not own: {unowned}"
            )

    def clip(self) -> None:
        """Clip the gradients of the optimizer's parameters in place (AGC)."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or id(param) in self._skipped:
                    continue
                unit = self._units.get(id(param), _Unit("", None))
                _clip_one(param, param.grad, unit, self.settings)

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

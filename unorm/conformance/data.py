"""Input generation: every array a case feeds a backend, drawn in NumPy from its seed.

Arrays are drawn in float64 and rounded to the case's dtype by a *rounder*: the
adapter's own cast for the backend under test (bfloat16 goes through the framework), or
:func:`conformance.dtypes.cast` where no framework is involved. Expected values are then
computed from the rounded values, so the comparison measures the backend, not the
rounding of its inputs.

Example:
    >>> from unorm.conformance.cases import get_case
    >>> inputs = batchnorm_inputs(get_case("bn/rank2"))
    >>> inputs.xs[0].shape, inputs.xs[0].dtype, inputs.gamma.dtype
    ((8, 5), dtype('float32'), dtype('float32'))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import dtypes
from .cases import (
    LOGICAL_UNIT_AXES,
    AGCCase,
    AGCParam,
    BatchNormCase,
    ErrorCase,
    SyncCase,
    WSCase,
)

__all__ = [
    "AGCInputs",
    "BatchNormInputs",
    "Rounder",
    "SyncInputs",
    "WSInputs",
    "agc_inputs",
    "batchnorm_inputs",
    "batchnorm_mask",
    "error_input",
    "logical_unit_axes",
    "sync_inputs",
    "ws_inputs",
]

#: ``round(values_float64, dtype) -> carrier array``: how a backend rounds its inputs.
Rounder = Callable[[np.ndarray, str], np.ndarray]


@dataclasses.dataclass(frozen=True)
class BatchNormInputs:
    """Parameters and per-step batches of a BatchNorm case (``dys[i]`` None: no backward)."""

    gamma: np.ndarray
    beta: np.ndarray
    xs: tuple[np.ndarray, ...]
    dys: tuple[np.ndarray | None, ...]


@dataclasses.dataclass(frozen=True)
class AGCInputs:
    """Logical weights and gradients of an AGC case, by parameter name."""

    weights: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SyncInputs:
    """Parameters and one batch slice (and upstream gradient) per replica."""

    gamma: np.ndarray
    beta: np.ndarray
    xs: tuple[np.ndarray, ...]
    dys: tuple[np.ndarray, ...]


def _params(rng: np.random.Generator, c: int, dtype: str, rnd: Rounder) -> tuple[np.ndarray, ...]:
    pdt = dtypes.param_dtype(dtype)
    gamma = rnd(rng.uniform(0.5, 1.5, c), pdt)
    beta = rnd(rng.normal(0.0, 0.5, c), pdt)
    return gamma, beta


def batchnorm_inputs(case: BatchNormCase, rnd: Rounder = dtypes.cast) -> BatchNormInputs:
    """Draw ``gamma``, ``beta`` and every step's batch and upstream gradient.

    The draws happen in a fixed order (gamma, beta, then x and dy per step), so a case's
    inputs depend only on its seed. A step's ``nonfinite`` value goes to the first
    position of feature 0.
    """
    rng = np.random.default_rng(case.seed)
    gamma, beta = _params(rng, case.num_features, case.dtype, rnd)
    xs: list[np.ndarray] = []
    dys: list[np.ndarray | None] = []
    for step in case.steps:
        if case.data.constant:
            x = np.full(case.shape, case.data.loc)
        else:
            x = rng.normal(case.data.loc, case.data.scale, case.shape)
        dy = rng.normal(0.0, 1.0, case.shape)
        if step.nonfinite is not None:
            x[(0,) * len(case.shape)] = np.nan if step.nonfinite == "nan" else np.inf
        xs.append(rnd(x, case.dtype))
        dys.append(None if step.mode == "forward" else rnd(dy, case.dtype))
    return BatchNormInputs(gamma, beta, tuple(xs), tuple(dys))


def batchnorm_mask(case: BatchNormCase) -> np.ndarray | None:
    """The mask of a masked case (None without one), in the reference's form: a boolean
    array of shape ``case.shape[:-1] + (1,)`` (Keras's mask with the axis it is broadcast
    over). Drawn by no random generator, so a case's inputs do not depend on it.

    Example:
        >>> from unorm.conformance.cases import get_case
        >>> batchnorm_mask(get_case("bn/masked/axis-first"))[:, :, 0].sum(axis=0).tolist()
        [4, 4, 4]
    """
    if case.mask is None:
        return None
    shape = (*case.shape[:-1], 1)
    if case.mask == "nothing":
        return np.zeros(shape, bool)
    # Every third position of each feature, counted along the batch axis, is dropped
    # (shifted per feature, so the mask differs along the feature axis).
    index = np.indices(shape).sum(axis=0)
    keep = index % 3 != 1
    if case.mask == "feature":
        axis = case.axis % len(case.shape)
        if axis == len(case.shape) - 1:
            raise ValueError(f"{case.name}: a feature mask needs the feature axis before the last")
        keep[(slice(None),) * axis + (0,)] = False
    return np.asarray(keep, dtype=bool)


def logical_unit_axes(param: AGCParam) -> int | tuple[int, ...] | None:
    """Unit axes of ``param`` in the logical layout (None for rank <= 1: one unit).

    Example:
        >>> from unorm.conformance.cases import AGCParam
        >>> logical_unit_axes(AGCParam("up", "conv_transpose", "weight", (3, 6, 2)))
        1
    """
    return LOGICAL_UNIT_AXES[param.kind] if len(param.shape) > 1 else None


def _unit_major(shape: tuple[int, ...], axes: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """Axis order that puts the unit axes first."""
    if axes is None:
        return tuple(range(len(shape)))
    front = sorted(a % len(shape) for a in ((axes,) if isinstance(axes, int) else axes))
    return (*front, *(i for i in range(len(shape)) if i not in front))


def _per_unit(values: np.ndarray, param: AGCParam) -> np.ndarray:
    """View ``values`` as ``(units, elements_per_unit)`` (a copy in unit-major order)."""
    order = _unit_major(param.shape, logical_unit_axes(param))
    moved = np.transpose(values, order)
    units = 1 if logical_unit_axes(param) is None else int(np.prod(moved.shape[: _n_unit(param)]))
    return moved.reshape(units, -1)


def _n_unit(param: AGCParam) -> int:
    axes = logical_unit_axes(param)
    return 0 if axes is None else (1 if isinstance(axes, int) else len(axes))


def _from_units(flat: np.ndarray, param: AGCParam) -> np.ndarray:
    order = _unit_major(param.shape, logical_unit_axes(param))
    moved_shape = tuple(param.shape[i] for i in order)
    return np.transpose(flat.reshape(moved_shape), np.argsort(order))


def _draw(rng: np.random.Generator, param: AGCParam) -> tuple[np.ndarray, np.ndarray]:
    shape = param.shape
    units = _per_unit(np.zeros(shape), param).shape[0]

    def spread(low: float, high: float) -> np.ndarray:
        # One factor per unit, log-uniform, so that some units clip and some do not.
        factors = 10.0 ** rng.uniform(low, high, units)
        flat = rng.normal(size=_per_unit(np.zeros(shape), param).shape) * factors[:, None]
        return _from_units(flat, param)

    recipe = param.recipe
    if recipe == "threshold":
        return _threshold(param)
    w = rng.normal(size=shape)
    if recipe == "mixed":
        return w, spread(-3.5, -0.5)
    if recipe == "zero_weight":
        return np.zeros(shape), spread(-7.5, -3.5)
    if recipe == "zero_grad":
        return w, np.zeros(shape)
    if recipe == "floor":
        return w * 1e-5, spread(-7.5, -6.6)
    if recipe == "nonfinite_grad":
        g = _per_unit(spread(-3.5, -0.5), param)
        g[0, 0], g[1, -1], g[2, 0] = np.inf, np.nan, -np.inf
        return w, _from_units(g, param)
    if recipe == "nonfinite_weight":
        wu = _per_unit(w, param)
        wu[0, 0], wu[1, -1] = np.inf, np.nan
        return _from_units(wu, param), spread(-1.5, -0.5)
    raise ValueError(f"unknown AGC recipe {recipe!r} for parameter {param.name}")


def _threshold(param: AGCParam) -> tuple[np.ndarray, np.ndarray]:
    # With clipping 0.5 a unit [3, 4, 0, ...] has the exact threshold 2.5; its gradient
    # [1.5, 2, 0, ...] times these factors sits at, just above, just below and far above.
    factors = [1.0, 1.0 + 2.0**-18, 1.0 - 2.0**-18, 2.0]
    w = _per_unit(np.zeros(param.shape), param)
    g = w.copy()
    for u in range(w.shape[0]):
        w[u, :2] = (3.0, 4.0)
        g[u, :2] = np.array([1.5, 2.0]) * factors[u % len(factors)]
    return _from_units(w, param), _from_units(g, param)


def agc_inputs(case: AGCCase, rnd: Rounder = dtypes.cast) -> AGCInputs:
    """Draw every parameter's logical weight and gradient, rounded to the case's dtype."""
    rng = np.random.default_rng(case.seed)
    weights: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}
    for param in case.params:
        w, g = _draw(rng, param)
        weights[param.name] = rnd(w, case.dtype)
        grads[param.name] = rnd(g, case.dtype)
    return AGCInputs(weights, grads)


def sync_inputs(case: SyncCase, rnd: Rounder = dtypes.cast) -> SyncInputs:
    """Draw ``gamma``, ``beta`` and each replica's slice and upstream gradient."""
    rng = np.random.default_rng(case.seed)
    gamma, beta = _params(rng, case.num_features, case.dtype, rnd)
    xs = tuple(rnd(rng.normal(size=(n, *case.shape)), case.dtype) for n in case.shards)
    dys = tuple(rnd(rng.normal(size=(n, *case.shape)), case.dtype) for n in case.shards)
    return SyncInputs(gamma, beta, xs, dys)


def error_input(case: ErrorCase, rnd: Rounder = dtypes.cast) -> np.ndarray:
    """The bad input of an error case (integers for an integer dtype)."""
    rng = np.random.default_rng(case.seed)
    if not case.dtype.startswith("float") and case.dtype != "bfloat16":
        return rng.integers(-5, 5, case.shape).astype(case.dtype)
    return rnd(rng.normal(size=case.shape), case.dtype)


@dataclasses.dataclass(frozen=True)
class WSInputs:
    """A Scaled WS convolution case's arrays: input ``(N, C, H, W)``, logical weight
    ``(O, C/groups, kh, kw)``, ``gain`` and ``bias`` ``(O,)``, upstream gradient ``dy``
    ``(N, O, H_out, W_out)``. Zero-size where an error case's sizes say so."""

    x: np.ndarray
    weight: np.ndarray
    gain: np.ndarray
    bias: np.ndarray
    dy: np.ndarray


def ws_inputs(case: WSCase, rnd: Rounder = dtypes.cast) -> WSInputs:
    """Draw input, weight, gain, bias and upstream gradient (in that order), rounded to
    the case's dtype.

    Example:
        >>> from unorm.conformance.cases import get_case
        >>> inputs = ws_inputs(get_case("ws/deepmind/constant-unit"))
        >>> bool(np.all(inputs.weight[0] == inputs.weight[0, 0, 0, 0]))
        True
    """
    rng = np.random.default_rng(case.seed)
    x = rng.normal(size=case.input_shape)
    w = rng.normal(0.5, 1.0, case.weight_shape) * case.weight_scale
    if case.constant_unit:
        w[0] = 0.75 * case.weight_scale  # its mean is exact in binary: var is exactly 0
    gain = rng.uniform(0.5, 1.5, case.out_channels)
    bias = rng.normal(0.0, 0.5, case.out_channels)
    dy = rng.normal(size=case.output_shape)
    return WSInputs(*(rnd(a, case.dtype) for a in (x, w, gain, bias, dy)))

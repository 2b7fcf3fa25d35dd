"""Expected values of every case, computed by :mod:`unorm.reference` at run time.

The reference runs in float64 on the (already rounded) inputs and the results are kept
in float64: they are the exact values a backend's results are compared with, and the
comparison then allows each quantity the tolerance of the dtype it is returned in.

Example:
    >>> from unorm.conformance.cases import get_case
    >>> from unorm.conformance.data import batchnorm_inputs
    >>> case = get_case("bn/seq/train3-eval")
    >>> steps = batchnorm_expected(case.spec(), batchnorm_inputs(case), case.steps)
    >>> [s.num_batches_tracked for s in steps]
    [1, 2, 3, 3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from unorm import reference as ref
from unorm.spec import BatchNormSpec

from .cases import AGCCase, Step, WSCase
from .data import AGCInputs, BatchNormInputs, SyncInputs, WSInputs, logical_unit_axes

__all__ = [
    "RENORM_STATE",
    "StepValues",
    "WSValues",
    "agc_expected",
    "agc_left_alone",
    "batchnorm_expected",
    "conv2d",
    "conv2d_backward",
    "sync_expected",
    "ws_expected",
]


@dataclasses.dataclass
class StepValues:
    """What one BatchNorm call returns and leaves behind; None where there is nothing.

    ``dx``, ``dgamma``, ``dbeta`` are None after a forward-only step (and ``dgamma`` /
    ``dbeta`` when ``scale`` / ``center`` is off); the buffers are None when the layer
    keeps no running statistics.
    """

    y: np.ndarray | None = None
    dx: np.ndarray | None = None
    dgamma: np.ndarray | None = None
    dbeta: np.ndarray | None = None
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    num_batches_tracked: int | None = None
    #: Batch Renormalization's statistics (``renorm=True`` only; SPEC.md section 2).
    renorm_mean: np.ndarray | None = None
    renorm_std: np.ndarray | None = None

    def quantities(self) -> dict[str, np.ndarray | int | None]:
        """Every field by name, in a fixed order."""
        return dataclasses.asdict(self)

    def take_state(self, state: StepValues) -> None:
        """Copy the state fields (running and renorm statistics, the counter) of
        ``state``, an adapter's ``bn_state``, into these values."""
        for name in ("running_mean", "running_var", "num_batches_tracked", *RENORM_STATE):
            setattr(self, name, getattr(state, name))


#: The state fields Batch Renormalization adds to :class:`StepValues`.
RENORM_STATE = ("renorm_mean", "renorm_std")


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def batchnorm_expected(
    spec: BatchNormSpec,
    inputs: BatchNormInputs,
    steps: Sequence[Step],
    mask: np.ndarray | None = None,
) -> list[StepValues]:
    """Step-by-step values of a layer configured by ``spec``: output, VJP, buffers;
    ``mask`` (the reference's form, :func:`conformance.data.batchnorm_mask`) in every step.

    Raises the reference's ``ValueError`` when ``spec`` makes a step invalid (one value
    per feature without ``allow_single_value``, a feature the mask keeps nothing of
    under ``fully_masked="error"``).
    """
    c = inputs.gamma.shape[0]
    if spec.renorm:
        return _renorm_expected(spec, inputs, steps)
    running = ref.init_running_stats(c) if spec.track_running_stats else None
    gamma = _f64(inputs.gamma) if spec.scale else None
    beta = _f64(inputs.beta) if spec.center else None
    out: list[StepValues] = []
    for step, x, dy in zip(steps, inputs.xs, inputs.dys, strict=True):
        x64 = _f64(x)
        training = step.mode != "eval"
        before = running
        # Non-finite batches give non-finite values; that is what the case checks.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            y, running = ref.batch_norm_step(
                x64,
                running,
                spec,
                gamma,
                beta,
                training=training,
                backward_ran=step.mode == "train",
                mask=mask,
            )
            values = StepValues(y=y)
            if dy is not None:
                eps, axis, center = spec.eps, spec.axis, spec.center
                if mask is not None and (training or before is None):
                    grads = ref.masked_batch_norm_backward(_f64(dy), x64, mask, gamma, spec=spec)
                elif training and spec.virtual_batch_size is not None and x64.size:
                    grads = ref.ghost_batch_norm_backward(_f64(dy), x64, gamma, spec=spec)
                elif training or before is None:
                    grads = ref.batch_norm_backward(
                        _f64(dy), x64, gamma, eps=eps, axis=axis, center=center
                    )
                else:
                    grads = ref.batch_norm_inference_backward(
                        _f64(dy), x64, before.mean, before.var, gamma,
                        eps=eps, axis=axis, center=center,
                    )  # fmt: skip
                values.dx, values.dgamma, values.dbeta = grads
        if running is not None:
            values.running_mean = _f64(running.mean)
            values.running_var = _f64(running.var)
            values.num_batches_tracked = running.num_batches_tracked
        out.append(values)
    return out


def _renorm_expected(
    spec: BatchNormSpec, inputs: BatchNormInputs, steps: Sequence[Step]
) -> list[StepValues]:
    """:func:`batchnorm_expected` of a layer with ``renorm=True`` (no mask: renorm cases
    have none): the reference's Batch Renormalization step by step."""
    c = inputs.gamma.shape[0]
    running, renorm = ref.init_running_stats(c), ref.RenormStats.initial(c, spec)
    gamma = _f64(inputs.gamma) if spec.scale else None
    beta = _f64(inputs.beta) if spec.center else None
    out: list[StepValues] = []
    for step, x, dy in zip(steps, inputs.xs, inputs.dys, strict=True):
        x64 = _f64(x)
        before, before_renorm = running, renorm
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            y, running, renorm = ref.batch_renorm_step(
                x64, running, renorm, spec, gamma, beta,
                training=step.mode != "eval", backward_ran=step.mode == "train",
            )  # fmt: skip
            values = StepValues(y=y)
            if dy is not None and step.mode == "eval":
                values.dx, values.dgamma, values.dbeta = ref.batch_norm_inference_backward(
                    _f64(dy), x64, before.mean, before.var, gamma,
                    eps=spec.eps, axis=spec.axis, center=spec.center,
                )  # fmt: skip
            elif dy is not None:
                stats = ref.batch_stats(x64, spec.axis)
                r, d = ref.renorm_correction(stats, before_renorm, spec)
                values.dx, values.dgamma, values.dbeta = ref.batch_renorm_backward(
                    _f64(dy), x64, r, d, gamma, eps=spec.eps, axis=spec.axis, center=spec.center
                )
        values.running_mean, values.running_var = _f64(running.mean), _f64(running.var)
        values.num_batches_tracked = running.num_batches_tracked
        values.renorm_mean, values.renorm_std = _f64(renorm.mean), _f64(renorm.std)
        out.append(values)
    return out


def agc_expected(case: AGCCase, inputs: AGCInputs) -> dict[str, np.ndarray]:
    """Clipped logical gradients of every parameter (float64 values of the exact result)."""
    axes = {p.name: logical_unit_axes(p) for p in case.params}
    with np.errstate(invalid="ignore", over="ignore"):
        out = ref.agc_clip_all(
            {k: _f64(g) for k, g in inputs.grads.items()},
            {k: _f64(w) for k, w in inputs.weights.items()},
            axes,
            clipping=case.clipping,
            eps=case.eps,
            exclude=case.exclude,
        )
    return {k: _f64(v) for k, v in out.items()}


def agc_left_alone(case: AGCCase, inputs: AGCInputs) -> dict[str, np.ndarray]:
    """Per parameter, the elements AGC must return unchanged, bit for bit: those of units
    the reference does not rescale, and every element of an excluded parameter."""
    out = {}
    for p in case.params:
        if p.name in case.exclude:
            out[p.name] = np.ones(inputs.grads[p.name].shape, bool)
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            clipped = ref.agc_clipped_units(
                _f64(inputs.grads[p.name]),
                _f64(inputs.weights[p.name]),
                logical_unit_axes(p),
                clipping=case.clipping,
                eps=case.eps,
            )
        out[p.name] = ~clipped
    return out


@dataclasses.dataclass
class SyncValues:
    """Cross-replica results: per-replica outputs and input gradients, summed parameter
    gradients and the (shared) running statistics after the step."""

    ys: list[np.ndarray]
    dxs: list[np.ndarray]
    step: StepValues


def sync_expected(spec: BatchNormSpec, inputs: SyncInputs) -> SyncValues:
    """Single-process values on the concatenated batch, split back per replica."""
    x = np.concatenate([_f64(a) for a in inputs.xs], axis=0)
    dy = np.concatenate([_f64(a) for a in inputs.dys], axis=0)
    batch = BatchNormInputs(inputs.gamma, inputs.beta, (x,), (dy,))
    (values,) = batchnorm_expected(spec, batch, [Step("train")])
    cuts = np.cumsum([a.shape[0] for a in inputs.xs])[:-1]
    assert values.y is not None and values.dx is not None
    return SyncValues(list(np.split(values.y, cuts)), list(np.split(values.dx, cuts)), values)


@dataclasses.dataclass
class WSValues:
    """What a Scaled WS convolution returns: output, and the gradients with respect to
    the input, the (logical ``(O, C/groups, kh, kw)``) weight, the gain and the bias."""

    y: np.ndarray | None = None
    dx: np.ndarray | None = None
    dweight: np.ndarray | None = None
    dgain: np.ndarray | None = None
    dbias: np.ndarray | None = None

    def quantities(self) -> dict[str, np.ndarray | None]:
        """Every field by name, in a fixed order."""
        return dataclasses.asdict(self)


def _grouped(
    x: np.ndarray, w: np.ndarray, groups: int, pads: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Padded input as ``(N, G, C/G, H', W')`` and weight as ``(G, O/G, C/G, kh, kw)``."""
    n, c = x.shape[:2]
    o = w.shape[0]
    (ph, pw) = pads
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    return xp.reshape(n, groups, c // groups, *xp.shape[2:]), w.reshape(
        groups, o // groups, *w.shape[1:]
    )


def conv2d(
    x: np.ndarray, w: np.ndarray, groups: int = 1, pads: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Cross-correlation of ``x`` ``(N, C, H, W)`` with ``w`` ``(O, C/groups, kh, kw)``
    (stride 1, zero padding ``pads``), as every framework's convolution computes it; one
    einsum per kernel offset, in float64.

    Example:
        >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
        >>> conv2d(x, np.ones((1, 1, 2, 2)))[0, 0].tolist()
        [[10.0, 14.0, 18.0], [26.0, 30.0, 34.0], [42.0, 46.0, 50.0]]
    """
    x, w = _f64(x), _f64(w)
    xg, wg = _grouped(x, w, groups, pads)
    kh, kw = w.shape[2:]
    ho, wo = xg.shape[3] - kh + 1, xg.shape[4] - kw + 1
    y = np.zeros((x.shape[0], groups, w.shape[0] // groups, ho, wo))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("ngchw,goc->ngohw", xg[..., i : i + ho, j : j + wo], wg[..., i, j])
    return y.reshape(x.shape[0], w.shape[0], ho, wo)


def conv2d_backward(
    dy: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    groups: int = 1,
    pads: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`conv2d`: ``(dx, dw)`` for upstream ``dy``.

    Example:
        >>> x, w = np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))
        >>> dx, dw = conv2d_backward(np.ones((1, 1, 2, 2)), x, w)
        >>> dx[0, 0].tolist(), dw[0, 0].tolist()
        ([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], [[4.0, 4.0], [4.0, 4.0]])
    """
    x, w, dy = _f64(x), _f64(w), _f64(dy)
    xg, wg = _grouped(x, w, groups, pads)
    kh, kw = w.shape[2:]
    ho, wo = dy.shape[2:]
    dyg = dy.reshape(dy.shape[0], groups, w.shape[0] // groups, ho, wo)
    dxg = np.zeros_like(xg)
    dwg = np.zeros_like(wg)
    for i in range(kh):
        for j in range(kw):
            window = (..., slice(i, i + ho), slice(j, j + wo))
            dxg[window] += np.einsum("ngohw,goc->ngchw", dyg, wg[..., i, j])
            dwg[..., i, j] = np.einsum("ngohw,ngchw->goc", dyg, xg[window])
    (ph, pw), (h, wd) = pads, x.shape[2:]
    dx = dxg.reshape(x.shape[0], x.shape[1], *dxg.shape[3:])[..., ph : ph + h, pw : pw + wd]
    return dx, dwg.reshape(w.shape)


def ws_expected(case: WSCase, inputs: WSInputs) -> WSValues:
    """Output and gradients of ``conv(x, scaled_weight_standardize(W, gain)) + bias``:
    the standardisation by :mod:`unorm.reference` (unit axis 0 of the logical weight),
    the convolution by :func:`conv2d`, ``dW`` and ``dgain`` by
    ``scaled_weight_standardize_backward`` of the convolution's weight gradient."""
    spec = case.spec()
    w, gain = _f64(inputs.weight), _f64(inputs.gain)
    w_hat = ref.scaled_weight_standardize(w, gain, 0, style=spec.style, eps=spec.eps)
    y = conv2d(inputs.x, w_hat, case.groups, case.pads)
    y += _f64(inputs.bias).reshape(1, -1, 1, 1)
    dy = _f64(inputs.dy)
    dx, dw_hat = conv2d_backward(dy, inputs.x, w_hat, case.groups, case.pads)
    with np.errstate(over="ignore"):  # a constant unit's unused branch of np.where
        dw, dgain = ref.scaled_weight_standardize_backward(
            dw_hat, w, gain, 0, style=spec.style, eps=spec.eps
        )
    return WSValues(y=y, dx=dx, dweight=dw, dgain=dgain, dbias=dy.sum(axis=(0, 2, 3)))

"""Expected values of every case, computed by :mod:`unorm.reference` at run time.

The reference runs in float64 on the (already rounded) inputs and the results are kept
in float64: they are the exact values a backend's results are compared with, and the
comparison then allows each quantity the tolerance of the dtype it is returned in.

Example:
    >>> from conformance.cases import get_case
    >>> from conformance.data import batchnorm_inputs
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

from .cases import AGCCase, Step
from .data import AGCInputs, BatchNormInputs, SyncInputs, logical_unit_axes

__all__ = [
    "StepValues",
    "agc_expected",
    "batchnorm_expected",
    "sync_expected",
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

    def quantities(self) -> dict[str, np.ndarray | int | None]:
        """Every field by name, in a fixed order."""
        return dataclasses.asdict(self)


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def batchnorm_expected(
    spec: BatchNormSpec, inputs: BatchNormInputs, steps: Sequence[Step]
) -> list[StepValues]:
    """Step-by-step values of a layer configured by ``spec``: output, VJP, buffers.

    Raises the reference's ``ValueError`` when ``spec`` makes a step invalid (one value
    per feature without ``allow_single_value``).
    """
    c = inputs.gamma.shape[0]
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
            )
            values = StepValues(y=y)
            if dy is not None:
                kw = {"eps": spec.eps, "axis": spec.axis, "center": spec.center}
                if training or before is None:
                    grads = ref.batch_norm_backward(_f64(dy), x64, gamma, **kw)
                else:
                    grads = ref.batch_norm_inference_backward(
                        _f64(dy), x64, before.mean, before.var, gamma, **kw
                    )
                values.dx, values.dgamma, values.dbeta = grads
        if running is not None:
            values.running_mean = _f64(running.mean)
            values.running_var = _f64(running.var)
            values.num_batches_tracked = running.num_batches_tracked
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

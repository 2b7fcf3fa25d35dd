"""The reference's self-check: ``unorm selfcheck``.

Checks :mod:`unorm.reference` against independent arithmetic, so that a broken NumPy,
a platform quirk or an edit to the reference shows up before any backend is compared
with it: gradients against central finite differences (ranks 2-5, both feature-axis
positions, affine on and off), the exact cross-replica merge against the concatenated
batch, the running-statistics rules and AGC's invariants. Each check prints one line;
the process fails if any check does.

Example:
    >>> results = run_checks()
    >>> all(r.passed for r in results)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import reference as ref

__all__ = ["CheckResult", "finite_difference_grads", "main", "run_checks"]


class CheckResult(NamedTuple):
    """One self-check: its name, the largest error seen, the tolerance, and the verdict."""

    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """True when ``error`` is within ``tolerance`` (and not NaN)."""
        return bool(self.error <= self.tolerance)


def finite_difference_grads(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    dy: np.ndarray,
    *,
    eps: float,
    axis: int,
    step: float = 1e-6,
) -> list[np.ndarray]:
    """Central finite differences of ``sum(dy * batch_norm_train(x, gamma, beta))``.

    Returns ``[dx, dgamma, dbeta]`` (entries for absent parameters omitted).
    """

    def _with(
        which: int, value: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        args = [x, gamma, beta]
        args[which] = value
        return args[0] if args[0] is not None else x, args[1], args[2]

    def loss(xv: np.ndarray, gv: np.ndarray | None, bv: np.ndarray | None) -> float:
        y, _ = ref.batch_norm_train(xv, gv, bv, eps=eps, axis=axis)
        return float((dy * y).sum())

    def numeric(which: int, base: np.ndarray) -> np.ndarray:
        grad = np.zeros_like(base)
        for i in np.ndindex(*base.shape):
            plus, minus = base.copy(), base.copy()
            plus[i] += step
            minus[i] -= step
            hi = loss(*_with(which, plus))
            lo = loss(*_with(which, minus))
            grad[i] = (hi - lo) / (2 * step)
        return grad

    out = [numeric(0, x)]
    if gamma is not None:
        out.append(numeric(1, gamma))
    if beta is not None:
        out.append(numeric(2, beta))
    return out


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.abs(b).max()), 1e-12)
    return float(np.abs(a - b).max()) / scale


def _gradient_checks(rng: np.random.Generator) -> list[CheckResult]:
    results = []
    for shape in [(4, 3), (3, 2, 5), (2, 3, 3, 2), (2, 2, 2, 2, 3)]:
        for axis in (1, -1):
            for affine in (True, False):
                x = rng.normal(1.0, 2.0, shape)
                channels = shape[axis]
                gamma = rng.uniform(0.5, 2.0, channels) if affine else None
                beta = rng.normal(size=channels) if affine else None
                dy = rng.normal(size=shape)
                got = ref.batch_norm_backward(dy, x, gamma, eps=1e-3, axis=axis, center=affine)
                want = finite_difference_grads(x, gamma, beta, dy, eps=1e-3, axis=axis)
                analytic = [got.dx] + ([got.dgamma, got.dbeta] if affine else [])
                error = max(
                    _rel_error(np.asarray(a), w) for a, w in zip(analytic, want, strict=True)
                )
                name = f"backward vs finite differences {shape} axis={axis} affine={affine}"
                results.append(CheckResult(name, error, 1e-6))
    return results


def _merge_checks(rng: np.random.Generator) -> list[CheckResult]:
    x = rng.normal(1e4, 1.0, (11, 4, 3))
    whole = ref.batch_stats(x, axis=1)
    splits = np.split(x, [3, 3, 10])  # shards of 3, 0, 7 and 1 examples
    merged = ref.merge_stats([ref.batch_stats(s, axis=1) for s in splits])
    error = max(
        float(abs(merged.count - whole.count)),
        _rel_error(merged.mean, whole.mean),
        _rel_error(merged.m2, whole.m2),
    )
    return [CheckResult("merge of uneven shards (3, 0, 7, 1) equals the whole batch", error, 1e-12)]


def _running_checks(rng: np.random.Generator) -> list[CheckResult]:
    batches = [rng.normal(size=(5, 2)) for _ in range(4)]
    state = ref.init_running_stats(2)
    for b in batches:
        state = ref.update_running_stats(state, ref.batch_stats(b, axis=1), momentum=None)
    cumulative = np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0)
    results = [
        CheckResult(
            "momentum=None is the cumulative average", _rel_error(state.var, cumulative), 1e-12
        )
    ]
    x = batches[0]
    for unbiased, ddof in ((True, 1), (False, 0)):
        new = ref.update_running_stats(
            ref.init_running_stats(2), ref.batch_stats(x, axis=1), momentum=1.0, unbiased=unbiased
        )
        name = f"running variance fed with ddof={ddof} (unbiased={unbiased})"
        results.append(CheckResult(name, _rel_error(new.var, x.var(axis=0, ddof=ddof)), 1e-12))
    return results


def _agc_checks(rng: np.random.Generator) -> list[CheckResult]:
    w = rng.normal(size=(8, 3, 3, 3))
    g = rng.normal(size=w.shape) * rng.uniform(0.0, 0.05, (8, 1, 1, 1))
    out = ref.agc_clip(g, w, 0, clipping=0.01)
    g_norm = np.sqrt((g**2).sum(axis=(1, 2, 3)))
    out_norm = np.sqrt((out**2).sum(axis=(1, 2, 3)))
    limit = 0.01 * np.maximum(np.sqrt((w**2).sum(axis=(1, 2, 3))), 1e-3)
    under = g_norm <= limit
    unchanged = float(np.abs(out[under] - g[under]).max()) if under.any() else 0.0
    at_limit = float(np.abs(out_norm[~under] - limit[~under]).max()) if (~under).any() else 0.0
    return [
        CheckResult("AGC leaves units under the threshold unchanged", unchanged, 0.0),
        CheckResult("AGC sets clipped units' norm to the threshold", at_limit, 1e-12),
        CheckResult(
            "AGC never raises a unit's norm", float(np.maximum(out_norm - g_norm, 0).max()), 0.0
        ),
    ]


CHECKS: list[Callable[[np.random.Generator], list[CheckResult]]] = [
    _gradient_checks,
    _merge_checks,
    _running_checks,
    _agc_checks,
]


def run_checks(seed: int = 0) -> list[CheckResult]:
    """Run every self-check with a fixed ``seed`` and return the results."""
    rng = np.random.default_rng(seed)
    return [result for check in CHECKS for result in check(rng)]


def main() -> int:
    """Print one line per check and return 0 when all pass, 1 otherwise."""
    results = run_checks()
    for r in results:
        mark = "ok  " if r.passed else "FAIL"
        print(f"{mark} {r.error:9.2e} <= {r.tolerance:7.1e}  {r.name}")
    failed = sum(not r.passed for r in results)
    passed = len(results) - failed
    print(f"reference self-check: {passed} passed, {failed} failed (numpy {np.__version__})")
    return 1 if failed else 0

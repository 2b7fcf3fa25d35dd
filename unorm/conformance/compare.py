"""Comparing a backend's array with the expected one, and the error measures reported.

For every quantity the suite records:

- ``max_abs``: the largest ``|actual - expected|``;
- ``max_rel``: ``max_abs`` divided by the largest ``|expected|`` (normwise relative error);
- ``ulps``: ``max_abs`` in units in the last place of the largest ``|expected|`` in the
  quantity's dtype;
- ``score``: the largest ratio of an element's error to what the tolerance allows it
  (``<= 1`` passes), which the heat-map shows.

Non-finite values must sit where the expected ones do. ``nonfinite="exact"`` also requires
the same value (NaN for NaN, +inf for +inf: AGC must return them untouched);
``"mask"`` only requires non-finiteness (BatchNorm over a NaN batch may give inf or NaN).

``exact`` marks elements that must come back bit for bit (value and sign of zero),
whatever the tolerance: AGC returns the gradients it leaves alone unchanged (``SPEC.md``
section 5), so an element whose expected value is its input gradient allows no error.
An element off there scores infinity.

Example:
    >>> import numpy as np
    >>> from unorm.conformance.tolerance import TABLE
    >>> c = compare("y", np.float32([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6]), "float32",
    ...             TABLE["float32"])
    >>> c.ok, round(c.ulps, 1)
    (True, 4.2)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

from . import dtypes
from .tolerance import Tolerance

__all__ = ["Comparison", "compare"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The outcome of one quantity's comparison (see the module docstring)."""

    quantity: str
    ok: bool
    max_abs: float
    max_rel: float
    ulps: float
    score: float
    note: str = ""

    def describe(self) -> str:
        """One line: the quantity, its errors, and what went wrong if it failed."""
        errors = (
            f"{self.quantity}: max abs err {self.max_abs:.3g} "
            f"(rel {self.max_rel:.3g}, {self.ulps:.3g} ulp, {self.score:.3g}x tolerance)"
        )
        return f"{errors}; {self.note}" if self.note else errors


def _failed(quantity: str, note: str) -> Comparison:
    inf = math.inf
    return Comparison(quantity, False, inf, inf, inf, inf, note)


def compare(
    quantity: str,
    actual: object,
    expected: object,
    dtype: str,
    tol: Tolerance,
    nonfinite: Literal["exact", "mask"] = "exact",
    exact: np.ndarray | None = None,
) -> Comparison:
    """Compare ``actual`` (any array-like) with ``expected`` under ``tol`` for ``dtype``;
    ``exact``, a boolean mask of ``expected``'s shape, marks elements allowed no error.

    Example:
        >>> one_ulp = np.float32(1) + np.float32(2**-23)
        >>> tol = Tolerance(rtol=1e-3, scaled_atol=0.0)
        >>> compare("g", [one_ulp], [1.0], "float32", tol).ok
        True
        >>> compare("g", [one_ulp], [1.0], "float32", tol, exact=np.array([True])).note
        '1 of 1 values that must come back unchanged differ'
    """
    if actual is None:
        return _failed(quantity, "the backend returned nothing")
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return _failed(quantity, f"shape {a.shape} where {e.shape} was expected")
    fin_a, fin_e = np.isfinite(a), np.isfinite(e)
    bad = fin_a != fin_e
    if nonfinite == "exact":
        same = (np.isnan(a) & np.isnan(e)) | (a == e)
        bad |= ~fin_e & ~same
    if bad.any():
        return _failed(quantity, f"non-finite values differ at {int(bad.sum())} of {a.size}")
    if not fin_e.any():
        return Comparison(quantity, True, 0.0, 0.0, 0.0, 0.0)
    af, ef = a[fin_e], e[fin_e]
    diff = np.abs(af - ef)
    scale = float(np.max(np.abs(ef)))
    if tol.max_ulps is not None:
        allowed = tol.max_ulps * dtypes.ulp(ef, dtype)
    else:
        allowed = tol.rtol * np.abs(ef) + tol.scaled_atol * scale + tol.atol
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
    note = ""
    if exact is not None:
        strict = np.broadcast_to(np.asarray(exact, dtype=bool), e.shape)[fin_e]
        # -0.0 == 0.0, so the sign bit is compared separately: bit for bit means both.
        changed = strict & ((diff != 0) | (np.signbit(af) != np.signbit(ef)))
        if changed.any():
            ratio = np.where(changed, math.inf, ratio)
            note = (
                f"{int(changed.sum())} of {int(strict.sum())} values that must come back "
                "unchanged differ"
            )
    max_abs = float(diff.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ulps = max_abs / float(dtypes.ulp(scale, dtype))
    score = float(ratio.max())
    return Comparison(quantity, bool(score <= 1.0), max_abs, max_rel, ulps, score, note)

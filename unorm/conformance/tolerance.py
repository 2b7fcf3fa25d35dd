"""The suite's tolerances: one per-dtype table, and per-case overrides with a reason.

A quantity returned in dtype ``d`` passes when every element satisfies

    |actual - expected| <= rtol * |expected| + scaled_atol * max|expected| + atol

with ``(rtol, scaled_atol)`` from :data:`TABLE` (``scaled_atol`` is relative to the
quantity's largest magnitude, because the rounding errors of reductions grow with it, not
with each element; ``atol``, an absolute floor, is 0 there). A tolerance with ``max_ulps``
instead requires every element to be within that many units in the last place of its
expected value. Whatever the tolerance, AGC values whose expected value is the input
gradient itself (units left unclipped, excluded parameters) must match bit for bit
(``exact`` in :func:`conformance.compare.compare`).

Overrides are looked up by case name (shell-style patterns); every override carries the
reason it exists, and a pattern that matches no case is an error (tested).

Example:
    >>> tolerance_for("bn/rank2", "float32")
    Tolerance(rtol=2e-05, scaled_atol=2e-05, atol=0.0, max_ulps=None)
    >>> tolerance_for("agc/threshold", "float32").max_ulps
    1.0
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping

from . import dtypes

__all__ = [
    "EXACT",
    "OVERRIDES",
    "TABLE",
    "Override",
    "Tolerance",
    "check_overrides",
    "tolerance_for",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Allowed error: elementwise ``rtol``, ``scaled_atol`` times the largest expected
    magnitude, an absolute floor ``atol``; or (when set) ``max_ulps`` units in the last
    place per element."""

    rtol: float
    scaled_atol: float
    atol: float = 0.0
    max_ulps: float | None = None

    def describe(self) -> str:
        """A short human-readable form, e.g. ``rtol 2e-05, atol 2e-05 x max|expected|``."""
        if self.max_ulps is not None:
            return f"{self.max_ulps:g} ulp per element"
        text = f"rtol {self.rtol:.0e}, atol {self.scaled_atol:.0e} x max|expected|"
        return text + (f" + {self.atol:.0e}" if self.atol else "")


#: One entry per dtype, set from the dtype's precision: about 170 ulps for float32
#: (reductions over thousands of values), 2 ulps for the 16-bit formats (one rounding of a
#: value computed in float32, plus one of the input's own rounding in the gradient), and
#: float64 loose enough for a different summation order over 10^4 values.
TABLE: Mapping[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-10, scaled_atol=1e-10),
    "float32": Tolerance(rtol=2e-5, scaled_atol=2e-5),
    "float16": Tolerance(rtol=2e-3, scaled_atol=2e-3),
    "bfloat16": Tolerance(rtol=1.6e-2, scaled_atol=1.6e-2),
}

#: Counters (``num_batches_tracked``) and values returned untouched must match exactly.
EXACT = Tolerance(rtol=0.0, scaled_atol=0.0)


@dataclasses.dataclass(frozen=True)
class Override:
    """Tolerances for the cases matching ``pattern``, per dtype, and why they differ."""

    pattern: str
    tolerances: Mapping[str, Tolerance]
    reason: str


OVERRIDES: tuple[Override, ...] = (
    Override(
        "bn/constant",
        {"float32": Tolerance(rtol=2e-4, scaled_atol=2e-4, atol=2e-3)},
        "A feature with zero variance is normalised by 1/sqrt(eps) ~ 316, so one ulp of "
        "rounding in its mean (2.4e-7 at 3.5) becomes ~1e-4 in y and dx, and dgamma, exactly "
        "0 here, gets ~1e-4 times sum|dy|; a wrong mean or variance is off by orders more.",
    ),
    Override(
        "bn/preset-*/single-value",
        {"float32": Tolerance(rtol=2e-4, scaled_atol=2e-4, atol=2e-3)},
        "One value per feature has zero variance: as for bn/constant, one ulp of rounding in "
        "the mean is multiplied by 1/sqrt(eps) (316 with the mxnet preset's eps 1e-5).",
    ),
    Override(
        "bn/large-offset",
        {"float32": Tolerance(rtol=3e-3, scaled_atol=3e-3)},
        "Values near 1e4 are stored with an ulp of ~1e-3 and the float32 mean of 1024 of "
        "them carries an error of that order, so y = (x - mean)/std with std 1 is only "
        "~1e-3 close in float32 with an unshifted two-pass algorithm (SPEC.md section 2, numerics: "
        "PyTorch's Welford reaches 8e-4; unorm.keras, shifting first, 2e-7); "
        "E[x^2]-E[x]^2 gives ~1e-2 and still fails.",
    ),
    Override(
        "bn/tiny-variance",
        {"float32": Tolerance(rtol=1e-4, scaled_atol=1e-4)},
        "x - mean of values 0.5 +- 1e-3 keeps only ~13 of float32's 24 bits before it is "
        "scaled by 1/sqrt(var + eps) ~ 300: 1e-4 of the output's scale is two-pass float32 "
        "accuracy here.",
    ),
    Override(
        "agc/threshold*",
        {
            "float32": Tolerance(rtol=0.0, scaled_atol=0.0, max_ulps=1.0),
            "float64": Tolerance(rtol=0.0, scaled_atol=0.0, max_ulps=1.0),
        },
        "Units just above the threshold are clipped by a factor within 2^-18 of 1; a "
        "backend computing the norm and the factor in the gradient's dtype may round them "
        "to either side, which changes a clipped value by at most one ulp. Anything larger "
        "is a wrong threshold or a wrong unit axis. Units at and under the threshold must "
        "come back unchanged, compared bit for bit whatever this tolerance says "
        "(execute.py: every AGC value whose expected value is its input gradient).",
    ),
)


def tolerance_for(case_name: str, dtype: str) -> Tolerance:
    """The tolerance of a ``dtype`` quantity in case ``case_name``: an override if one
    matches (the first), the table's entry otherwise.

    Raises ``ValueError`` for a dtype the table does not know.
    """
    if dtype not in TABLE:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {', '.join(dtypes.DTYPES)}")
    for override in OVERRIDES:
        if fnmatch.fnmatchcase(case_name, override.pattern) and dtype in override.tolerances:
            return override.tolerances[dtype]
    return TABLE[dtype]


def check_overrides(case_names: Iterable[str], overrides: Iterable[Override] = OVERRIDES) -> None:
    """Raise ``ValueError`` for an override that matches no case or gives no reason."""
    names = list(case_names)
    for override in overrides:
        if not override.reason.strip():
            raise ValueError(f"tolerance override {override.pattern!r} gives no reason")
        if not any(fnmatch.fnmatchcase(n, override.pattern) for n in names):
            raise ValueError(f"tolerance override {override.pattern!r} matches no case")
        unknown = set(override.tolerances) - set(TABLE)
        if unknown:
            raise ValueError(f"tolerance override {override.pattern!r} names dtypes {unknown}")

"""The tolerance table, its overrides, and the comparison that applies them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unorm.conformance import tolerance
from unorm.conformance.cases import all_cases
from unorm.conformance.compare import compare
from unorm.conformance.tolerance import (
    EXACT,
    TABLE,
    Override,
    Tolerance,
    check_overrides,
    tolerance_for,
)

NAMES = [c.name for c in all_cases()]


def test_table_has_every_dtype_and_widens_with_precision() -> None:
    assert list(TABLE) == ["float64", "float32", "float16", "bfloat16"]
    rtols = [TABLE[d].rtol for d in TABLE]
    assert rtols == sorted(rtols)


def test_lookup_uses_the_table_unless_an_override_matches() -> None:
    assert tolerance_for("bn/rank2", "float32") == TABLE["float32"]
    assert tolerance_for("bn/rank2", "bfloat16") == TABLE["bfloat16"]
    wide = tolerance_for("bn/large-offset", "float32")
    assert wide.rtol > TABLE["float32"].rtol
    # An override for one dtype leaves the others at the table's value.
    assert tolerance_for("bn/large-offset", "float64") == TABLE["float64"]
    assert tolerance_for("agc/threshold/conv_transpose", "float32").max_ulps == 1.0


def test_unknown_dtype_is_an_error() -> None:
    with pytest.raises(ValueError, match="no tolerance for dtype 'int8'"):
        tolerance_for("bn/rank2", "int8")


def test_every_override_matches_a_case_and_gives_a_reason() -> None:
    check_overrides(NAMES)
    assert all(len(o.reason) > 40 for o in tolerance.OVERRIDES)


def test_an_override_matching_no_case_is_an_error() -> None:
    stale = Override("bn/gone", {"float32": TABLE["float32"]}, "was needed once")
    with pytest.raises(ValueError, match="'bn/gone' matches no case"):
        check_overrides(NAMES, [stale])
    silent = Override("bn/rank2", {"float32": TABLE["float32"]}, "  ")
    with pytest.raises(ValueError, match="gives no reason"):
        check_overrides(NAMES, [silent])


def test_compare_measures_errors() -> None:
    want = np.array([1.0, -2.0, 4.0])
    got = want + np.array([0.0, 0.0, 4e-5])
    c = compare("y", got, want, "float32", TABLE["float32"])
    assert c.max_abs == pytest.approx(4e-5)
    assert c.max_rel == pytest.approx(1e-5)  # relative to the largest |expected|
    assert c.ulps == pytest.approx(4e-5 / 2.0**-21)
    assert c.score == pytest.approx(4e-5 / (2e-5 * 4 + 2e-5 * 4))
    assert c.ok
    bad = compare("y", want + np.array([0.0, 0.0, 1e-3]), want, "float32", TABLE["float32"])
    assert not bad.ok and bad.score > 1
    assert "y: max abs err 0.001" in bad.describe()


def test_scaled_atol_follows_the_largest_magnitude() -> None:
    # A near-zero element may be off by a fraction of the quantity's scale...
    want = np.array([1000.0, 1e-6])
    assert compare("dx", want + np.array([0.0, 1e-2]), want, "float32", TABLE["float32"]).ok
    # ...but a quantity that is small everywhere is judged at its own scale.
    tiny = np.array([1e-7, -2e-7])
    assert not compare("g", tiny * 1.01, tiny, "float32", TABLE["float32"]).ok


def test_nonfinite_values_must_match() -> None:
    want = np.array([np.nan, np.inf, 1.0])
    assert compare("g", want.copy(), want, "float32", EXACT).ok
    swapped = np.array([np.inf, np.inf, 1.0])
    assert not compare("g", swapped, want, "float32", EXACT).ok
    assert compare("y", swapped, want, "float32", EXACT, nonfinite="mask").ok
    finite = np.array([0.0, np.inf, 1.0])
    c = compare("y", finite, want, "float32", EXACT, nonfinite="mask")
    assert not c.ok and "non-finite values differ at 1 of 3" in c.note


def test_exact_and_ulp_tolerances() -> None:
    assert compare("n", 3, 3, "float64", EXACT).ok
    assert not compare("n", 4, 3, "float64", EXACT).ok
    one_ulp = Tolerance(0.0, 0.0, max_ulps=1.0)
    x = np.float32(1.5)
    up = np.nextafter(x, np.float32(2))
    assert compare("g", [up], [float(x)], "float32", one_ulp).ok
    assert not compare("g", [np.nextafter(up, np.float32(2))], [float(x)], "float32", one_ulp).ok


def test_missing_or_misshapen_results_fail() -> None:
    c = compare("y", None, np.ones(2), "float32", TABLE["float32"])
    assert not c.ok and math.isinf(c.score) and "returned nothing" in c.note
    c = compare("y", np.ones(3), np.ones(2), "float32", TABLE["float32"])
    assert not c.ok and "shape (3,)" in c.note


def test_exact_elements_allow_no_error_whatever_the_tolerance() -> None:
    want = np.array([1.5, 0.0, 3.0])
    exact = np.array([True, True, False])
    one_ulp_up = float(np.nextafter(np.float32(1.5), np.float32(2)))
    assert compare("g", want.copy(), want, "float32", TABLE["float32"], exact=exact).ok
    # One float32 ulp on an exact element fails; the same 1e-7 on the other one passes.
    off = compare("g", [one_ulp_up, 0.0, 3.0], want, "float32", TABLE["float32"], exact=exact)
    assert not off.ok and math.isinf(off.score)
    assert off.note == "1 of 2 values that must come back unchanged differ"
    assert compare("g", [1.5, 0.0, 3.0 + 1e-7], want, "float32", TABLE["float32"], exact=exact).ok
    # Bit for bit includes the sign of zero.
    signed = compare("g", [1.5, -0.0, 3.0], want, "float32", TABLE["float32"], exact=exact)
    assert not signed.ok and signed.max_abs == 0.0

"""The conformance suite's declared cases: unique names, fixed seeds, full coverage, and
expected values that the reference computes for every one of them."""

from __future__ import annotations

import doctest
import importlib
import re

import numpy as np
import pytest

from conformance import cases, data, dtypes, expected
from conformance.cases import (
    PUBLIC_SETTINGS,
    AGCCase,
    BatchNormCase,
    ErrorCase,
    SyncCase,
    all_cases,
    get_case,
    seed_of,
    select,
)

CASES = all_cases()


def test_names_are_unique_and_well_formed() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"(bn|agc|sync|error)/[a-z0-9_.\-/]+", name), name


def test_seeds_are_fixed_and_distinct() -> None:
    assert all(c.seed == seed_of(c.name) for c in CASES)
    assert len({c.seed for c in CASES}) == len(CASES)
    # The seed is the name's CRC-32: the same in every process and Python version.
    assert seed_of("bn/rank2") == 3598769915


def test_inputs_are_reproducible() -> None:
    for case in select(["bn/seq/train3-eval", "agc/network", "sync/uneven"]):
        draw = {
            "batchnorm": data.batchnorm_inputs,
            "agc": data.agc_inputs,
            "sync": data.sync_inputs,
        }[case.kind]
        first, second = draw(case), draw(case)  # type: ignore[operator]
        for a, b in zip(_arrays(first), _arrays(second), strict=True):
            np.testing.assert_array_equal(a, b)


def _arrays(inputs: object) -> list[np.ndarray]:
    out = []
    for value in vars(inputs).values():
        items = value.values() if isinstance(value, dict) else value
        items = items if isinstance(items, (tuple, list, type({}.values()))) else [items]
        out += [np.asarray(v) for v in items if v is not None]
    return out


def test_batchnorm_coverage() -> None:
    bn = [c for c in CASES if isinstance(c, BatchNormCase)]
    assert {len(c.shape) for c in bn} == {2, 3, 4, 5}
    for rank in (3, 4, 5):
        axes = {c.axis % rank for c in bn if len(c.shape) == rank}
        assert {1, rank - 1} <= axes, rank
    assert {c.shape[0] for c in bn} >= {1, 2, 7, 256, 1024}
    assert {c.dtype for c in bn} == set(dtypes.DTYPES)
    assert {c.preset for c in bn} == {None, "torch", "keras", "mxnet"}
    settings = {k: v for c in bn for k, v in c.settings}
    assert settings.keys() == set(PUBLIC_SETTINGS)
    assert any(s.nonfinite for c in bn for s in c.steps)
    assert {s.mode for c in bn for s in c.steps} == {"train", "forward", "eval"}
    assert any(c.data.constant for c in bn)


def test_batchnorm_cases_use_only_public_settings() -> None:
    # Every backend's constructor takes these; the rest comes from a preset.
    for case in CASES:
        if isinstance(case, (BatchNormCase, SyncCase)):
            assert {k for k, _ in case.settings} <= set(PUBLIC_SETTINGS), case.name


def test_agc_coverage() -> None:
    agc = [c for c in CASES if isinstance(c, AGCCase)]
    params = [p for c in agc for p in c.params]
    assert {len(p.shape) for p in params} == {0, 1, 2, 3, 4, 5}
    assert {p.kind for p in params} == set(cases.LOGICAL_UNIT_AXES)
    kinds_by_rank = {(p.kind, len(p.shape)) for p in params}
    for kind, rank in [("conv", 5), ("conv_transpose", 5), ("depthwise_conv", 4)]:
        assert (kind, rank) in kinds_by_rank
    recipes = {p.recipe for p in params}
    assert {"zero_weight", "zero_grad", "threshold", "nonfinite_grad"} <= recipes
    assert any(c.exclude for c in agc)


def test_sync_and_error_coverage() -> None:
    sync = [c for c in CASES if isinstance(c, SyncCase)]
    assert any(0 in c.shards for c in sync)
    assert any(len(set(c.shards)) > 1 for c in sync)
    errors = {c.name for c in CASES if isinstance(c, ErrorCase)}
    assert {"error/rank1", "error/wrong-features", "error/integer-input"} <= errors
    assert {"error/unknown-preset", "error/one-value-per-feature"} <= errors


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "batchnorm"], ids=str)
def test_reference_computes_every_batchnorm_case(case: BatchNormCase) -> None:
    inputs = data.batchnorm_inputs(case)
    steps = expected.batchnorm_expected(case.spec(), inputs, case.steps)
    assert len(steps) == len(case.steps)
    assert steps[0].y is not None and steps[0].y.shape == case.shape


def test_threshold_units_sit_exactly_on_the_threshold() -> None:
    case = get_case("agc/threshold")
    assert isinstance(case, AGCCase)
    inputs = data.agc_inputs(case)
    w, g = inputs.weights["fc.weight"], inputs.grads["fc.weight"]
    w_norm = np.linalg.norm(w.astype(np.float64), axis=1)
    g_norm = np.linalg.norm(g.astype(np.float64), axis=1)
    ratio = g_norm / (case.clipping * w_norm)
    assert ratio[0] == 1.0 and 1.0 < ratio[1] < 1.0 + 2.0**-17 and ratio[2] < 1.0
    got = expected.agc_expected(case, inputs)["fc.weight"]
    np.testing.assert_array_equal(got[[0, 2]], g[[0, 2]])  # at or below: untouched


def test_get_case_and_select() -> None:
    assert get_case("bn/rank2").name == "bn/rank2"
    with pytest.raises(KeyError, match="no conformance case"):
        get_case("bn/nope")
    assert [c.name for c in select(["error/rank*"])] == ["error/rank1"]
    assert len(select(None)) == len(CASES)


def test_dtype_helpers() -> None:
    assert dtypes.round_bfloat16(np.array([1.0 + 2.0**-8], np.float32))[0] == 1.0  # tie: even
    assert dtypes.round_bfloat16(np.array([1.0 + 3 * 2.0**-9], np.float32))[0] == 1.0 + 2.0**-7
    assert np.isnan(dtypes.round_bfloat16(np.array([np.nan], np.float32))[0])
    assert float(dtypes.ulp(1.0, "bfloat16")) == 2.0**-7
    assert float(dtypes.ulp(0.0, "float32")) == 2.0**-149
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtypes.ulp(1.0, "float8")


@pytest.mark.parametrize(
    "module",
    [
        "conformance.cases",
        "conformance.compare",
        "conformance.data",
        "conformance.dtypes",
        "conformance.execute",
        "conformance.expected",
        "conformance.exchange",
        "conformance.heatmap",
        "conformance.layouts",
        "conformance.report",
        "conformance.results",
        "conformance.runner",
        "conformance.tolerance",
        "conformance.worker",
        "conformance.xfail",
    ],
)
def test_docstring_examples(module: str) -> None:
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(importlib.import_module(module), optionflags=flags)
    assert result.failed == 0

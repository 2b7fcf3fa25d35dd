"""The conformance suite's declared cases: unique names, fixed seeds, full coverage, and
expected values that the reference computes for every one of them."""

from __future__ import annotations

import doctest
import importlib
import re

import numpy as np
import pytest

from unorm._core.registry import plugins_in_order
from unorm.conformance import cases, data, dtypes, expected
from unorm.conformance.cases import (
    MODE_SETTINGS,
    PUBLIC_SETTINGS,
    AGCCase,
    BatchNormCase,
    ErrorCase,
    SyncCase,
    WSCase,
    all_cases,
    get_case,
    seed_of,
    select,
)

CASES = all_cases()


KINDS = r"(bn|renorm|ghost|agc|sync|error|ws|fold|recalibrate|frozen|accumulate)"


def test_names_are_unique_and_well_formed() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(KINDS + r"/[a-z0-9_.\-/]+", name), name


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
    assert {c.preset for c in bn} == {None, *(p.name for p in plugins_in_order())}
    settings = {k: v for c in bn for k, v in c.settings}
    assert settings.keys() == set(PUBLIC_SETTINGS) | set(MODE_SETTINGS)
    assert any(s.nonfinite for c in bn for s in c.steps)
    assert {s.mode for c in bn for s in c.steps} == {"train", "forward", "eval"}
    assert any(c.data.constant for c in bn)
    # Masks: partial with the feature axis last and first, none kept, one feature unkept.
    assert {c.mask for c in bn} == {None, "partial", "nothing", "feature"}
    assert {c.axis % len(c.shape) == len(c.shape) - 1 for c in bn if c.mask == "partial"} == {
        True,
        False,
    }


def test_batchnorm_cases_use_only_public_settings() -> None:
    # Every backend's constructor takes these; the rest comes from a preset.
    for case in CASES:
        if isinstance(case, (BatchNormCase, SyncCase)):
            allowed = set(PUBLIC_SETTINGS) | set(MODE_SETTINGS)
            assert {k for k, _ in case.settings} <= allowed, case.name


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
    # SPEC.md's BatchNorm error 3: the feature axis outside [-r, r), on both sides.
    axes = {(c.axis, len(c.shape)) for c in CASES if isinstance(c, ErrorCase)}
    assert (2, 2) in axes and (-5, 4) in axes


def test_every_sync_strategy_has_one_uneven_case() -> None:
    """Each framework strategy runs once (it starts processes), on uneven shards; the
    ``ddp`` and ``data-parallel`` ones with an empty shard (a rank with no sample, a device
    shard of padding alone)."""
    by_strategy: dict[str, list[SyncCase]] = {}
    for c in CASES:
        if isinstance(c, SyncCase):
            by_strategy.setdefault(c.strategy, []).append(c)
    assert set(by_strategy) == set(cases.SYNC_STRATEGIES)
    for strategy, found in by_strategy.items():
        if strategy == "replicas":
            continue
        (case,) = found
        assert case.name.startswith(f"sync/{strategy}/"), case.name
        assert len(set(case.shards)) > 1, case.name
    assert 0 in by_strategy["ddp"][0].shards and len(by_strategy["ddp"][0].shards) == 3
    assert 0 in by_strategy["data-parallel"][0].shards
    with pytest.raises(ValueError, match="unknown strategy"):
        SyncCase("sync/bad", (1, 1), (2,), strategy="horovod")


def test_agc_error_cases_cover_every_invalid_setting() -> None:
    bad = {c.name: c for c in CASES if isinstance(c, AGCCase) and c.error}
    assert all(name.startswith("agc/error/") for name in bad)
    clippings = {c.clipping for c in bad.values()}
    assert 0.0 in clippings and any(v < 0 for v in clippings)
    assert any(v == np.inf for v in clippings)
    epss = [c.eps for c in bad.values()]
    assert any(v < 0 for v in epss) and any(np.isnan(v) for v in epss)
    # Each case has exactly one invalid setting, so the error it raises is that one's.
    for case in bad.values():
        clipping_bad = not (np.isfinite(case.clipping) and case.clipping > 0)
        eps_bad = not (np.isfinite(case.eps) and case.eps >= 0)
        missing = {name for name in case.exclude if name not in {p.name for p in case.params}}
        axes_bad = case.unit_axes is not None or bool(case.unit_axes_by_name)
        assert [clipping_bad, eps_bad, bool(missing), axes_bad].count(True) == 1, case.name
        assert case.message, f"{case.name}: an error case says what its message must hold"
    assert any(c.exclude for c in bad.values())  # excluding a parameter the model lacks


def test_ws_coverage() -> None:
    ws = [c for c in CASES if isinstance(c, WSCase)]
    good = [c for c in ws if not c.error]
    assert {c.style for c in good} == {"deepmind", "timm"}
    assert {c.groups for c in good} == {1, 2}
    assert {(3, 3), (5, 5), (1, 3), (1, 1)} <= {c.kernel for c in good}
    assert all(k % 2 == 1 for c in good for k in c.kernel)  # "same" padding is symmetric
    assert {c.padding for c in good} == {"valid", "same"}
    assert {c.dtype for c in good} == {"float32", "float64"}
    assert any(c.constant_unit for c in good) and any(c.eps is not None for c in good)
    # Every style/kernel/groups combination is run with both styles.
    shapes = {(c.kernel, c.groups, c.padding) for c in good}
    for shape in shapes:
        assert {c.style for c in good if (c.kernel, c.groups, c.padding) == shape} == {
            "deepmind",
            "timm",
        }, shape
    bad = [c for c in ws if c.error]
    assert {0} <= {c.kernel[0] for c in bad} and {0} <= {c.kernel[1] for c in bad}
    assert any(c.in_channels == 0 for c in bad)
    assert any(0 < c.in_channels < c.groups for c in bad)
    assert all(c.weight_shape[1] * c.kernel[0] * c.kernel[1] == 0 for c in bad)  # fan_in 0


def test_small_weights_sit_under_deepminds_floor() -> None:
    for style in ("deepmind", "timm"):
        case = get_case(f"ws/{style}/small-weights")
        assert isinstance(case, WSCase)
        w = data.ws_inputs(case).weight.astype(np.float64).reshape(case.out_channels, -1)
        scaled_var = w.var(axis=1) * w.shape[1]
        assert np.all(scaled_var < 0.6 * 1e-4)  # deepmind's floor is active, with margin
        assert np.all(w.var(axis=1) > 0.02 * 1e-5)  # the variance still counts next to timm's eps


@pytest.mark.parametrize(("groups", "pads"), [(1, (0, 0)), (2, (0, 1)), (2, (2, 1))])
def test_numpy_convolution_is_a_convolution_and_its_backward_its_adjoint(
    groups: int, pads: tuple[int, int]
) -> None:
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 4, 5, 6)), rng.normal(size=(6, 4 // groups, 3, 3))
    y = expected.conv2d(x, w, groups, pads)
    # Against the definition, one output element at a time.
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[0]), (pads[1], pads[1])))
    per = 6 // groups
    for n, o, i, j in [(0, 0, 0, 0), (1, 5, y.shape[2] - 1, y.shape[3] - 1), (1, 3, 1, 2)]:
        g = o // per
        patch = xp[n, g * (4 // groups) : (g + 1) * (4 // groups), i : i + 3, j : j + 3]
        assert y[n, o, i, j] == pytest.approx(float((patch * w[o]).sum()), rel=1e-12)
    # The convolution is linear in x and in w: <dy, conv(x, w)> = <dx, x> = <dw, w>.
    dy = rng.normal(size=y.shape)
    dx, dw = expected.conv2d_backward(dy, x, w, groups, pads)
    inner = float((dy * y).sum())
    assert float((dx * x).sum()) == pytest.approx(inner, rel=1e-10)
    assert float((dw * w).sum()) == pytest.approx(inner, rel=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "ws" and not c.error], ids=str)
def test_reference_computes_every_ws_case(case: WSCase) -> None:
    values = expected.ws_expected(case, data.ws_inputs(case))
    assert values.y is not None and values.y.shape == case.output_shape
    assert values.dweight is not None and values.dweight.shape == case.weight_shape
    assert all(np.all(np.isfinite(v)) for v in values.quantities().values() if v is not None)


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
        "unorm.conformance.cases",
        "unorm.conformance.compare",
        "unorm.conformance.data",
        "unorm.conformance.dtypes",
        "unorm.conformance.execute",
        "unorm.conformance.expected",
        "unorm.conformance.exchange",
        "unorm.conformance.heatmap",
        "unorm.conformance.layouts",
        "unorm.conformance.report",
        "unorm.conformance.results",
        "unorm.conformance.runner",
        "unorm.conformance.tolerance",
        "unorm.conformance.worker",
        "unorm.conformance.xfail",
    ],
)
def test_docstring_examples(module: str) -> None:
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(importlib.import_module(module), optionflags=flags)
    assert result.failed == 0

"""Running one case on one adapter and judging it: the heart of the suite.

:func:`run_case` generates the case's inputs with the adapter's rounding, computes the
expected values with the reference, drives the adapter, compares every quantity and
returns a :class:`~conformance.results.Result`. Native columns are judged twice: against
the case's expectation (``pass`` when they meet it) and, when they do not, against the
reference under the settings the framework's own layer really has (the label then says
which settings depart, and whether the numbers match those settings).

Example:
    >>> from unorm.conformance.adapter import load_adapter
    >>> from unorm.conformance.cases import get_case
    >>> run_case(load_adapter("reference"), get_case("bn/rank2")).status
    'pass'
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from unorm.spec import BatchNormSpec

from . import after, dtypes
from .adapter import Adapter, AGCArrays, LayerConfig, Unsupported, WSConfig
from .cases import AGCCase, BatchNormCase, Case, ErrorCase, SyncCase, WSCase
from .compare import Comparison, compare
from .data import (
    agc_inputs,
    batchnorm_inputs,
    batchnorm_mask,
    error_input,
    sync_inputs,
    ws_inputs,
)
from .expected import (
    StepValues,
    agc_expected,
    agc_left_alone,
    batchnorm_expected,
    sync_expected,
    ws_expected,
)
from .results import Result
from .tolerance import EXACT, tolerance_for

__all__ = ["compare_steps", "run_case", "spec_differences"]

_OUTPUTS = ("y", "dx")


def _config(case: BatchNormCase | SyncCase, ndim: int) -> LayerConfig:
    return LayerConfig(
        case.num_features, ndim, case.axis, case.dtype, case.preset, tuple(case.settings)
    )


def _require_dtype(adapter: Adapter, dtype: str) -> None:
    if dtype not in adapter.dtypes:
        raise Unsupported(f"{adapter.name} does not run {dtype}")


def _compare_values(
    prefix: str,
    actual: StepValues,
    expected: StepValues,
    case_name: str,
    dtype: str,
    absent: frozenset[str],
) -> list[Comparison]:
    out = []
    pdt = dtypes.param_dtype(dtype)
    got = actual.quantities()
    for quantity, want in expected.quantities().items():
        if want is None or (quantity in absent and got[quantity] is None):
            continue
        qdt = dtype if quantity in _OUTPUTS else pdt
        tol = EXACT if quantity == "num_batches_tracked" else tolerance_for(case_name, qdt)
        out.append(compare(f"{quantity}{prefix}", got[quantity], want, qdt, tol, "mask"))
    return out


def compare_steps(
    case_name: str,
    dtype: str,
    actual: Sequence[StepValues],
    expected: Sequence[StepValues],
    absent: frozenset[str] = frozenset(),
) -> list[Comparison]:
    """Every quantity of every step; labels read ``running_var@2`` (quantity @ step)."""
    out = []
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        out += _compare_values(f"@{i + 1}", got, want, case_name, dtype, absent)
    return out


def _drive(
    adapter: Adapter,
    config: LayerConfig,
    gamma: np.ndarray,
    beta: np.ndarray,
    xs,
    dys,
    steps,
    mask: np.ndarray | None = None,
) -> list[StepValues]:
    layer = adapter.bn_build(config, gamma, beta)
    if mask is None:  # adapters of layers without masks take no mask argument
        return [
            adapter.bn_step(layer, x, dy, s.mode) for s, x, dy in zip(steps, xs, dys, strict=True)
        ]
    return [
        adapter.bn_step(layer, x, dy, s.mode, mask=mask)
        for s, x, dy in zip(steps, xs, dys, strict=True)
    ]


def spec_differences(case: BatchNormSpec, native: BatchNormSpec) -> list[str]:
    """Settings in which a native layer's spec differs from the case's, as ``name=value
    (case value)`` strings (``preset`` ignored).

    Example:
        >>> spec_differences(BatchNormSpec(), BatchNormSpec.from_preset("keras"))[:2]
        ['eps=0.001 (case 1e-05)', 'momentum=0.01 (case 0.1)']
    """
    out = []
    for field in dataclasses.fields(BatchNormSpec):
        if field.name == "preset":
            continue
        mine, theirs = getattr(case, field.name), getattr(native, field.name)
        # 1 - (1 - 0.9) is not 0.1 in binary; that is a round trip, not a difference.
        both_float = isinstance(mine, float) and isinstance(theirs, float)
        if both_float and math.isclose(mine, theirs, rel_tol=1e-9, abs_tol=1e-15):
            continue
        if mine != theirs:
            shown = f"{theirs:.3g}" if isinstance(theirs, float) else repr(theirs)
            want = f"{mine:.3g}" if isinstance(mine, float) else repr(mine)
            out.append(f"{field.name}={shown} (case {want})")
    return out


@dataclasses.dataclass
class _Verdict:
    status: str
    detail: str = ""
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)


def _judge(comparisons: list[Comparison]) -> _Verdict:
    bad = [c for c in comparisons if not c.ok]
    if not bad:
        return _Verdict("pass", "", comparisons)
    shown = "; ".join(c.describe() for c in sorted(bad, key=lambda c: -c.score)[:3])
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    return _Verdict("fail", shown + more, comparisons)


def _error_text(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # Some frameworks (MXNet) put a C++ traceback first and the message last.
    text = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}"[:300]


def _missing_fragments(exc: BaseException, message: Sequence[str]) -> list[str]:
    """The fragments of ``message`` that the error's whole text lacks."""
    text = str(exc)
    return [fragment for fragment in message if fragment not in text]


def _expect_value_error(
    call: Callable[[], object], settings: str, message: Sequence[str] = ()
) -> _Verdict:
    """Pass when ``call`` raises ``ValueError`` (the spec's error for invalid settings)
    whose text holds every fragment of ``message``; fail when it raises anything else,
    nothing, or a message without them (``settings`` names what was invalid)."""
    try:
        call()
    except Unsupported:
        raise
    except ValueError as exc:
        missing = _missing_fragments(exc, message)
        if missing:
            return _Verdict("fail", f"raised {_error_text(exc)}, which does not say {missing}")
        return _Verdict("pass", f"raised {_error_text(exc)}")
    except Exception as exc:
        return _Verdict("fail", f"raised {_error_text(exc)}, expected ValueError")
    return _Verdict("fail", f"no error raised ({settings})")


def _run_batchnorm(adapter: Adapter, case: BatchNormCase) -> _Verdict:
    _require_dtype(adapter, case.dtype)
    if case.mask is not None and not adapter.masks:
        raise Unsupported(f"{adapter.name}'s BatchNorm layers take no mask")
    config = _config(case, len(case.shape))
    native_spec = adapter.native_spec(config) if adapter.native else None
    inputs = batchnorm_inputs(case, adapter.round_to)
    mask = batchnorm_mask(case)
    expected = batchnorm_expected(case.spec(), inputs, case.steps, mask)
    try:
        actual = _drive(
            adapter, config, inputs.gamma, inputs.beta, inputs.xs, inputs.dys, case.steps, mask
        )
    except Unsupported:
        raise
    except Exception as exc:
        if native_spec is None:
            raise
        return _native_raised(case, native_spec, inputs, exc)
    verdict = _judge(compare_steps(case.name, case.dtype, actual, expected, adapter.absent))
    if native_spec is None or verdict.status == "pass":
        return verdict
    return _native_departs(case, native_spec, inputs, actual, verdict, adapter.absent)


def _native_expected(case: BatchNormCase, spec: BatchNormSpec, inputs) -> list[StepValues] | str:
    try:
        return batchnorm_expected(spec, inputs, case.steps, batchnorm_mask(case))
    except ValueError as exc:
        return _error_text(exc)


def _native_raised(case: BatchNormCase, spec: BatchNormSpec, inputs, exc: Exception) -> _Verdict:
    own = _native_expected(case, spec, inputs)
    diffs = ", ".join(spec_differences(case.spec(), spec))
    why = f"raises {_error_text(exc)}"
    if isinstance(own, str):
        why += f" (as the reference does with its settings{': ' + diffs if diffs else ''})"
    return _Verdict("departs", f"native departs: {why}")


def _native_departs(
    case: BatchNormCase,
    spec: BatchNormSpec,
    inputs,
    actual: list[StepValues],
    canonical: _Verdict,
    absent: frozenset[str],
) -> _Verdict:
    diffs = spec_differences(case.spec(), spec)
    own = _native_expected(case, spec, inputs)
    if isinstance(own, str):
        tail = f"the reference raises with its settings ({own})"
    else:
        mine = _judge(compare_steps(case.name, case.dtype, actual, own, absent))
        tail = (
            "matches the reference under its own settings"
            if mine.status == "pass"
            else f"departs from its own settings too: {mine.detail}"
        )
    what = ", ".join(diffs) if diffs else "numerics"
    worst = max(canonical.comparisons, key=lambda c: c.score)
    detail = f"native departs: {what}; {tail} | against the case: {worst.describe()}"
    return _Verdict("departs", detail, canonical.comparisons)


def _run_agc(adapter: Adapter, case: AGCCase) -> _Verdict:
    _require_dtype(adapter, case.dtype)
    if adapter.native:
        raise Unsupported("the frameworks have no native AGC")
    inputs = agc_inputs(case, adapter.round_to)
    layout = adapter.layout
    arrays = [
        AGCArrays(
            p.name,
            p.layer,
            p.kind,
            p.role,
            layout.to_backend(p.kind, inputs.weights[p.name]),
            layout.to_backend(p.kind, inputs.grads[p.name]),
            case.dtype,
        )
        for p in case.params
    ]

    unit_axes = dict(case.unit_axes_by_name) if case.unit_axes_by_name else case.unit_axes

    def clip() -> dict[str, np.ndarray]:
        return adapter.agc(
            arrays,
            clipping=case.clipping,
            eps=case.eps,
            exclude=case.exclude,
            unit_axes=unit_axes,
        )

    if case.error:
        return _expect_value_error(
            clip, f"clipping={case.clipping}, eps={case.eps}, unit_axes={unit_axes}", case.message
        )
    expected = agc_expected(case, inputs)
    alone = agc_left_alone(case, inputs)
    got = clip()
    tol = tolerance_for(case.name, case.dtype)
    comparisons = []
    for p in case.params:
        want = expected[p.name]
        if p.name not in got:
            comparisons.append(compare(p.name, None, want, case.dtype, tol))
            continue
        actual = layout.to_logical(p.kind, got[p.name], p.shape)
        # Units the reference leaves alone (under the threshold, excluded parameters) come
        # back "unchanged, bit for bit" (SPEC.md section 5): no tolerance there, only on
        # the units AGC rescales, even where a factor within half an ulp of 1 rounds a
        # rescaled value back to its input.
        comparisons.append(compare(p.name, actual, want, case.dtype, tol, exact=alone[p.name]))
    return _judge(comparisons)


def _sync_comparisons(case: SyncCase, got, expected, absent: frozenset[str]) -> list[Comparison]:
    tol = tolerance_for(case.name, case.dtype)
    comparisons = []
    for k, (y, dx) in enumerate(zip(expected.ys, expected.dxs, strict=True)):
        gy = got.ys[k] if k < len(got.ys) else None
        gdx = got.dxs[k] if k < len(got.dxs) else None
        comparisons.append(compare(f"y[replica {k}]", gy, y, case.dtype, tol, "mask"))
        comparisons.append(compare(f"dx[replica {k}]", gdx, dx, case.dtype, tol, "mask"))
    state = dataclasses.replace(expected.step, y=None, dx=None)
    comparisons += _compare_values("", got.state, state, case.name, case.dtype, absent)
    return comparisons


def _run_sync(adapter: Adapter, case: SyncCase) -> _Verdict:
    _require_dtype(adapter, case.dtype)
    if case.strategy not in adapter.sync_strategies:
        raise Unsupported(f"{adapter.name} does not run the {case.strategy!r} strategy")
    config = _config(case, 1 + len(case.shape))
    native_spec = adapter.native_spec(config) if adapter.native else None
    inputs = sync_inputs(case, adapter.round_to)
    expected = sync_expected(case.spec(), inputs)
    # The default strategy is not passed: an adapter of that one alone need not take it.
    how: dict[str, Any] = {} if case.strategy == "replicas" else {"strategy": case.strategy}
    try:
        got = adapter.sync_bn_step(config, inputs.gamma, inputs.beta, inputs.xs, inputs.dys, **how)
    except Unsupported:
        raise
    except Exception as exc:
        if native_spec is None:
            raise
        return _Verdict("departs", f"native departs: raises {_error_text(exc)}")
    verdict = _judge(_sync_comparisons(case, got, expected, adapter.absent))
    if native_spec is None or verdict.status == "pass":
        return verdict
    diffs = spec_differences(case.spec(), native_spec)
    try:
        own = _judge(
            _sync_comparisons(case, got, sync_expected(native_spec, inputs), adapter.absent)
        )
        tail = (
            "matches the reference under its own settings"
            if own.status == "pass"
            else f"departs from its own settings too: {own.detail}"
        )
    except ValueError as exc:
        tail = f"the reference raises with its settings ({_error_text(exc)})"
    what = ", ".join(diffs) if diffs else "numerics"
    worst = max(verdict.comparisons, key=lambda c: c.score)
    detail = f"native departs: {what}; {tail} | against the case: {worst.describe()}"
    return _Verdict("departs", detail, verdict.comparisons)


def _same_state(before: StepValues, after: StepValues) -> list[str]:
    changed = []
    for key, old in before.quantities().items():
        new = after.quantities()[key]
        if old is None or new is None:
            continue
        if not np.array_equal(np.asarray(old), np.asarray(new), equal_nan=True):
            changed.append(key)
    return changed


def _run_error(adapter: Adapter, case: ErrorCase) -> _Verdict:
    config = LayerConfig(case.num_features, len(case.shape), case.axis, case.dtype, case.preset)
    if adapter.native:
        if case.preset is not None:
            raise Unsupported("native layers have no presets")
        native_spec: BatchNormSpec | None = adapter.native_spec(config)
    else:
        native_spec = None
    rounding = adapter.round_to if case.dtype in dtypes.DTYPES else dtypes.cast
    x = error_input(case, rounding)
    pdt = config.param_dtype
    raised: Exception | None = None
    changed: list[str] = []
    try:
        layer = adapter.bn_build(
            config, np.ones(case.num_features, pdt), np.zeros(case.num_features, pdt)
        )
    except Unsupported:
        raise
    except Exception as exc:
        raised = exc
    else:
        before = adapter.bn_state(layer)
        try:
            adapter.bn_step(layer, x, None, "forward")
        except Unsupported:
            raise
        except Exception as exc:
            raised = exc
        changed = _same_state(before, adapter.bn_state(layer))
    problems = []
    if raised is None:
        problems.append("no error raised")
    elif not isinstance(raised, ValueError):
        problems.append(f"raised {_error_text(raised)}, expected {case.error}")
    elif not adapter.native and _missing_fragments(raised, case.message):
        missing = _missing_fragments(raised, case.message)
        problems.append(f"raised {_error_text(raised)}, which does not say {missing}")
    if changed and raised is not None:
        problems.append(f"state changed by the failed call: {', '.join(changed)}")
    if not problems:
        return _Verdict("pass", f"raised {_error_text(raised)}" if raised else "")
    if native_spec is None:
        return _Verdict("fail", "; ".join(problems))
    label = "; ".join(problems)
    if raised is None and native_spec.allow_single_value and "one-value" in case.name:
        label = "accepts one value per feature (allow_single_value=True)"
    return _Verdict("departs", f"native departs: {label}")


def _ws_config(case: WSCase) -> WSConfig:
    return WSConfig(
        case.in_channels,
        case.out_channels,
        case.kernel,
        case.groups,
        case.style,
        case.eps,
        case.padding,
        case.pads,
        case.dtype,
    )


def _run_ws(adapter: Adapter, case: WSCase) -> _Verdict:
    _require_dtype(adapter, case.dtype)
    if adapter.native:
        raise Unsupported("the frameworks have no native Scaled WS convolution")
    inputs = ws_inputs(case, adapter.round_to)
    layout = adapter.layout
    weight = layout.to_backend("conv", inputs.weight)
    args = (inputs.x, weight, inputs.gain, inputs.bias, inputs.dy)
    if case.error:
        return _expect_value_error(lambda: adapter.ws_conv(_ws_config(case), *args), "fan_in is 0")
    expected = ws_expected(case, inputs)
    got = adapter.ws_conv(_ws_config(case), *args)
    if got.dweight is not None:
        got.dweight = layout.to_logical("conv", got.dweight, case.weight_shape)
    tol = tolerance_for(case.name, case.dtype)
    comparisons = [
        compare(name, got.quantities()[name], want, case.dtype, tol, "mask")
        for name, want in expected.quantities().items()
    ]
    return _judge(comparisons)


_RUNNERS = {
    "batchnorm": _run_batchnorm,
    "agc": _run_agc,
    "sync": _run_sync,
    "error": _run_error,
    "ws": _run_ws,
    "fold": after.run_fold,
    "recalibrate": after.run_after,
    "frozen": after.run_after,
    "accumulate": after.run_after,
}


def run_case(adapter: Adapter, case: Case) -> Result:
    """Run ``case`` on ``adapter`` and return its result (never raises for the case's sake)."""
    start = time.perf_counter()
    dtype = getattr(case, "dtype", "float32")
    result = Result(case.name, adapter.name, case.kind, dtype, "error")
    try:
        verdict = _RUNNERS[case.kind](adapter, case)  # type: ignore[operator]
    except Unsupported as exc:
        verdict = _Verdict("unsupported", str(exc))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        at = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        verdict = _Verdict("error", _error_text(exc) + at)
    result.status, result.detail = verdict.status, verdict.detail
    if verdict.comparisons:
        worst = max(verdict.comparisons, key=lambda c: c.score)
        result.worst = worst.quantity
        result.max_abs, result.max_rel = worst.max_abs, worst.max_rel
        result.ulps, result.score = worst.ulps, worst.score
    elif verdict.status in ("pass", "fail", "error", "departs"):
        # Nothing numeric to compare (an error case, an exception): all or nothing.
        result.score = 0.0 if verdict.status == "pass" else math.inf
    result.seconds = time.perf_counter() - start
    return result

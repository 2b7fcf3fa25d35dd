"""BatchNorm after training (SPEC.md section 8) and accumulated micro-batches (section 2):
the inputs, expected values and runners of the ``fold/...``, ``recalibrate/...``,
``frozen/...`` and ``accumulate/...`` cases.

Every expected value comes from :mod:`unorm.reference` in float64: a fold is checked
against the *unfolded* model (the producer, computed here in NumPy, then the reference's
inference BatchNorm), a recalibration against ``reference.recalibrated_stats`` (the exact
statistics of all samples), a frozen layer against the inference formula with the
running statistics it was frozen with, an accumulation against
``reference.accumulated_stats`` (one update from the exact merge of the micro-batches).

Native columns: a framework tool that exists is run (``fuse_conv_bn_eval``,
``torch.optim.swa_utils.update_bn``, Keras ``trainable=False``, Gluon
``use_global_stats=True``, ...) and a departure from the case is labelled with what the
tool does instead, judged against the reference under that rule; a framework without the
tool reports the case unsupported. No framework accumulates BatchNorm statistics over
micro-batches: its layer updates once per micro-batch, which is what the native columns
run and label.

Example:
    >>> from unorm.conformance.adapter import load_adapter
    >>> from unorm.conformance.cases import get_case
    >>> run_fold(load_adapter("reference"), get_case("fold/conv_transpose/grouped")).status
    'pass'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from unorm import reference as ref
from unorm.spec import BatchNormSpec

from . import dtypes
from .adapter import LayerConfig, Unsupported
from .cases import AfterCase, FoldCase, Step
from .compare import Comparison, compare
from .data import BatchNormInputs, Rounder
from .expected import StepValues, batchnorm_expected, conv2d
from .tolerance import tolerance_for

if TYPE_CHECKING:
    from .adapter import Adapter
    from .execute import _Verdict

__all__ = [
    "AfterInputs",
    "FoldConfig",
    "FoldInputs",
    "FoldValues",
    "accumulate_expected",
    "after_inputs",
    "conv_transpose2d",
    "fold_expected",
    "fold_inputs",
    "frozen_expected",
    "producer_forward",
    "recalibrate_expected",
    "run_after",
    "run_fold",
]


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# -- fold ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FoldConfig:
    """How a fold case builds its model: the producer (``kind`` of section 5's table, the
    case's ``producer`` name), its sizes and bias, and the BatchNorm after it (unorm's
    with ``preset`` and ``settings``, or the framework's own with ``native_bn``)."""

    producer: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    groups: int
    bias: bool
    native_bn: bool
    dtype: str
    preset: str | None
    settings: tuple[tuple[str, Any], ...]

    def spec(self) -> BatchNormSpec:
        """The BatchNorm's settings (axis 1 of a channels-first input)."""
        return BatchNormSpec.from_preset(self.preset, axis=1, **dict(self.settings))


@dataclasses.dataclass(frozen=True)
class FoldInputs:
    """The input (channels-first), the producer's weight (logical layout, or the
    backend's when handed to an adapter) and bias (None: the producer has none), and the
    BatchNorm's ``gamma``, ``beta`` and running statistics."""

    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray


@dataclasses.dataclass
class FoldValues:
    """What a folded model gives: its inference output (channels-first), how many
    BatchNorm layers it still holds, and the tool that folded it (for the report)."""

    y: np.ndarray | None
    batchnorms_left: int
    tool: str = ""


def fold_inputs(case: FoldCase, rnd: Rounder = dtypes.cast) -> FoldInputs:
    """Draw input, weight, bias, gamma, beta, running mean and variance (in that order).

    Example:
        >>> from unorm.conformance.cases import get_case
        >>> fold_inputs(get_case("fold/depthwise")).weight.shape
        (3, 2, 3, 3)
    """
    rng = np.random.default_rng(case.seed)
    c = case.out_channels
    x = rng.normal(size=case.input_shape)
    w = rng.normal(0.0, 0.5, case.weight_shape)
    b = rng.normal(0.0, 0.5, c)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0.0, 0.5, c)
    mean, var = rng.normal(0.0, 0.5, c), rng.uniform(0.5, 2.0, c)
    d = case.dtype
    return FoldInputs(
        rnd(x, d),
        rnd(w, d),
        rnd(b, d) if case.bias else None,
        *(rnd(a, d) for a in (gamma, beta, mean, var)),
    )


def conv_transpose2d(x: np.ndarray, w: np.ndarray, groups: int = 1) -> np.ndarray:
    """Transposed convolution of ``x`` ``(N, I, H, W)`` with ``w`` ``(I, O/groups, kh,
    kw)`` (stride 1, no padding): each input value spreads ``w`` over the output, output
    channel ``g * O/groups + j`` summing the inputs of group ``g``; float64.

    Example:
        >>> conv_transpose2d(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)))[0, 0].tolist()
        [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    """
    x, w = _f64(x), _f64(w)
    n, i, h, wd = x.shape
    og, kh, kw = w.shape[1:]
    xg = x.reshape(n, groups, i // groups, h, wd)
    wg = w.reshape(groups, i // groups, og, kh, kw)
    y = np.zeros((n, groups, og, h + kh - 1, wd + kw - 1))
    for a in range(kh):
        for b in range(kw):
            y[..., a : a + h, b : b + wd] += np.einsum("ngchw,gco->ngohw", xg, wg[..., a, b])
    return y.reshape(n, groups * og, *y.shape[3:])


def producer_forward(case: FoldCase, inputs: FoldInputs) -> np.ndarray:
    """The producer's output in float64, from the logical weight."""
    x, w = _f64(inputs.x), _f64(inputs.weight)
    if case.producer == "dense":
        z = x @ w.T
    elif case.producer == "conv_transpose":
        z = conv_transpose2d(x, w, case.groups)
    elif case.producer == "depthwise":
        # (I, M, kh, kw) is (I*M, 1, kh, kw) with one group per input channel.
        z = conv2d(x, w.reshape(-1, 1, *w.shape[2:]), groups=case.in_channels)
    else:
        z = conv2d(x, w, case.groups)
    if inputs.bias is not None:
        z = z + _f64(inputs.bias).reshape(1, -1, *([1] * (z.ndim - 2)))
    return z


def fold_expected(case: FoldCase, inputs: FoldInputs) -> np.ndarray:
    """The unfolded model's inference output: the producer, then section 2's inference
    forward with the BatchNorm's running statistics (``gamma``/``beta`` absent when
    ``scale``/``center`` is off)."""
    spec = case.spec()
    return ref.batch_norm_inference(
        producer_forward(case, inputs),
        _f64(inputs.mean),
        _f64(inputs.var),
        _f64(inputs.gamma) if spec.scale else None,
        _f64(inputs.beta) if spec.center else None,
        eps=spec.eps,
        axis=1,
    )


def _fold_config(case: FoldCase) -> FoldConfig:
    return FoldConfig(
        case.producer,
        case.layer_kind,
        case.in_channels,
        case.out_channels,
        case.kernel,
        case.groups,
        case.bias,
        case.native_bn,
        case.dtype,
        case.preset,
        tuple(case.settings),
    )


def run_fold(adapter: Adapter, case: FoldCase) -> _Verdict:
    """A fold case on ``adapter``: its folded model's inference output against the
    reference's unfolded one, and no BatchNorm left. A native column runs its framework's
    own fold (or reports the case unsupported); a departure is labelled, never failed."""
    from .execute import _error_text, _judge, _require_dtype, _Verdict

    _require_dtype(adapter, case.dtype)
    inputs = fold_inputs(case, adapter.round_to)
    layout = adapter.layout
    handed = dataclasses.replace(inputs, weight=layout.to_backend(case.layer_kind, inputs.weight))
    expected = fold_expected(case, inputs)
    try:
        got = adapter.fold_eval(_fold_config(case), handed)
    except Unsupported:
        raise
    except Exception as exc:
        if not adapter.native:
            raise
        tool = getattr(adapter, "fold_tool", "its fold")
        return _Verdict("departs", f"native departs: {tool} raises {_error_text(exc)}")
    tol = tolerance_for(case.name, case.dtype)
    comparisons = [compare("y", got.y, expected, case.dtype, tol)]
    if got.batchnorms_left:
        comparisons.append(_failed("batchnorms_left", f"{got.batchnorms_left} BatchNorm left"))
    verdict = _judge(comparisons)
    if not adapter.native or verdict.status == "pass":
        return verdict
    detail = f"native departs: {got.tool or 'its fold'} gives other numbers: {verdict.detail}"
    return _Verdict("departs", detail, verdict.comparisons)


def _failed(quantity: str, note: str) -> Comparison:
    inf = float("inf")
    return Comparison(quantity, False, inf, inf, inf, inf, note)


# -- recalibrate, frozen, accumulate ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AfterInputs:
    """``gamma``, ``beta``, a warm-up batch (4 samples) with its upstream gradient, one
    batch per entry of ``batches`` with its upstream gradient, and a last batch (3
    samples) for the inference step after."""

    gamma: np.ndarray
    beta: np.ndarray
    warm: np.ndarray
    warm_dy: np.ndarray
    xs: tuple[np.ndarray, ...]
    dys: tuple[np.ndarray, ...]
    last: np.ndarray
    last_dy: np.ndarray


def after_inputs(case: AfterCase, rnd: Rounder = dtypes.cast) -> AfterInputs:
    """Draw ``gamma``, ``beta``, the warm-up batch, every batch and the last one (each
    with its upstream gradient; batch ``k``'s mean shifted by ``k * drift``, a NaN at the
    first position of feature 0 of batch ``nonfinite``).

    Example:
        >>> from unorm.conformance.cases import get_case
        >>> [x.shape for x in after_inputs(get_case("accumulate/uneven")).xs]
        [(5, 3, 4), (3, 3, 4), (2, 3, 4)]
    """
    rng = np.random.default_rng(case.seed)
    pdt = dtypes.param_dtype(case.dtype)
    gamma = rnd(rng.uniform(0.5, 1.5, case.num_features), pdt)
    beta = rnd(rng.normal(0.0, 0.5, case.num_features), pdt)

    def draw(n: int, loc: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(loc, 1.0, (n, *case.shape))
        return x, rng.normal(size=(n, *case.shape))

    warm, warm_dy = draw(4, 0.5)
    xs, dys = [], []
    for k, n in enumerate(case.batches):
        x, dy = draw(n, k * case.drift)
        if case.nonfinite == k:
            x[(0,) * x.ndim] = np.nan
        xs.append(rnd(x, case.dtype))
        dys.append(rnd(dy, case.dtype))
    last, last_dy = draw(3)
    d = case.dtype
    return AfterInputs(
        gamma,
        beta,
        rnd(warm, d),
        rnd(warm_dy, d),
        tuple(xs),
        tuple(dys),
        rnd(last, d),
        rnd(last_dy, d),
    )


def _state(running: ref.RunningStats) -> StepValues:
    return StepValues(
        running_mean=_f64(running.mean),
        running_var=_f64(running.var),
        num_batches_tracked=running.num_batches_tracked,
    )


def _warm(case: AfterCase, spec: BatchNormSpec, inputs: AfterInputs) -> StepValues:
    batch = BatchNormInputs(inputs.gamma, inputs.beta, (inputs.warm,), (inputs.warm_dy,))
    (values,) = batchnorm_expected(spec, batch, [Step("train")])
    return values


def recalibrate_expected(case: AfterCase, inputs: AfterInputs) -> list[StepValues]:
    """The warm-up step, then the state ``recalibrate`` leaves: the exact statistics of
    every sample of the batches (``reference.recalibrated_stats``, the layer's own
    variance estimator on the total count), then an inference step with them (scale and
    shift unchanged)."""
    spec = case.spec()
    warm = _warm(case, spec, inputs)
    stats = ref.recalibrated_stats([_f64(x) for x in inputs.xs], case.axis, unbiased=spec.unbiased)
    return [warm, _state(stats), _last(spec, stats, inputs)]


def _last(spec: BatchNormSpec, running: ref.RunningStats, inputs: AfterInputs) -> StepValues:
    """The inference step on the last batch with ``running``."""
    gamma, beta = _affine(spec, inputs)
    return _inference(spec, running, gamma, beta, inputs.last, inputs.last_dy, True)


def _running(values: StepValues) -> ref.RunningStats:
    assert values.running_mean is not None and values.running_var is not None
    return ref.RunningStats(
        values.running_mean, values.running_var, int(values.num_batches_tracked or 0)
    )


def _inference(
    spec: BatchNormSpec,
    running: ref.RunningStats,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    x: np.ndarray,
    dy: np.ndarray,
    grads: bool,
) -> StepValues:
    x64 = _f64(x)
    y = ref.batch_norm_inference(
        x64, running.mean, running.var, gamma, beta, eps=spec.eps, axis=spec.axis
    )
    dx, dgamma, dbeta = ref.batch_norm_inference_backward(
        _f64(dy), x64, running.mean, running.var, gamma,
        eps=spec.eps, axis=spec.axis, center=spec.center,
    )  # fmt: skip
    out = StepValues(y=y, dx=dx)
    if grads:
        out.dgamma, out.dbeta = dgamma, dbeta
    out.take_state(_state(running))
    return out


def _affine(spec: BatchNormSpec, inputs: AfterInputs) -> tuple[np.ndarray | None, ...]:
    return (
        _f64(inputs.gamma) if spec.scale else None,
        _f64(inputs.beta) if spec.center else None,
    )


def frozen_expected(
    case: AfterCase, inputs: AfterInputs, spec: BatchNormSpec | None = None
) -> list[StepValues]:
    """The warm-up step, then every step of the frozen layer (the batches in training
    mode, the last batch in inference): the inference forward and backward with the
    warm-up's running statistics, which stay as they are; ``dgamma``/``dbeta`` only with
    ``trainable`` (a fixed scale and shift have none). ``spec``: the case's by default."""
    spec = case.spec() if spec is None else spec
    warm = _warm(case, spec, inputs)
    running = _running(warm)
    gamma, beta = _affine(spec, inputs)
    steps = [*zip(inputs.xs, inputs.dys, strict=True), (inputs.last, inputs.last_dy)]
    return [warm] + [
        _inference(spec, running, gamma, beta, x, dy, case.trainable) for x, dy in steps
    ]


def _training(
    spec: BatchNormSpec, gamma: np.ndarray | None, beta: np.ndarray | None, x: Any, dy: Any
) -> StepValues:
    x64 = _f64(x)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y, _ = ref.batch_norm_step(x64, None, spec, gamma, beta, training=True)
        dx, dgamma, dbeta = ref.batch_norm_backward(
            _f64(dy), x64, gamma, eps=spec.eps, axis=spec.axis, center=spec.center
        )
    return StepValues(y=y, dx=dx, dgamma=dgamma, dbeta=dbeta)


def accumulate_expected(case: AfterCase, inputs: AfterInputs) -> list[StepValues]:
    """Each micro-batch's training step (its own batch statistics), then the state after
    the accumulation (one update per step of ``per_step`` micro-batches from their exact
    merge, ``reference.accumulated_stats``), then an inference step with it."""
    spec = case.spec()
    gamma, beta = _affine(spec, inputs)
    micro = [
        _training(spec, gamma, beta, x, dy) for x, dy in zip(inputs.xs, inputs.dys, strict=True)
    ]
    running = ref.init_running_stats(case.num_features)
    k = case.per_step
    for start in range(0, len(inputs.xs), k):
        with np.errstate(invalid="ignore", over="ignore"):
            stats = [ref.batch_stats(_f64(x), case.axis) for x in inputs.xs[start : start + k]]
        running = ref.accumulated_stats(running, stats, spec)
    last = _inference(spec, running, gamma, beta, inputs.last, inputs.last_dy, True)
    return [*micro, _state(running), last]


def _per_micro_batch(spec: BatchNormSpec, inputs: AfterInputs) -> list[StepValues]:
    """What a layer without accumulation gives on the same calls: every micro-batch a
    training step of its own (its update, its ``n/(n-1)``), then the inference step."""
    batch = BatchNormInputs(
        inputs.gamma,
        inputs.beta,
        (*inputs.xs, inputs.last),
        (*inputs.dys, inputs.last_dy),
    )
    steps = [Step("train")] * len(inputs.xs) + [Step("eval")]
    values = batchnorm_expected(spec, batch, steps)
    state = StepValues()
    state.take_state(values[-2])
    for v in values[:-1]:  # the state is compared once, after the last micro-batch
        v.take_state(StepValues())
    return [*values[:-1], state, values[-1]]


def _compare(
    case: AfterCase, got: Sequence[StepValues], want: Sequence[StepValues], absent: frozenset[str]
) -> list[Comparison]:
    from .execute import compare_steps

    return compare_steps(case.name, case.dtype, got, want, absent)


def _fixed_checks(case: AfterCase, got: Sequence[StepValues]) -> list[Comparison]:
    """A fixed scale and shift take no gradient: a frozen layer's steps must return none."""
    if case.op != "frozen" or case.trainable:
        return []
    out = []
    for i, values in enumerate(got[1:], start=2):
        for name in ("dgamma", "dbeta"):
            if getattr(values, name) is not None:
                out.append(_failed(f"{name}@{i}", "a gradient was taken for a fixed parameter"))
    return out


def _drive(adapter: Adapter, case: AfterCase, inputs: AfterInputs) -> list[StepValues]:
    layer = adapter.bn_build(_config_of(case), inputs.gamma, inputs.beta)
    if case.op == "accumulate":
        if adapter.native:
            # No framework accumulates BatchNorm statistics: each call is a step.
            pairs = zip(inputs.xs, inputs.dys, strict=True)
            micro = [adapter.bn_step(layer, x, dy, "train") for x, dy in pairs]
        else:
            micro = adapter.bn_accumulate(layer, inputs.xs, inputs.dys, case.per_step)
        for v in micro:
            v.take_state(StepValues())
        state = adapter.bn_state(layer)
        return [*micro, state, adapter.bn_step(layer, inputs.last, inputs.last_dy, "eval")]
    warm = adapter.bn_step(layer, inputs.warm, inputs.warm_dy, "train")
    if case.op == "recalibrate":
        state = adapter.bn_recalibrate(layer, inputs.xs)
        return [warm, state, adapter.bn_step(layer, inputs.last, inputs.last_dy, "eval")]
    layer = adapter.bn_freeze(layer, case.trainable)
    pairs = zip(inputs.xs, inputs.dys, strict=True)
    steps = [
        *(adapter.bn_step(layer, x, dy, "train") for x, dy in pairs),
        adapter.bn_step(layer, inputs.last, inputs.last_dy, "eval"),
    ]
    return [warm, *steps]


_EXPECTED = {
    "recalibrate": recalibrate_expected,
    "frozen": frozen_expected,
    "accumulate": accumulate_expected,
}


def _native_rule(adapter: Adapter, case: AfterCase, inputs: AfterInputs) -> tuple[str, Any]:
    """What the native column's tool does instead of the case's rule, and the reference's
    values under that rule (or None where there is no rule to judge it by)."""
    spec = adapter.native_spec(_config_of(case))
    if case.op == "accumulate":
        return (
            "no accumulated micro-batches: each micro-batch updates the running statistics as "
            "a step of its own (momentum and n/(n-1) per micro-batch, pytorch/pytorch#46516, "
            "andreped/GradientAccumulator#47)",
            _per_micro_batch(spec, inputs),
        )
    if case.op == "recalibrate":
        rule = getattr(adapter, "recalibrate_rule", "")
        warm = _warm(case, spec, inputs)
        # update_bn's rule: momentum=None over the batches from reset statistics, i.e. the
        # plain average of the per-batch means and unbiased variances.
        batch = BatchNormInputs(inputs.gamma, inputs.beta, inputs.xs, inputs.dys)
        averaged = batchnorm_expected(
            spec.replace(momentum=None), batch, [Step("forward")] * len(inputs.xs)
        )
        state = StepValues()
        state.take_state(averaged[-1])
        return rule, [warm, state, _last(spec, _running(state), inputs)]
    return "", frozen_expected(case, inputs, spec)


def _config_of(case: AfterCase) -> LayerConfig:
    return LayerConfig(
        case.num_features, 1 + len(case.shape), case.axis, case.dtype, case.preset,
        tuple(case.settings),
    )  # fmt: skip


def run_after(adapter: Adapter, case: AfterCase) -> _Verdict:
    """A ``recalibrate``, ``frozen`` or ``accumulate`` case on ``adapter``: every step's
    values and the state after against the reference; a native column's departure is
    labelled with its tool's own rule and judged against the reference under it."""
    from .execute import _error_text, _judge, _require_dtype, _Verdict, spec_differences

    _require_dtype(adapter, case.dtype)
    if adapter.native:
        adapter.native_spec(_config_of(case))  # what the native layer cannot be told
    inputs = after_inputs(case, adapter.round_to)
    expected = _EXPECTED[case.op](case, inputs)
    try:
        got = _drive(adapter, case, inputs)
    except Unsupported:
        raise
    except Exception as exc:
        if not adapter.native:
            raise
        return _Verdict("departs", f"native departs: raises {_error_text(exc)}")
    comparisons = _compare(case, got, expected, adapter.absent) + _fixed_checks(case, got)
    verdict = _judge(comparisons)
    if not adapter.native or verdict.status == "pass":
        return verdict
    rule, own = _native_rule(adapter, case, inputs)
    diffs = spec_differences(case.spec(), adapter.native_spec(_config_of(case)))
    rule = ", ".join([r for r in (rule, *diffs) if r])
    mine = _judge(_compare(case, got, own, adapter.absent) + _fixed_checks(case, got))
    tail = (
        "matches the reference under that rule"
        if mine.status == "pass"
        else f"departs from that rule too: {mine.detail}"
    )
    worst = max(verdict.comparisons, key=lambda c: c.score)
    detail = f"native departs: {rule or 'numerics'}; {tail} | against the case: {worst.describe()}"
    return _Verdict("departs", detail, verdict.comparisons)

"""The NumPy reference against independent arithmetic: hand-computed values, finite
differences, NumPy's own variance, and properties checked with hypothesis."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unorm import reference as ref
from unorm.selfcheck import finite_difference_grads
from unorm.spec import BatchNormSpec

SHAPES = [(4, 3), (3, 2, 5), (2, 3, 3, 2), (2, 2, 2, 2, 3)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-12))


# --- forward ------------------------------------------------------------------------


def test_training_forward_matches_hand_computation() -> None:
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 13.0]])
    y, stats = ref.batch_norm_train(x, gamma=[2.0, 1.0], beta=[0.5, -1.0], eps=0.0, axis=1)
    # channel 0: mean 3, biased var 8/3; channel 1: mean 11, biased var 2
    expected0 = 2.0 * (np.array([1.0, 3.0, 5.0]) - 3.0) / np.sqrt(8.0 / 3.0) + 0.5
    expected1 = (np.array([10.0, 10.0, 13.0]) - 11.0) / np.sqrt(2.0) - 1.0
    np.testing.assert_allclose(y[:, 0], expected0, rtol=1e-15)
    np.testing.assert_allclose(y[:, 1], expected1, rtol=1e-15)
    assert stats.count == 3
    np.testing.assert_allclose(stats.var(), [8.0 / 3.0, 2.0])


def test_inference_uses_running_statistics() -> None:
    x = np.array([[[3.0, 5.0]], [[1.0, 1.0]]])  # (N=2, C=1, L=2)
    y = ref.batch_norm_inference(x, [1.0], [3.0], [2.0], [1.0], eps=1.0, axis=1)
    np.testing.assert_allclose(y, 2.0 * (x - 1.0) / 2.0 + 1.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_feature_axis_position_is_a_transpose(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    y, _ = ref.batch_norm_train(x, axis=axis)
    moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    flat = (moved - moved.mean(1, keepdims=True)) / np.sqrt(moved.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.moveaxis(y, axis, 0).reshape(flat.shape), flat, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_has_input_dtype(dtype: type) -> None:
    x = np.linspace(-1, 1, 12, dtype=dtype).reshape(4, 3)
    y, _ = ref.batch_norm_train(x)
    assert y.dtype == dtype
    assert ref.batch_norm_inference(x, np.zeros(3), np.ones(3)).dtype == dtype


def test_large_offset_is_exact_in_float64() -> None:
    # E[x^2] - E[x]^2 loses every digit here; the two-pass reference does not.
    rng = np.random.default_rng(0)
    x = rng.normal(1e8, 1.0, (64, 2))
    stats = ref.batch_stats(x, axis=1)
    np.testing.assert_allclose(stats.var(), x.var(axis=0), rtol=1e-9)


# --- backward -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_finite_differences(
    shape: tuple[int, ...], axis: int, affine: bool
) -> None:
    rng = np.random.default_rng(sum(shape) + axis)
    x = rng.normal(0.5, 1.5, shape)
    c = shape[axis]
    gamma = rng.uniform(0.5, 2.0, c) if affine else None
    beta = rng.normal(size=c) if affine else None
    dy = rng.normal(size=shape)
    got = ref.batch_norm_backward(dy, x, gamma, eps=1e-2, axis=axis, center=affine)
    want = finite_difference_grads(x, gamma, beta, dy, eps=1e-2, axis=axis)
    assert _rel(got.dx, want[0]) <= 1e-6
    if affine:
        assert got.dgamma is not None and got.dbeta is not None
        assert _rel(got.dgamma, want[1]) <= 1e-6
        assert _rel(got.dbeta, want[2]) <= 1e-6
    else:
        assert got.dgamma is None and got.dbeta is None


def test_inference_backward_is_a_per_channel_scale() -> None:
    dy = np.array([[1.0, 2.0], [3.0, 4.0]])
    x = np.array([[0.0, 1.0], [2.0, 3.0]])
    g = ref.batch_norm_inference_backward(dy, x, [1.0, 1.0], [3.0, 15.0], [2.0, 4.0], eps=1.0)
    np.testing.assert_allclose(g.dx, dy * np.array([1.0, 1.0]))
    np.testing.assert_allclose(g.dbeta, [4.0, 6.0])
    np.testing.assert_allclose(g.dgamma, [(1.0 * -1 + 3.0 * 1) / 2, (2.0 * 0 + 4.0 * 2) / 4])


# --- running statistics -------------------------------------------------------------


def _batches(count: int, shape: tuple[int, ...] = (6, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.normal(i, 1 + i, shape) for i in range(count)]


def test_running_variance_is_unbiased_canonically_and_biased_on_request() -> None:
    x = _batches(1, (5, 2, 3))[0]  # n = 5 * 3 = 15 per channel
    n = 15
    stats = ref.batch_stats(x, axis=1)
    start = ref.init_running_stats(2)
    unbiased = ref.update_running_stats(start, stats, momentum=0.25)
    biased = ref.update_running_stats(start, stats, momentum=0.25, unbiased=False)
    per_channel = np.moveaxis(x, 1, 0).reshape(2, -1)
    np.testing.assert_allclose(unbiased.var, 0.75 + 0.25 * per_channel.var(1) * n / (n - 1))
    np.testing.assert_allclose(biased.var, 0.75 + 0.25 * per_channel.var(1))
    np.testing.assert_allclose(unbiased.mean, 0.25 * per_channel.mean(1))
    assert unbiased.num_batches_tracked == biased.num_batches_tracked == 1


def test_momentum_none_is_the_cumulative_average() -> None:
    batches = _batches(5)
    state = ref.init_running_stats(3)
    for b in batches:
        state = ref.update_running_stats(state, ref.batch_stats(b, axis=1), momentum=None)
    np.testing.assert_allclose(state.mean, np.mean([b.mean(0) for b in batches], 0))
    np.testing.assert_allclose(state.var, np.mean([b.var(0, ddof=1) for b in batches], 0))
    assert state.num_batches_tracked == 5


def test_momentum_weighs_the_new_statistic() -> None:
    x = np.array([[2.0], [4.0]])
    new = ref.update_running_stats(ref.init_running_stats(1), ref.batch_stats(x), momentum=0.1)
    np.testing.assert_allclose(new.mean, [0.9 * 0.0 + 0.1 * 3.0])
    np.testing.assert_allclose(new.var, [0.9 * 1.0 + 0.1 * 2.0])


@pytest.mark.parametrize("bad", [np.inf, np.nan, -np.inf])
def test_nonfinite_batch_skips_the_whole_update(bad: float) -> None:
    x = np.array([[1.0, 2.0], [3.0, bad]])
    start = ref.RunningStats(np.array([0.5, 0.5]), np.array([2.0, 2.0]), 7)
    kept = ref.update_running_stats(start, ref.batch_stats(x), momentum=0.1)
    assert kept is start  # channel 0 is finite, yet nothing moves: the update is all or none
    poisoned = ref.update_running_stats(start, ref.batch_stats(x), skip_nonfinite=False)
    assert not np.isfinite(poisoned.var[1]) and poisoned.num_batches_tracked == 8


def test_step_sequence_training_then_inference() -> None:
    spec = BatchNormSpec(momentum=0.2)
    gamma, beta = np.array([1.5, 0.5]), np.array([0.0, 1.0])
    state = ref.init_running_stats(2)
    for b in _batches(3, (4, 2)):
        _, state = ref.batch_norm_step(b, state, spec, gamma, beta, training=True)
    x = _batches(1, (4, 2))[0]
    y, after = ref.batch_norm_step(x, state, spec, gamma, beta, training=False)
    assert after is state
    expected = gamma * (x - state.mean) / np.sqrt(state.var + spec.eps) + beta
    np.testing.assert_allclose(y, expected)


def test_without_running_stats_inference_uses_the_batch() -> None:
    spec = BatchNormSpec(track_running_stats=False)
    x = _batches(1, (5, 3))[0]
    y, state = ref.batch_norm_step(x, None, spec, training=False)
    assert state is None
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + spec.eps))


def test_update_on_backward_waits_for_backward() -> None:
    spec = BatchNormSpec.from_preset("mxnet")
    x = _batches(1, (4, 2))[0]
    start = ref.init_running_stats(2)
    _, unchanged = ref.batch_norm_step(x, start, spec, training=True, backward_ran=False)
    _, updated = ref.batch_norm_step(x, start, spec, training=True, backward_ran=True)
    assert unchanged is start
    np.testing.assert_allclose(updated.var, 0.9 + 0.1 * x.var(0))


def test_scale_and_center_off_ignore_gamma_and_beta() -> None:
    spec = BatchNormSpec(scale=False, center=False)
    x = _batches(1, (4, 2))[0]
    y, _ = ref.batch_norm_step(x, None, spec, [5.0, 5.0], [9.0, 9.0], training=True)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + spec.eps))


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_one_value_per_channel_is_an_error_when_training(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.batch_norm_train(np.ones(shape))
    y, _ = ref.batch_norm_train(np.ones(shape), beta=[1.0, 2.0, 3.0], allow_single_value=True)
    np.testing.assert_array_equal(y.reshape(3), [1.0, 2.0, 3.0])


def test_batch_of_one_with_spatial_extent_trains() -> None:
    y, stats = ref.batch_norm_train(np.arange(8.0).reshape(1, 2, 4))
    assert stats.count == 4 and np.isfinite(y).all()


@pytest.mark.parametrize(
    ("x", "kwargs", "message"),
    [
        (np.ones(4), {}, "rank >= 2"),
        (np.ones((2, 3), dtype=np.int64), {}, "floating-point dtype, got int64"),
        (np.ones((2, 3)), {"axis": 2}, "axis must be an integer in"),
        (np.ones((2, 3)), {"num_features": 4}, "must have 4 features"),
    ],
)
def test_bad_input_is_named(x: np.ndarray, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ref.check_input(x, kwargs.get("axis", 1), kwargs.get("num_features"))


_X43 = np.arange(12.0).reshape(4, 3)  # C = 3 on axis 1
_ONES3 = np.ones(3)


@pytest.mark.parametrize(
    "call",
    [
        lambda dy: ref.batch_norm_backward(dy, _X43, _ONES3),
        lambda dy: ref.batch_norm_inference_backward(dy, _X43, _ONES3, _ONES3, _ONES3),
    ],
    ids=["training", "inference"],
)
@pytest.mark.parametrize("dy_shape", [(1, 3), (4, 1), (3,), (4, 3, 1)])
def test_backward_rejects_a_dy_of_another_shape(call, dy_shape: tuple[int, ...]) -> None:
    # (1, 3) and (4, 1) broadcast against x: without the check dx would come back (1, 3)
    # with dgamma summed over one row.
    with pytest.raises(ValueError, match=r"dy must have the input's shape \(4, 3\), got"):
        call(np.ones(dy_shape))


_BAD_PER_FEATURE = [np.ones(1), np.ones(4), np.ones((3, 1)), 1.0]


@pytest.mark.parametrize("bad", _BAD_PER_FEATURE, ids=["(1,)", "(4,)", "(3,1)", "scalar"])
@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("running_mean", lambda v: ref.batch_norm_inference(_X43, v, _ONES3)),
        ("running_var", lambda v: ref.batch_norm_inference(_X43, _ONES3, v)),
        ("gamma", lambda v: ref.batch_norm_inference(_X43, _ONES3, _ONES3, v)),
        ("beta", lambda v: ref.batch_norm_inference(_X43, _ONES3, _ONES3, None, v)),
        ("gamma", lambda v: ref.batch_norm_train(_X43, v)),
        ("beta", lambda v: ref.batch_norm_train(_X43, None, v)),
        ("gamma", lambda v: ref.batch_norm_backward(_X43, _X43, v)),
        (
            "running_mean",
            lambda v: ref.batch_norm_inference_backward(_X43, _X43, v, _ONES3),
        ),
        (
            "running_var",
            lambda v: ref.batch_norm_inference_backward(_X43, _X43, _ONES3, v),
        ),
        (
            "gamma",
            lambda v: ref.batch_norm_inference_backward(_X43, _X43, _ONES3, _ONES3, v),
        ),
    ],
)
def test_per_feature_arrays_must_have_one_value_per_feature(name: str, call, bad) -> None:
    # A length-1 array would broadcast over all 3 features and give wrong numbers silently.
    with pytest.raises(ValueError, match=rf"^{name} must have shape \(3,\), .* got shape"):
        call(bad)


def test_channels_last_per_feature_check_uses_the_feature_axis() -> None:
    x = np.arange(24.0).reshape(2, 3, 4)  # C = 4 on axis -1, 3 on axis 1
    y = ref.batch_norm_inference(x, np.zeros(4), np.full(4, 4.0), axis=-1, eps=0.0)
    np.testing.assert_allclose(y, x / 2.0)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)"):
        ref.batch_norm_inference(x, np.zeros(3), np.ones(4), axis=-1)


def test_statistics_given_for_another_feature_count_are_rejected() -> None:
    stats = ref.batch_stats(np.ones((4, 1)), axis=1)
    with pytest.raises(ValueError, match=r"stats.mean must have shape \(3,\)"):
        ref.batch_norm_train(_X43, stats=stats)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clipping": 0.0}, "clipping must be a finite number > 0, got 0.0"),
        ({"eps": -1.0}, "eps must be a finite number >= 0, got -1.0"),
    ],
)
def test_agc_settings_are_checked_even_when_every_parameter_is_excluded(
    kwargs: dict[str, float], message: str
) -> None:
    grads = {"fc.weight": np.ones((2, 2))}
    with pytest.raises(ValueError, match=message):
        ref.agc_clip_all(grads, grads, {"fc.weight": 0}, exclude=["fc.weight"], **kwargs)


def test_inference_without_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs running statistics"):
        ref.batch_norm_step(np.ones((2, 2)), None, BatchNormSpec(), training=False)


# --- properties ---------------------------------------------------------------------

floats = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    rank = draw(st.integers(2, 5))
    shape = draw(hnp.array_shapes(min_dims=rank, max_dims=rank, min_side=1, max_side=4))
    axis = draw(st.sampled_from([1, -1]))
    x = draw(hnp.arrays(np.float64, shape, elements=floats))
    assume(x.size // shape[axis] >= 2)
    return x, axis


@given(batches(), st.floats(1e-6, 1.0))
def test_normalised_output_has_mean_zero_and_shrunk_variance(
    case: tuple[np.ndarray, int], eps: float
) -> None:
    x, axis = case
    y, stats = ref.batch_norm_train(x, eps=eps, axis=axis)
    reduce = tuple(i for i in range(x.ndim) if i != x.ndim + axis and i != axis)
    var = stats.var()
    scale = np.sqrt(var + eps)
    np.testing.assert_allclose(y.mean(axis=reduce), 0.0, atol=1e-9 * (1 + 1e3 / scale.min()))
    np.testing.assert_allclose(y.var(axis=reduce), var / (var + eps), rtol=1e-7, atol=1e-9)


@given(batches(), st.floats(-1e4, 1e4))
def test_output_is_invariant_to_a_per_channel_shift(case: tuple[np.ndarray, int], c: float) -> None:
    x, axis = case
    channels = x.shape[axis]
    shift = c * np.arange(1, channels + 1)
    shape = [1] * x.ndim
    shape[axis] = channels
    y0, _ = ref.batch_norm_train(x, axis=axis, eps=1e-3)
    y1, _ = ref.batch_norm_train(x + shift.reshape(shape), axis=axis, eps=1e-3)
    np.testing.assert_allclose(y1, y0, atol=1e-6)


@given(
    hnp.arrays(np.float64, st.tuples(st.integers(0, 6), st.just(3)), elements=floats),
    st.lists(st.integers(0, 6), min_size=1, max_size=5),
)
def test_merging_replicas_equals_the_concatenated_batch(x: np.ndarray, cuts: list[int]) -> None:
    shards = np.split(x, sorted(min(c, len(x)) for c in cuts))  # uneven, often empty shards
    assume(len(x) > 0)
    merged = ref.merge_stats([ref.batch_stats(s, axis=1) for s in shards])
    whole = ref.batch_stats(x, axis=1)
    assert merged.count == whole.count == len(x)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9, atol=1e-6)


def test_merge_of_only_empty_replicas_is_empty() -> None:
    empty = ref.batch_stats(np.ones((0, 2)), axis=1)
    merged = ref.merge_stats([empty, empty])
    assert merged.count == 0
    y, used = ref.batch_norm_train(np.ones((0, 2)), stats=merged)  # an empty output
    assert y.shape == (0, 2) and used.count == 0


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (5, 3, 0), (0, 3, 2, 2), (0, 3, 1, 2, 2)])
@pytest.mark.parametrize("preset", [None, "torch", "keras", "mxnet"])
def test_an_empty_training_batch(shape: tuple[int, ...], preset: str | None) -> None:
    # SPEC.md section 2, *Empty batch*: an empty output; dgamma = dbeta = 0 (sums over
    # nothing); the state as the spec's empty_batch says.
    spec = BatchNormSpec.from_preset(preset)
    x = np.ones(shape, np.float32)
    gamma, beta = np.full(3, 2.0), np.full(3, 0.5)
    before = ref.RunningStats(np.array([0.5, 1.0, -2.0]), np.array([2.0, 3.0, 4.0]), 7)
    y, after = ref.batch_norm_step(x, before, spec, gamma, beta, training=True)
    assert y.shape == shape and y.dtype == np.float32
    assert after is not None
    grads = ref.batch_norm_backward(np.ones(shape), x, gamma)
    assert grads.dx.shape == shape
    np.testing.assert_array_equal(grads.dgamma, np.zeros(3))
    np.testing.assert_array_equal(grads.dbeta, np.zeros(3))
    if spec.empty_batch == "skip":  # canonical: nothing to learn from
        assert after is before
    elif spec.empty_batch == "count":  # PyTorch's layer counts the call, nothing else
        np.testing.assert_array_equal(after.mean, before.mean)
        np.testing.assert_array_equal(after.var, before.var)
        assert after.num_batches_tracked == 8
    else:  # Keras's and Gluon's layers average in the mean of nothing: NaN
        assert spec.empty_batch == "nan" and not spec.skip_nonfinite
        assert np.isnan(after.mean).all() and np.isnan(after.var).all()
        assert after.num_batches_tracked == 8


def test_an_empty_batch_with_the_guard_changes_nothing() -> None:
    spec = BatchNormSpec(empty_batch="nan")  # NaN statistics, which the guard skips
    before = ref.init_running_stats(2)
    _, after = ref.batch_norm_step(np.ones((0, 2)), before, spec, training=True)
    assert after == before


def test_an_empty_batch_counted_changes_the_cumulative_average() -> None:
    # PyTorch's momentum=None layer counts an empty call, so the next batch weighs 1/3.
    spec = BatchNormSpec.from_preset("torch", momentum=None)
    state = ref.init_running_stats(1)
    _, state = ref.batch_norm_step(np.array([[0.0], [2.0]]), state, spec, training=True)
    _, state = ref.batch_norm_step(np.ones((0, 1)), state, spec, training=True)
    _, state = ref.batch_norm_step(np.array([[4.0], [4.0]]), state, spec, training=True)
    assert state is not None and state.num_batches_tracked == 3
    np.testing.assert_allclose(state.mean, [(2.0 / 3.0) * 1.0 + (1.0 / 3.0) * 4.0])


def test_agc_clipped_units_are_the_units_agc_clip_rescales() -> None:
    rng = np.random.default_rng(11)
    g = rng.standard_normal((6, 5)) * np.array([1e-4, 1.0, 1e-4, 1.0, 1e-4, 1.0])[:, None]
    w = rng.standard_normal((6, 5))
    clipped = ref.agc_clipped_units(g, w, 0, clipping=0.01)
    out = ref.agc_clip(g, w, 0, clipping=0.01)
    assert clipped[:, 0].tolist() == [False, True, False, True, False, True]
    assert (clipped == clipped[:, :1]).all()  # whole units
    np.testing.assert_array_equal(out[~clipped], g[~clipped])
    assert (out[clipped] != g[clipped]).all()


@pytest.mark.parametrize("clip_fn", [ref.agc_clip, ref.agc_clipped_units])
@pytest.mark.parametrize(
    ("grad", "weight", "message"),
    [
        (np.ones((2, 3)), np.ones((3, 2)), r"grad and weight must share a shape, got \(2, 3\)"),
        (np.ones((2, 3), dtype=np.int64), np.ones((2, 3)), "grad must have a floating-point"),
    ],
)
def test_agc_refuses_a_grad_that_does_not_fit(
    clip_fn: Callable[..., np.ndarray], grad: np.ndarray, weight: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        clip_fn(grad, weight, 0)

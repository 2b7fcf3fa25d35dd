"""The reference's masked batches (SPEC.md section 2, *Masked batches*) against plain
NumPy written here: per-feature loops over the kept values, and central differences of a
forward pass that loops over positions."""

from __future__ import annotations

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import BatchNormSpec


def _kept_values(x: np.ndarray, keep: np.ndarray, c: int) -> np.ndarray:
    """Feature ``c``'s kept values of a channels-first ``x``."""
    return x[:, c][keep[:, c]]


def _forward(x: np.ndarray, keep: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float,
             zero: bool) -> np.ndarray:  # fmt: skip
    """Channels-first masked BatchNorm, one feature at a time."""
    y = np.empty_like(x)
    for c in range(x.shape[1]):
        kept = _kept_values(x, keep, c)
        if kept.size == 0:
            assert zero
            mean, var = 0.0, 0.0
        else:
            mean, var = kept.mean(), kept.var()
        y[:, c] = gamma[c] * (x[:, c] - mean) / np.sqrt(var + eps) + beta[c]
    return y


def _case(feature_unkept: bool = False) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, (5, 3, 4))
    keep = np.broadcast_to((rng.random((5, 3, 1)) > 0.3), x.shape).copy()
    keep[:2, 1] = True  # every feature keeps at least two values
    keep[3:, 1] = True
    if feature_unkept:
        keep[:, 2] = False
    return x, keep, rng.normal(1.0, 0.5, 3), rng.normal(0.0, 0.5, 3)


def test_masked_statistics_are_those_of_the_kept_values() -> None:
    x, keep, _, _ = _case()
    stats = ref.masked_batch_stats(x, keep, axis=1)
    for c in range(3):
        kept = _kept_values(x, keep, c)
        assert stats.count[c] == kept.size
        np.testing.assert_allclose(stats.mean[c], kept.mean(), rtol=1e-12)
        np.testing.assert_allclose(stats.m2[c], ((kept - kept.mean()) ** 2).sum(), rtol=1e-12)


def test_masked_values_take_no_part_even_when_not_finite() -> None:
    x, keep, _, _ = _case()
    noisy = np.where(keep, x, np.nan)
    a, b = ref.masked_batch_stats(x, keep), ref.masked_batch_stats(noisy, keep)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.m2, b.m2)


@pytest.mark.parametrize("unkept", [False, True])
def test_forward_and_backward_match_plain_numpy(unkept: bool) -> None:
    x, keep, gamma, beta = _case(feature_unkept=unkept)
    spec = BatchNormSpec(eps=1e-3, fully_masked="zero" if unkept else "error")
    y, _ = ref.masked_batch_norm_train(x, keep, gamma, beta, spec=spec)
    np.testing.assert_allclose(y, _forward(x, keep, gamma, beta, 1e-3, unkept), rtol=1e-12)
    dy = np.random.default_rng(3).normal(size=x.shape)
    grads = ref.masked_batch_norm_backward(dy, x, keep, gamma, spec=spec)

    def loss(x_: np.ndarray, g_: np.ndarray, b_: np.ndarray) -> float:
        return float((dy * _forward(x_, keep, g_, b_, 1e-3, unkept)).sum())

    h = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        numeric[i] = (loss(x + step, gamma, beta) - loss(x - step, gamma, beta)) / (2 * h)
    np.testing.assert_allclose(grads.dx, numeric, rtol=1e-5, atol=1e-6)
    for c in range(3):
        e = np.zeros(3)
        e[c] = h
        dg = (loss(x, gamma + e, beta) - loss(x, gamma - e, beta)) / (2 * h)
        db = (loss(x, gamma, beta + e) - loss(x, gamma, beta - e)) / (2 * h)
        np.testing.assert_allclose(grads.dgamma[c], dg, rtol=1e-6)
        np.testing.assert_allclose(grads.dbeta[c], db, rtol=1e-6)


def test_every_value_kept_is_the_unmasked_layer() -> None:
    x, _, gamma, beta = _case()
    keep = np.ones(x.shape, bool)
    spec = BatchNormSpec()
    y, _ = ref.masked_batch_norm_train(x, keep, gamma, beta, spec=spec)
    np.testing.assert_allclose(y, ref.batch_norm_train(x, gamma, beta)[0], rtol=1e-12)
    dy = np.cos(x)
    got = ref.masked_batch_norm_backward(dy, x, keep, gamma, spec=spec)
    want = ref.batch_norm_backward(dy, x, gamma)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_running_update_feeds_each_feature_its_own_count() -> None:
    x, keep, gamma, beta = _case(feature_unkept=True)
    spec = BatchNormSpec(momentum=0.25, fully_masked="zero")
    _, state = ref.batch_norm_step(
        x, ref.init_running_stats(3), spec, gamma, beta, training=True, mask=keep
    )
    assert state is not None and state.num_batches_tracked == 1
    for c in range(2):
        kept = _kept_values(x, keep, c)
        np.testing.assert_allclose(state.mean[c], 0.25 * kept.mean(), rtol=1e-12)
        np.testing.assert_allclose(state.var[c], 0.75 + 0.25 * kept.var(ddof=1), rtol=1e-12)
    # The feature of no kept value feeds 0 and 0: its statistics shrink by 1 - momentum.
    np.testing.assert_allclose([state.mean[2], state.var[2]], [0.0, 0.75])


@pytest.mark.parametrize("kept", [0, 1])
def test_too_few_kept_values_are_refused(kept: int) -> None:
    x = np.arange(8.0).reshape(4, 2)
    keep = np.zeros((4, 1), bool)
    keep[:kept] = True
    with pytest.raises(ValueError, match=f"more than 1 value per channel.*got {kept}"):
        ref.masked_batch_norm_train(x, keep, spec=BatchNormSpec())


def test_no_kept_value_under_zero_still_needs_two_where_some_are_kept() -> None:
    x = np.arange(8.0).reshape(4, 2)
    keep = np.zeros((4, 2), bool)
    keep[0, 0] = True  # feature 0 keeps one value, feature 1 none
    spec = BatchNormSpec(fully_masked="zero")
    with pytest.raises(ValueError, match="got 1"):
        ref.masked_batch_norm_train(x, keep, spec=spec)
    y, stats = ref.masked_batch_norm_train(x, keep, spec=spec.replace(allow_single_value=True))
    assert stats is not None and stats.count.tolist() == [1, 0]
    np.testing.assert_allclose(y[:, 1], x[:, 1] / np.sqrt(spec.eps))


def test_an_empty_batch_with_a_mask() -> None:
    x = np.zeros((0, 3))
    keep = np.zeros((0, 1), bool)
    y, stats = ref.masked_batch_norm_train(x, keep, spec=BatchNormSpec())
    assert y.shape == (0, 3) and stats.count.tolist() == [0, 0, 0]
    start = ref.init_running_stats(3)
    for rule in ("skip", "count"):  # an empty batch's rule holds with a mask too
        spec = BatchNormSpec(fully_masked="zero", empty_batch=rule)
        _, state = ref.batch_norm_step(x, start, spec, training=True, mask=keep)
        assert state is not None
        np.testing.assert_array_equal(state.var, start.var)
        assert state.num_batches_tracked == (rule == "count")
    # Keras's layer ("nan", its masked arithmetic): 0 and 0 are fed, not NaN.
    spec = BatchNormSpec(fully_masked="zero", empty_batch="nan", skip_nonfinite=False)
    _, state = ref.batch_norm_step(x, start, spec.replace(momentum=0.5), training=True, mask=keep)
    assert state is not None
    np.testing.assert_allclose(state.var, 0.5)


def test_bad_masks_are_refused() -> None:
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="mask must be boolean"):
        ref.masked_batch_stats(x, np.ones((4, 1)))
    with pytest.raises(ValueError, match=r"mask must broadcast to the input's shape \(4, 3\)"):
        ref.masked_batch_stats(x, np.ones((3, 1), bool))

"""BatchNorm after training in the NumPy reference (``SPEC.md`` section 8): a layer then an
inference BatchNorm, written here in plain NumPy, against the folded layer alone; the
recalibrated statistics against NumPy's over the concatenated data."""

from __future__ import annotations

import numpy as np
import pytest

from unorm import reference as ref


def _bn(
    y: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    axis: int = 1,
) -> np.ndarray:
    shape = [1] * y.ndim
    shape[axis] = -1
    g = np.ones_like(mean) if gamma is None else gamma
    b = np.zeros_like(mean) if beta is None else beta
    xhat = (y - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    out: np.ndarray = xhat * g.reshape(shape) + b.reshape(shape)
    return out


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, groups: int) -> np.ndarray:
    """Channels-first valid convolution, weight (O, I/g, kh, kw), stride 1."""
    n, _, h, wd = x.shape
    out, per, kh, kw = w.shape
    y = np.zeros((n, out, h - kh + 1, wd - kw + 1))
    per_out = out // groups
    for o in range(out):
        r = o // per_out
        for c in range(per):
            for i in range(kh):
                for j in range(kw):
                    y[:, o] += (
                        w[o, c, i, j] * x[:, r * per + c, i : i + h - kh + 1, j : j + wd - kw + 1]
                    )
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def _conv_transpose1d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, groups: int
) -> np.ndarray:
    """Channels-first transposed convolution, weight (I, O/g, k), stride 1, no padding."""
    n, cin, length = x.shape
    _, per_out, k = w.shape
    per_in = cin // groups
    y = np.zeros((n, per_out * groups, length + k - 1))
    for i in range(cin):
        r = i // per_in
        for j in range(per_out):
            for t in range(k):
                y[:, r * per_out + j, t : t + length] += w[i, j, t] * x[:, i]
    return y if b is None else y + b.reshape(1, -1, 1)


def _stats(
    rng: np.random.Generator, c: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return rng.normal(size=c), rng.uniform(0.2, 3.0, c), rng.normal(size=c), rng.normal(size=c)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_a_grouped_convolution(groups: int, with_bias: bool) -> None:
    rng = np.random.default_rng(groups)
    w = rng.normal(size=(8, 4 // groups if groups < 4 else 1, 3, 3))
    if groups == 4:  # depthwise with multiplier 2: (I*M, 1, kh, kw)
        w = rng.normal(size=(8, 1, 3, 3))
    b = rng.normal(size=8) if with_bias else None
    mean, var, gamma, beta = _stats(rng, 8)
    x = rng.normal(size=(2, 4, 6, 6))
    expected = _bn(_conv2d(x, w, b, groups), mean, var, gamma, beta, 1e-5)
    fw, fb = ref.fold_batch_norm(w, b, mean, var, gamma, beta, eps=1e-5, out_axes=0)
    np.testing.assert_allclose(_conv2d(x, fw, fb, groups), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 3])
def test_fold_into_a_grouped_transposed_convolution_on_the_grouped_view(groups: int) -> None:
    rng = np.random.default_rng(10 + groups)
    cin, per_out = 6, 2
    w = rng.normal(size=(cin, per_out, 3))  # PyTorch/MXNet (I, O/g, k)
    b = rng.normal(size=per_out * groups)
    mean, var, gamma, beta = _stats(rng, per_out * groups)
    x = rng.normal(size=(2, cin, 5))
    expected = _bn(_conv_transpose1d(x, w, b, groups), mean, var, gamma, beta, 1e-3)
    view = (groups, cin // groups, per_out, 3)
    axes = (0, 2) if groups > 1 else 1
    fw, fb = ref.fold_batch_norm(
        w, b, mean, var, gamma, beta, eps=1e-3, out_axes=axes, view=view if groups > 1 else None
    )
    np.testing.assert_allclose(
        _conv_transpose1d(x, fw, fb, groups), expected, rtol=1e-10, atol=1e-10
    )
    if groups > 1:  # axis 1 alone scales every group by group 0's factors: wrong
        naive = w * (gamma / np.sqrt(var + 1e-3))[:per_out].reshape(1, -1, 1)
        assert not np.allclose(_conv_transpose1d(x, naive, fb, groups), expected)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_fold_into_a_dense_layer_in_either_layout(layout: str) -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 7))  # (out, in)
    b = rng.normal(size=5)
    mean, var, gamma, beta = _stats(rng, 5)
    x = rng.normal(size=(4, 7))
    expected = _bn(x @ w.T + b, mean, var, gamma, beta, 1e-5)
    if layout == "out_in":
        fw, fb = ref.fold_batch_norm(w, b, mean, var, gamma, beta, out_axes=0)
        got = x @ fw.T + fb
    else:  # Keras (in, units): the output channel is the last axis
        fw, fb = ref.fold_batch_norm(w.T.copy(), b, mean, var, gamma, beta, out_axes=-1)
        got = x @ fw + fb
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_fold_into_a_channels_last_depthwise_kernel_on_two_axes() -> None:
    rng = np.random.default_rng(4)
    k = rng.normal(size=(3, 3, 2, 3))  # Keras DepthwiseConv2D (kh, kw, I, M)
    mean, var, gamma, beta = _stats(rng, 6)
    fw, fb = ref.fold_batch_norm(k, None, mean, var, gamma, beta, out_axes=(-2, -1))
    s = gamma / np.sqrt(var + 1e-5)
    for i in range(2):
        for m in range(3):
            np.testing.assert_allclose(fw[:, :, i, m], k[:, :, i, m] * s[i * 3 + m], rtol=1e-12)
    np.testing.assert_allclose(fb, -mean * s + beta, rtol=1e-12)


def test_fold_without_scale_or_center_and_in_the_layers_dtype() -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(size=(3, 2)).astype(np.float16)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    fw, fb = ref.fold_batch_norm(w, None, mean, var, None, None, eps=0.0)
    assert fw.dtype == np.float16 and fb.dtype == np.float16
    exact = w.astype(np.float64) / np.sqrt(var).reshape(-1, 1)
    np.testing.assert_array_equal(fw, exact.astype(np.float16))  # rounded once
    np.testing.assert_array_equal(fb, (-mean / np.sqrt(var)).astype(np.float16))


def test_fold_refuses_statistics_of_the_wrong_length_and_repeated_axes() -> None:
    w = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"running_var must have shape \(4,\).*got shape \(3,\)"):
        ref.fold_batch_norm(w, None, np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="out_axes must name one or more distinct axes"):
        ref.fold_batch_norm(w, None, np.zeros(12), np.ones(12), out_axes=(0, -2))
    with pytest.raises(ValueError, match="view must hold the weight's 12 values"):
        ref.fold_batch_norm(w, None, np.zeros(4), np.ones(4), view=(5, 3))


@pytest.mark.parametrize("unbiased", [True, False])
def test_recalibrated_stats_are_those_of_the_whole_data_set(unbiased: bool) -> None:
    rng = np.random.default_rng(6)
    data = rng.normal(3.0, 2.0, size=(23, 4, 5))  # an uneven last batch: 8, 8, 7
    batches = [data[:8], data[8:16], data[16:], data[:0]]  # an empty one counts nothing
    got = ref.recalibrated_stats(batches, axis=1, unbiased=unbiased)
    flat = np.moveaxis(data, 1, 0).reshape(4, -1)
    np.testing.assert_allclose(got.mean, flat.mean(1), rtol=1e-12)
    np.testing.assert_allclose(got.var, flat.var(1, ddof=1 if unbiased else 0), rtol=1e-12)
    assert got.num_batches_tracked == 3
    averaged = np.mean([np.moveaxis(b, 1, 0).reshape(4, -1).var(1, ddof=1) for b in batches[:3]], 0)
    assert not np.allclose(averaged, flat.var(1, ddof=1), rtol=1e-3)  # pycls#93's mistake


def test_recalibrated_stats_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="batches must yield at least one batch, got none"):
        ref.recalibrated_stats([])
    bad = np.ones((2, 3))
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"batches\[1\] gives non-finite statistics"):
        ref.recalibrated_stats([np.ones((2, 3)), bad])
    with pytest.raises(ValueError, match="batches hold no values"):
        ref.recalibrated_stats([np.ones((0, 3))])
    one = ref.recalibrated_stats([np.array([[2.0, 5.0]])])  # N == 1: the biased feed, 0
    assert one.var.tolist() == [0.0, 0.0]

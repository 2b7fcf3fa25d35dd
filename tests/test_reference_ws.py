"""Scaled Weight Standardisation in the NumPy reference: formulas and gradients."""

from __future__ import annotations

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import ScaledWSSpec


@pytest.mark.parametrize("style", ["deepmind", "timm"])
def test_standardised_units_have_mean_zero_and_the_right_scale(style: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(2.0, 3.0, (5, 3, 3, 3))  # PyTorch conv (O, I, kh, kw): fan_in 27
    gain = rng.uniform(0.5, 2.0, 5)
    out = ref.scaled_weight_standardize(w, gain, 0, style=style)
    flat = out.reshape(5, -1)
    np.testing.assert_allclose(flat.mean(1), 0.0, atol=1e-12)
    var = w.reshape(5, -1).var(1)
    eps = ScaledWSSpec(style=style).eps
    if style == "deepmind":
        expected_std = gain * np.sqrt(var) / np.sqrt(np.maximum(var * 27, eps))
    else:
        expected_std = gain * np.sqrt(var) / np.sqrt((var + eps) * 27)
    np.testing.assert_allclose(flat.std(1), expected_std, rtol=1e-12)


def test_deepmind_and_timm_differ_only_through_eps() -> None:
    w = np.random.default_rng(1).normal(size=(4, 8))
    a = ref.scaled_weight_standardize(w, style="deepmind", eps=0.0)
    b = ref.scaled_weight_standardize(w, style="timm", eps=0.0)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not np.allclose(
        ref.scaled_weight_standardize(w * 1e-3, style="deepmind"),
        ref.scaled_weight_standardize(w * 1e-3, style="timm"),
    )


@pytest.mark.parametrize("style", ["deepmind", "timm"])
@pytest.mark.parametrize(("shape", "axes"), [((4, 3, 3, 3), 0), ((3, 3, 2, 4), -1), ((6, 5), 0)])
def test_backward_matches_finite_differences(style: str, shape: tuple[int, ...], axes: int) -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=shape) * 0.2
    units = shape[axes]
    gain = rng.uniform(0.5, 1.5, units)
    dy = rng.normal(size=shape)
    dw, dgain = ref.scaled_weight_standardize_backward(dy, w, gain, axes, style=style)

    def loss(wv: np.ndarray, gv: np.ndarray) -> float:
        return float((dy * ref.scaled_weight_standardize(wv, gv, axes, style=style)).sum())

    step = 1e-6
    num_w = np.zeros_like(w)
    for i in np.ndindex(*w.shape):
        plus, minus = w.copy(), w.copy()
        plus[i] += step
        minus[i] -= step
        num_w[i] = (loss(plus, gain) - loss(minus, gain)) / (2 * step)
    num_g = np.zeros_like(gain)
    for j in range(units):
        plus, minus = gain.copy(), gain.copy()
        plus[j] += step
        minus[j] -= step
        num_g[j] = (loss(w, plus) - loss(w, minus)) / (2 * step)
    assert np.abs(dw - num_w).max() <= 1e-6 * max(1.0, np.abs(num_w).max())
    assert np.abs(dgain - num_g).max() <= 1e-6 * max(1.0, np.abs(num_g).max())


def test_bad_settings_and_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="style must be one of 'deepmind', 'timm', got 'nf'"):
        ScaledWSSpec(style="nf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps must be a finite number >= 0 or None, got -1"):
        ScaledWSSpec(eps=-1)
    with pytest.raises(ValueError, match="fan_in >= 1"):
        ref.scaled_weight_standardize(np.ones((3, 0, 3, 3)))

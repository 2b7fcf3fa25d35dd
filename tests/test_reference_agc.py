"""AGC in the NumPy reference: hand-computed cases, layouts, and the invariants of SPEC.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unorm import reference as ref
from unorm.spec import output_unit_axes


def test_clips_a_row_to_the_threshold() -> None:
    w = np.array([[3.0, 4.0], [0.0, 0.0]])  # row norms 5 and 0 (floored to eps)
    g = np.array([[0.3, 0.4], [0.1, 0.0]])  # row norms 0.5 and 0.1
    out = ref.agc_clip(g, w, 0, clipping=0.01, eps=1e-3)
    np.testing.assert_allclose(out[0], np.array([0.3, 0.4]) * 0.05 / 0.5)
    np.testing.assert_allclose(out[1], [1e-5, 0.0])


def test_units_under_the_threshold_are_bit_for_bit_unchanged() -> None:
    g = np.array([[1e-3, 2e-3], [5.0, 5.0]], dtype=np.float32)
    w = np.ones((2, 2), dtype=np.float32)
    out = ref.agc_clip(g, w, 0, clipping=0.01)
    assert out.dtype == np.float32
    assert out[0].tobytes() == g[0].tobytes()
    assert np.linalg.norm(out[1]) == pytest.approx(0.01 * np.sqrt(2), rel=1e-6)


def test_unit_at_the_threshold_is_not_clipped() -> None:
    w = np.array([[0.0, 100.0]])
    g = np.array([[0.0, 1.0]])  # ||G|| == 0.01 * ||W|| exactly: '>' is strict
    assert ref.agc_clip(g, w, 0).tobytes() == g.tobytes()


def test_rank_le_1_is_one_unit() -> None:
    w = np.array([3.0, 4.0])
    g = np.array([1.0, 0.0])
    np.testing.assert_allclose(ref.agc_clip(g, w, None), [0.05, 0.0])
    # a scalar gain is one unit too
    np.testing.assert_allclose(ref.agc_clip(np.float64(2.0), np.float64(10.0), 0), 0.1)


@pytest.mark.parametrize(
    ("framework", "kind", "shape", "logical"),
    [
        # logical layout: (out, in, kh, kw); each framework stores it its own way
        ("torch", "conv", (4, 3, 2, 2), lambda a: a),
        ("keras", "conv", (2, 2, 3, 4), lambda a: a.transpose(2, 3, 1, 0)),
        ("torch", "conv_transpose", (3, 4, 2, 2), lambda a: a.transpose(1, 0, 2, 3)),
        ("mxnet", "conv_transpose", (3, 4, 2, 2), lambda a: a.transpose(1, 0, 2, 3)),
        ("keras", "conv_transpose", (2, 2, 4, 3), lambda a: a.transpose(2, 3, 0, 1)),
    ],
)
def test_layouts_clip_the_same_logical_units(
    framework: str, kind: str, shape: tuple[int, ...], logical: object
) -> None:
    rng = np.random.default_rng(0)
    w_logical = rng.normal(size=(4, 3, 2, 2))
    g_logical = (
        rng.normal(size=(4, 3, 2, 2)) * np.array([0.001, 0.1, 1.0, 0.0])[:, None, None, None]
    )
    to_layout = logical  # maps a logical (out, in, kh, kw) array to the framework's layout
    w, g = to_layout(w_logical), to_layout(g_logical)  # type: ignore[operator]
    assert w.shape == shape
    axes = output_unit_axes(framework, kind, w.ndim)
    expected = ref.agc_clip(g_logical, w_logical, 0)
    np.testing.assert_allclose(ref.agc_clip(g, w, axes), to_layout(expected))  # type: ignore[operator]


def test_keras_depthwise_units_are_input_times_multiplier() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 2, 4))  # (kh, kw, I, M): output channel i*M + m
    g = rng.normal(size=w.shape)
    out = ref.agc_clip(g, w, output_unit_axes("keras", "depthwise_conv", 4))
    flat_w = w.reshape(9, 8).T  # rows are output channels
    flat_g = g.reshape(9, 8).T
    np.testing.assert_allclose(out.reshape(9, 8).T, ref.agc_clip(flat_g, flat_w, 0))


def test_zero_weight_uses_the_eps_floor() -> None:
    g = np.full((2, 3), 1.0)
    out = ref.agc_clip(g, np.zeros((2, 3)), 0, clipping=0.1, eps=1e-2)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), [1e-3, 1e-3])


def test_zero_gradient_stays_zero() -> None:
    out = ref.agc_clip(np.zeros((2, 2)), np.ones((2, 2)), 0)
    np.testing.assert_array_equal(out, 0.0)


def test_nonfinite_gradient_units_are_left_alone() -> None:
    g = np.array([[np.inf, 1.0], [np.nan, 0.0], [10.0, 0.0]])
    out = ref.agc_clip(g, np.ones((3, 2)), 0)
    assert np.isposinf(out[0, 0]) and out[0, 1] == 1.0
    assert np.isnan(out[1, 0]) and out[1, 1] == 0.0
    np.testing.assert_allclose(out[2], [0.01 * np.sqrt(2), 0.0])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="clipping must be a finite number > 0, got 0"):
        ref.agc_clip(np.ones(2), np.ones(2), None, clipping=0)
    with pytest.raises(ValueError, match="share a shape"):
        ref.agc_clip(np.ones(2), np.ones(3), None)
    with pytest.raises(ValueError, match="floating-point dtype"):
        ref.agc_clip(np.ones(2, dtype=np.int32), np.ones(2), None)
    with pytest.raises(ValueError, match="unit_axes must be an integer"):
        ref.agc_clip(np.ones((2, 2)), np.ones((2, 2)), 2)


def test_clip_all_excludes_by_name_and_needs_axes_for_matrices() -> None:
    grads = {"conv.w": np.ones((2, 2)), "fc.w": np.ones((2, 2)), "fc.b": np.ones(2)}
    weights = {k: np.full_like(v, 0.5) for k, v in grads.items()}
    out = ref.agc_clip_all(grads, weights, {"conv.w": 0, "fc.w": 0}, exclude=["fc.w", "fc.b"])
    assert out["fc.w"] is grads["fc.w"] or np.array_equal(out["fc.w"], grads["fc.w"])
    np.testing.assert_array_equal(out["fc.b"], grads["fc.b"])
    np.testing.assert_allclose(np.linalg.norm(out["conv.w"], axis=1), 0.01 * np.sqrt(0.5))
    with pytest.raises(ValueError, match=r"output-unit axis of parameter 'conv\.w' \(shape"):
        ref.agc_clip_all(grads, weights, {})
    with pytest.raises(ValueError, match=r"exclude names no parameter .*\['head\.w'\]"):
        ref.agc_clip_all(grads, weights, {"conv.w": 0, "fc.w": 0}, exclude=["head.w"])


@st.composite
def agc_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int | None]:
    rank = draw(st.integers(0, 5))
    shape = draw(hnp.array_shapes(min_dims=rank, max_dims=rank, min_side=1, max_side=4))
    elements = st.floats(-10, 10, allow_nan=False, width=32)
    w = draw(hnp.arrays(np.float32, shape, elements=elements))
    g = draw(hnp.arrays(np.float32, shape, elements=elements))
    axis = draw(st.integers(0, rank - 1)) if rank >= 2 else None
    return g, w, axis


@given(agc_cases(), st.floats(1e-3, 1.0))
def test_agc_invariants(case: tuple[np.ndarray, np.ndarray, int | None], clipping: float) -> None:
    g, w, axis = case
    out = ref.agc_clip(g, w, axis, clipping=clipping)
    g_norm = ref.unit_norms(g, axis)
    out_norm = ref.unit_norms(out, axis)
    limit = clipping * np.maximum(ref.unit_norms(w, axis), 1e-3)
    # never raises a unit's norm (one float32 rounding of slack)
    assert np.all(out_norm <= g_norm * (1 + 1e-6))
    clipped = np.broadcast_to(g_norm > limit, g.shape)
    # units under the threshold are unchanged bit for bit
    assert np.array_equal(out[~clipped], g[~clipped])
    # clipped units land on the threshold
    big = (g_norm > limit).ravel()
    np.testing.assert_allclose(out_norm.ravel()[big], limit.ravel()[big], rtol=1e-6)

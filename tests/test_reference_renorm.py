"""Batch Renormalization's settings and its NumPy reference, against the paper's formulas
written in the tests (tests/renorm_formulas.py)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from renorm_formulas import paper_steps

from unorm import reference as ref
from unorm.spec import BatchNormSpec


def _data(seed: int, shape: tuple[int, ...], steps: int = 4) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    xs = [rng.normal(2.0 * k, 1.0 + k, shape) for k in range(steps)]
    dys = [rng.normal(size=shape) for _ in range(steps)]
    return xs, dys


@pytest.mark.parametrize(
    ("spec_kwargs", "paper_kwargs"),
    [
        ({}, {}),
        (
            {"renorm_rmax": 1.5, "renorm_rmin": 0.7, "renorm_dmax": 0.3, "renorm_momentum": 0.2},
            {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3, "renorm_momentum": 0.2},
        ),
        (
            {"running_var": "biased", "renorm_running": "stddev", "eps": 1e-3},
            {"unbiased": False, "stddev": True, "eps": 1e-3},
        ),
        ({"axis": -1, "momentum": 0.3}, {"axis": -1, "momentum": 0.3}),
    ],
)
def test_reference_equals_paper(spec_kwargs: dict, paper_kwargs: dict) -> None:
    spec = BatchNormSpec(renorm=True, **spec_kwargs)
    shape = (6, 3, 4) if spec.axis == 1 else (6, 4, 3)
    xs, dys = _data(0, shape)
    gamma, beta = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
    want = paper_steps(xs, dys, gamma, beta, **paper_kwargs)
    running, renorm = ref.init_running_stats(3), ref.RenormStats.initial(3, spec)
    for x, dy, step in zip(xs, dys, want, strict=True):
        y, _, r, d = ref.batch_renorm_train(x, renorm, gamma, beta, spec=spec)
        grads = ref.batch_renorm_backward(dy, x, r, d, gamma, eps=spec.eps, axis=spec.axis)
        y2, running, renorm = ref.batch_renorm_step(x, running, renorm, spec, gamma, beta,
                                                     training=True)  # fmt: skip
        np.testing.assert_allclose(y, step["y"], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_allclose(grads.dx, step["dx"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads.dgamma, step["dgamma"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads.dbeta, step["dbeta"], rtol=1e-12)
        for name in ("running_mean", "running_var"):
            np.testing.assert_allclose(getattr(running, name[8:]), step[name], rtol=1e-12)
        np.testing.assert_allclose(renorm.mean, step["renorm_mean"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(renorm.std, step["renorm_std"], rtol=1e-12)
    assert running.num_batches_tracked == len(xs)


def test_first_call_unclipped_passes_the_input_through() -> None:
    # SPEC.md section 2, *The first steps*: renorm statistics 0 and 1 give r = sigma_B, d = mean.
    spec = BatchNormSpec(renorm=True, eps=0.0)
    x = np.random.default_rng(1).normal(3.0, 2.0, (8, 2))
    y, *_ = ref.batch_renorm_train(x, ref.RenormStats.initial(2, spec), spec=spec)
    np.testing.assert_allclose(y, x, rtol=1e-12)


def test_plain_batchnorm_bounds_give_plain_batchnorm() -> None:
    spec = BatchNormSpec(renorm=True, renorm_rmax=1.0, renorm_rmin=1.0, renorm_dmax=0.0)
    x = np.random.default_rng(2).normal(3.0, 2.0, (8, 2))
    y, *_ = ref.batch_renorm_train(x, ref.RenormStats.initial(2, spec), spec=spec)
    plain, _ = ref.batch_norm_train(x, eps=spec.eps)
    np.testing.assert_allclose(y, plain, rtol=1e-12, atol=1e-12)


def test_guard_skips_the_whole_update_and_native_preset_does_not() -> None:
    x = np.ones((4, 2))
    x[0, 1] = np.inf
    spec = BatchNormSpec(renorm=True)
    running, renorm = ref.init_running_stats(2), ref.RenormStats.initial(2, spec)
    _, running2, renorm2 = ref.batch_renorm_step(x, running, renorm, spec, training=True)
    assert running2 is running and renorm2 is renorm
    keras = BatchNormSpec.from_preset("keras", axis=-1, renorm=True)
    _, running3, renorm3 = ref.batch_renorm_step(
        x, running, ref.RenormStats.initial(2, keras), keras, training=True
    )
    assert running3.num_batches_tracked == 1 and not np.isfinite(renorm3.std[1])


def test_empty_batch_follows_empty_batch() -> None:
    x = np.zeros((0, 2))
    for rule, tracked in (("skip", 0), ("count", 1), ("nan", 1)):
        spec = BatchNormSpec(renorm=True, empty_batch=rule, skip_nonfinite=False)
        y, running, renorm = ref.batch_renorm_step(
            x, ref.init_running_stats(2), ref.RenormStats.initial(2, spec), spec, training=True
        )
        assert y.shape == (0, 2) and running.num_batches_tracked == tracked
        assert np.isnan(renorm.mean).all() == (rule == "nan")


def test_inference_uses_running_statistics() -> None:
    spec = BatchNormSpec(renorm=True)
    running = ref.RunningStats(np.array([1.0]), np.array([4.0]), 3)
    renorm = ref.RenormStats(np.array([50.0]), np.array([9.0]))
    y, r2, n2 = ref.batch_renorm_step(np.array([[3.0], [5.0]]), running, renorm, spec,
                                      training=False)  # fmt: skip
    np.testing.assert_allclose(y.ravel(), (np.array([3.0, 5.0]) - 1) / math.sqrt(4 + 1e-5))
    assert r2 is running and n2 is renorm


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"renorm_rmax": 0.0}, "renorm_rmax must be a number > 0 or None, got 0.0"),
        ({"renorm_rmax": math.inf}, "renorm_rmax must be a number > 0 or None, got inf"),
        ({"renorm_rmin": -0.5}, "renorm_rmin must be a number >= 0 or None, got -0.5"),
        ({"renorm_rmin": 2.0, "renorm_rmax": 1.5}, "renorm_rmin must be a number <= renorm_rmax"),
        ({"renorm_dmax": -1}, "renorm_dmax must be a number >= 0 or None, got -1"),
        ({"renorm_momentum": 1.5}, "renorm_momentum must be a number in [0, 1], got 1.5"),
        ({"renorm_momentum": None}, "renorm_momentum must be a number in [0, 1], got None"),
        ({"renorm": 1}, "renorm must be True or False, got 1"),
        ({"renorm_running": "std"}, "renorm_running must be one of 'variance', 'stddev'"),
        (
            {"renorm": True, "track_running_stats": False},
            "renorm must be False with track_running_stats=False",
        ),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        BatchNormSpec(**kwargs)


def test_keras_arguments_translate() -> None:
    spec = BatchNormSpec.from_native(
        "keras", renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0}, renorm_momentum=0.9
    )
    assert spec.renorm and spec.renorm_rmax == 3.0 and spec.renorm_rmin is None
    assert spec.renorm_dmax == 5.0 and spec.renorm_momentum == 1.0 - 0.9
    assert spec.renorm_running == "stddev" and spec.native_gaps("keras") == []
    assert spec.renorm_clipping == {"rmax": 3.0, "dmax": 5.0}
    # Keras's defaults for missing bounds (inf, 0, inf) are no bound.
    assert BatchNormSpec.clipping_settings({"rmax": math.inf, "rmin": 0.0}) == {
        "renorm_rmax": None, "renorm_rmin": None, "renorm_dmax": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match="renorm_clipping must be a dict with keys among"):
        BatchNormSpec.clipping_settings({"r_max": 3.0})


def test_native_gaps() -> None:
    assert "renorm=True" in BatchNormSpec(renorm=True).native_gaps("torch")
    assert "renorm=True" in BatchNormSpec(renorm=True).native_gaps("mxnet")
    canonical = BatchNormSpec.from_preset("keras", renorm=True, renorm_running="variance")
    assert canonical.native_gaps("keras") == ["renorm_running='variance'"]
    assert BatchNormSpec(renorm_rmax=2.0).native_gaps("torch") == BatchNormSpec().native_gaps(
        "torch"
    )  # the bounds act only with renorm=True

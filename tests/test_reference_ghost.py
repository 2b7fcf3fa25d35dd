"""Ghost batches in the settings and the NumPy reference, against plain BatchNorm on each
group written in the tests (tests/ghost_formulas.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from ghost_formulas import per_group

from unorm import reference as ref
from unorm.spec import BatchNormSpec

GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])


@pytest.mark.parametrize(
    ("batch", "size", "feed", "axis"),
    [(12, 4, "batch", 1), (10, 4, "batch", 1), (10, 4, "groups", 1), (7, 3, "groups", -1)],
)
def test_reference_equals_plain_batchnorm_per_group(
    batch: int, size: int, feed: str, axis: int
) -> None:
    spec = BatchNormSpec(axis=axis, virtual_batch_size=size, ghost_running=feed)
    rng = np.random.default_rng(0)
    shape = (batch, 3, 2) if axis == 1 else (batch, 2, 3)
    x, dy = rng.normal(1.0, 2.0, shape), rng.normal(size=shape)
    want = per_group(x, dy, size, GAMMA, BETA, axis=axis, feed=feed)
    y, running = ref.batch_norm_step(x, ref.init_running_stats(3), spec, GAMMA, BETA, training=True)
    grads = ref.ghost_batch_norm_backward(dy, x, GAMMA, spec=spec)
    np.testing.assert_allclose(y, want["y"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.dx, want["dx"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads.dgamma, want["dgamma"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads.dbeta, want["dbeta"], rtol=1e-12)
    assert running is not None and running.num_batches_tracked == 1
    np.testing.assert_allclose(running.mean, 0.1 * want["mean"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(running.var, 0.9 + 0.1 * want["var"], rtol=1e-12)


def test_inference_is_never_grouped() -> None:
    spec = BatchNormSpec(virtual_batch_size=4)
    running = ref.RunningStats(np.zeros(3), np.ones(3), 1)
    x = np.random.default_rng(1).normal(size=(3, 3))  # fewer samples than a group
    y, _ = ref.batch_norm_step(x, running, spec, training=False)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"virtual_batch_size": 1}, "virtual_batch_size must be an integer >= 2 or None, got 1"),
        ({"virtual_batch_size": 2.0}, "virtual_batch_size must be an integer >= 2 or None"),
        ({"virtual_batch_size": True}, "virtual_batch_size must be an integer >= 2 or None"),
        ({"ghost_running": "mean"}, "ghost_running must be one of 'batch', 'groups'"),
        ({"virtual_batch_size": 4, "renorm": True}, "virtual_batch_size must be None with renorm"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        BatchNormSpec(**kwargs)


def test_bad_batches() -> None:
    spec = BatchNormSpec(virtual_batch_size=8)
    with pytest.raises(
        ValueError, match="at most the batch size in training, got 8 for a batch of 6"
    ):
        ref.batch_norm_step(np.ones((6, 3)), ref.init_running_stats(3), spec, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # a last group of 1
        ref.batch_norm_step(
            np.ones((9, 3)), ref.init_running_stats(3), spec.replace(virtual_batch_size=4),
            training=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="axis must not be 0 with virtual_batch_size"):
        ref.ghost_batch_norm_train(
            np.ones((4, 3)), spec=BatchNormSpec(axis=0, virtual_batch_size=2)
        )
    assert "virtual_batch_size=8" in spec.native_gaps("keras")

"""unorm.keras.accumulate: k micro-batches give each BatchNorm the moving statistics of one
call on their union (NumPy on the concatenated batch, written in the tests), eagerly, in
a tf.function and in model.fit with gradient accumulation."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm.keras import BatchNorm, accumulate  # noqa: E402

TOL = {"rtol": 2e-5, "atol": 1e-6}


def _union(parts: list[np.ndarray], momentum: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    whole = np.concatenate(parts).reshape(-1, parts[0].shape[-1])
    n = whole.shape[0]
    return momentum * whole.mean(0), (1 - momentum) + momentum * whole.var(0) * n / (n - 1)


@pytest.mark.parametrize("traced", [False, True])
def test_uneven_micro_batches_give_the_union(traced: bool) -> None:
    model = keras.Sequential([keras.Input((4, 3)), BatchNorm()])
    layer = model.layers[0]
    rng = np.random.default_rng(0)
    parts = [
        rng.normal(k, 1 + k, (size, 4, 3)).astype("float32") for k, size in enumerate((5, 2, 7))
    ]
    with accumulate(model, steps=3):
        step = tf.function(lambda x: model(x, training=True)) if traced else None
        for part in parts:
            y = step(tf.constant(part)) if step is not None else model(part, training=True)
            mean = part.mean(axis=(0, 1))
            want = (part - mean) / np.sqrt(part.var(axis=(0, 1)) + 1e-5)
            np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)
    mean, var = _union(parts)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), mean, **TOL)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), var, **TOL)
    assert layer.accumulation is None and len(layer.weights) == 4  # nothing left behind


def test_fit_with_gradient_accumulation_and_a_partial_last_step() -> None:
    keras.utils.set_random_seed(0)
    norm = BatchNorm()
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(3), norm, keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0, gradient_accumulation_steps=2), loss="mse")
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(12, 3)).astype("float32"), rng.normal(size=(12, 1)).astype("float32")
    hidden = np.asarray(model.layers[0](x))  # the Dense layer does not learn (lr 0)
    with accumulate(model, steps=2):
        model.fit(x, t, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 3 micro-batches
    # Steps {0, 1} and the partial {2}: two updates.
    mean1, var1 = _union([hidden[:8]])
    whole = hidden[8:]
    mean2 = 0.9 * mean1 + 0.1 * whole.mean(0)
    var2 = 0.9 * var1 + 0.1 * whole.var(0) * 4 / 3
    np.testing.assert_allclose(np.asarray(norm.moving_mean), mean2, **TOL)
    np.testing.assert_allclose(np.asarray(norm.moving_variance), var2, **TOL)


def test_a_nonfinite_micro_batch_skips_the_whole_step_and_refusals() -> None:
    model = keras.Sequential([keras.Input((3,)), BatchNorm()])
    layer = model.layers[0]
    bad = np.ones((4, 3), "float32")
    bad[0, 1] = np.nan
    with accumulate(model, steps=2):
        model(np.random.default_rng(2).normal(size=(4, 3)).astype("float32"), training=True)
        model(bad, training=True)
    np.testing.assert_array_equal(np.asarray(layer.moving_variance), np.ones(3))
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        accumulate(model, steps=0).__enter__()
    with pytest.raises(ValueError, match="renorm=True, virtual_batch_size"):
        ghost = keras.Sequential([keras.Input((3,)), BatchNorm(virtual_batch_size=2)])
        accumulate(ghost, steps=2).__enter__()
    with pytest.raises(ValueError, match="accumulate needs a model with at least one BatchNorm"):
        accumulate(
            keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), steps=2
        ).__enter__()

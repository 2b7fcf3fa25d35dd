"""unorm.keras.BatchNorm(virtual_batch_size=...) against plain BatchNorm on each group
written in the tests (tests/ghost_formulas.py): eager, under XLA with a batch size known
only when the graph runs, in model.fit, and through .keras save and load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ghost_formulas import per_group

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm.keras import BatchNorm  # noqa: E402

GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
TOL = {"rtol": 2e-5, "atol": 2e-5}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    ("batch", "size", "feed"), [(12, 4, "batch"), (10, 4, "batch"), (10, 4, "groups")]
)
def test_equals_plain_batchnorm_per_group(batch: int, size: int, feed: str, compiled: bool) -> None:
    layer = BatchNorm(virtual_batch_size=size, ghost_running=feed)
    layer.build((None, 2, 3))
    layer.gamma.assign(GAMMA.astype("float32"))
    layer.beta.assign(BETA.astype("float32"))
    rng = np.random.default_rng(0)
    x, dy = rng.normal(1.0, 2.0, (batch, 2, 3)), rng.normal(size=(batch, 2, 3))
    want = per_group(x, dy, size, GAMMA, BETA, axis=-1, feed=feed)

    def step(x: Any, dy: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return (y, *tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy))

    spec = [tf.TensorSpec((None, 2, 3)), tf.TensorSpec((None, 2, 3))]  # batch size unknown
    run = tf.function(step, jit_compile=True, input_signature=spec) if compiled else step
    got = run(tf.constant(x, tf.float32), tf.constant(dy, tf.float32))
    for value, key in zip(got, ("y", "dx", "dgamma", "dbeta"), strict=True):
        np.testing.assert_allclose(np.asarray(value), want[key], **TOL, err_msg=key)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), 0.1 * want["mean"], **TOL)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), 0.9 + 0.1 * want["var"], **TOL)
    small = rng.normal(size=(3, 2, 3)).astype("float32")  # fewer samples than a group
    expected = (small - np.asarray(layer.moving_mean)) / np.sqrt(
        np.asarray(layer.moving_variance) + 1e-5
    )
    np.testing.assert_allclose(np.asarray(layer(small)), GAMMA * expected + BETA, **TOL)


def test_fit_save_and_load(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(BatchNorm(virtual_batch_size=4)(keras.layers.Dense(3)(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(30, 4)).astype("float32"), rng.normal(size=(30, 1)).astype("float32")
    model.fit(x, t, batch_size=10, epochs=2, verbose=0)  # batches of 10: groups of 4, 4, 2
    path = tmp_path / "ghost.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[2].spec == model.layers[2].spec
    assert loaded.layers[2].get_config()["virtual_batch_size"] == 4
    np.testing.assert_array_equal(loaded.predict(x[:3], verbose=0), model.predict(x[:3], verbose=0))


def test_bad_input_changes_nothing() -> None:
    layer = BatchNorm(virtual_batch_size=4)
    layer.build((None, 3))
    before = [np.asarray(w).copy() for w in layer.weights]
    with pytest.raises(
        ValueError, match="at most the batch size in training, got 4 for a batch of 3"
    ):
        layer(np.ones((3, 3), "float32"), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((9, 3), "float32"), training=True)
    for a, w in zip(before, layer.weights, strict=True):
        np.testing.assert_array_equal(a, np.asarray(w))
    with pytest.raises(ValueError, match="virtual_batch_size must be an integer >= 2 or None"):
        BatchNorm(virtual_batch_size=0)
    with pytest.raises(ValueError, match="virtual_batch_size must be None with synchronized"):
        BatchNorm(virtual_batch_size=2, synchronized=True)

"""unorm.keras.BatchNorm(renorm=True): ``preset="keras"`` against Keras's own
``BatchNormalization(renorm=True)`` over ``fit`` epochs, and the canonical form against
Batch Renormalization written from the paper in the tests (tests/renorm_formulas.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from renorm_formulas import inference, paper_steps

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm.keras import BatchNorm, convert  # noqa: E402

CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}
GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
TOL = {"rtol": 2e-5, "atol": 2e-5}
#: The layer's weights and the formulas' names for them.
STATE = (
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
    ("renorm_mean", "renorm_mean"),
    ("renorm_stddev", "renorm_std"),
)


def _model(norm: Any, seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(3)(inputs)
    outputs = keras.layers.Dense(1)(norm(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


@pytest.mark.parametrize("clip", [None, CLIP])
def test_keras_preset_is_keras_over_fit_epochs(clip: dict | None) -> None:
    native = _model(keras.layers.BatchNormalization(
        renorm=True, renorm_clipping=clip, renorm_momentum=0.9, momentum=0.8
    ))  # fmt: skip
    ours = _model(BatchNorm(
        preset="keras", renorm=True, renorm_clipping=clip, renorm_momentum=1.0 - 0.9,
        momentum=1.0 - 0.8,
    ))  # fmt: skip
    ours.set_weights(native.get_weights())
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 5)) * 3 + 1).astype("float32")
    t = rng.normal(size=(64, 1)).astype("float32")
    for _ in range(3):
        native.fit(x, t, batch_size=16, epochs=1, shuffle=False, verbose=0)
        ours.fit(x, t, batch_size=16, epochs=1, shuffle=False, verbose=0)
        for a, b, w in zip(native.get_weights(), ours.get_weights(), native.weights, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=w.path)
        np.testing.assert_array_equal(native.predict(x, verbose=0), ours.predict(x, verbose=0))
    names = [w.name for w in ours.layers[2].weights]
    assert names == [w.name for w in native.layers[2].weights]
    assert names[-3:] == ["moving_stddev", "renorm_mean", "renorm_stddev"]


def test_convert_keeps_renorm_and_trains_identically(tmp_path: Path) -> None:
    native = _model(keras.layers.BatchNormalization(renorm=True, renorm_clipping=CLIP))
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(32, 5)) * 2).astype("float32")
    native(x, training=True)
    ported = convert(native)
    layer = ported.layers[2]
    assert layer.spec.renorm and layer.spec.renorm_clipping == CLIP
    assert layer.spec.renorm_momentum == 1.0 - 0.99
    for _ in range(2):
        a, b = native(x, training=True), ported(x, training=True)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(native.get_weights(), ported.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    canonical = convert(native, preset=None).layers[2]
    assert canonical.spec.renorm and canonical.spec.renorm_running == "variance"
    assert canonical.renorm_stddev is not None and canonical.moving_stddev is None
    # .keras save and load: the settings and the renorm weights come back.
    path = tmp_path / "renorm.keras"
    ported.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[2].spec == layer.spec
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(ported(x)))
    a, b = loaded(x, training=True), ported(x, training=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("compiled", [False, True])
def test_canonical_against_the_paper(compiled: bool) -> None:
    layer = BatchNorm(axis=1, renorm=True, renorm_clipping=CLIP, renorm_momentum=0.2)
    layer.build((None, 3, 4))
    layer.gamma.assign(GAMMA.astype("float32"))
    layer.beta.assign(BETA.astype("float32"))
    rng = np.random.default_rng(2)
    xs = [rng.normal(2.0 * k, 1.0 + k, (6, 3, 4)) for k in range(4)]
    dys = [rng.normal(size=(6, 3, 4)) for _ in range(4)]
    want = paper_steps(xs, dys, GAMMA, BETA, renorm_momentum=0.2, **CLIP)

    def step(x: Any, dy: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        dx, dgamma, dbeta = tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)
        return y, dx, dgamma, dbeta

    run = tf.function(step, jit_compile=True) if compiled else step
    for x, dy, expect in zip(xs, dys, want, strict=True):
        got = run(tf.constant(x, tf.float32), tf.constant(dy, tf.float32))
        for value, key in zip(got, ("y", "dx", "dgamma", "dbeta"), strict=True):
            np.testing.assert_allclose(np.asarray(value), expect[key], **TOL, err_msg=key)
        for name, key in STATE:
            value = np.asarray(getattr(layer, name))
            np.testing.assert_allclose(value, expect[key], **TOL, err_msg=name)
    y = layer(tf.constant(xs[-1], tf.float32), training=False)
    np.testing.assert_allclose(np.asarray(y), inference(xs[-1], want[-1], GAMMA, BETA), **TOL)


def test_config_round_trip_and_bad_settings() -> None:
    layer = BatchNorm(renorm=True, renorm_clipping={"rmax": 2.0}, renorm_running="stddev")
    config = layer.get_config()
    assert config["renorm_clipping"] == {"rmax": 2.0} and config["renorm_running"] == "stddev"
    assert BatchNorm.from_config(config).spec == layer.spec
    with pytest.raises(ValueError, match="renorm_dmax must be a number >= 0 or None, got -1"):
        BatchNorm(renorm=True, renorm_clipping={"dmax": -1})
    with pytest.raises(ValueError, match="renorm_momentum must be a number in"):
        BatchNorm(renorm=True, renorm_momentum=2.0)
    bn = BatchNorm(renorm=True)
    bn.build((None, 2))
    before = [np.asarray(w).copy() for w in bn.weights]
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        bn(np.ones((1, 2), "float32"), training=True)
    for a, w in zip(before, bn.weights, strict=True):
        np.testing.assert_array_equal(a, np.asarray(w))

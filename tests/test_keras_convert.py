"""unorm.keras.convert: BatchNormalization swapped for BatchNorm, behaviour unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.keras

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm.keras import BatchNorm, convert  # noqa: E402

layers = keras.layers


def _sequential() -> Any:
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            layers.Conv2D(4, 3),
            layers.BatchNormalization(momentum=0.9, epsilon=1e-2),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(5),
            layers.BatchNormalization(center=False),
            layers.Dense(2),
        ]
    )


def _functional() -> Any:
    inputs = keras.Input((6, 6, 3))
    block = keras.Sequential(
        [keras.Input((4, 4, 4)), layers.BatchNormalization(axis=1), layers.ReLU()],
        name="block",
    )
    x = layers.Conv2D(4, 3)(inputs)
    x = block(x)
    skip = layers.BatchNormalization(scale=False)(x)
    x = layers.Add()([x, skip])
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2)(x))


def _bn_layers(model: Any, kind: type) -> list[Any]:
    return [layer for layer in model._flatten_layers() if type(layer) is kind]


def _warm_up(model: Any, rng: np.random.Generator) -> None:
    """Move the native moving statistics away from their initial values."""
    for _ in range(3):
        model(rng.standard_normal((8, 6, 6, 3)).astype(np.float32) + 1.0, training=True)


@pytest.mark.parametrize("build", [_sequential, _functional], ids=["sequential", "functional"])
def test_convert_keeps_outputs_and_training_behaviour(build: Any) -> None:
    rng = np.random.default_rng(0)
    native = build()
    _warm_up(native, rng)
    ported = convert(native)
    natives = _bn_layers(native, layers.BatchNormalization)
    ours = _bn_layers(ported, BatchNorm)
    assert len(ours) == len(natives) >= 2
    assert not _bn_layers(ported, layers.BatchNormalization)
    assert [layer.name for layer in ours] == [layer.name for layer in natives]
    x = rng.standard_normal((8, 6, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(ported(x), native(x))
    for _ in range(2):  # training: same outputs and the same moving statistics
        np.testing.assert_array_equal(ported(x, training=True), native(x, training=True))
    for a, b in zip(ours, natives, strict=True):
        np.testing.assert_array_equal(a.moving_mean.numpy(), b.moving_mean.numpy())
        np.testing.assert_array_equal(a.moving_variance.numpy(), b.moving_variance.numpy())
        assert a.spec.preset == "keras"
        assert 1.0 - a.momentum == b.momentum and a.eps == b.epsilon


def test_other_presets_and_overrides() -> None:
    native = _sequential()
    ported = convert(native, preset=None, skip_nonfinite=False)
    ours = _bn_layers(ported, BatchNorm)
    assert [layer.eps for layer in ours] == [1e-5, 1e-5]
    assert [layer.spec.skip_nonfinite for layer in ours] == [False, False]
    assert [layer.center for layer in ours] == [True, False]
    first = _bn_layers(native, layers.BatchNormalization)[0]
    np.testing.assert_array_equal(ours[0].gamma.numpy(), first.gamma.numpy())


@pytest.mark.parametrize("preset", ["keras", None, "torch"])
def test_every_override_reaches_the_new_layers(preset: str | None) -> None:
    # Each spec setting given to convert is the converted layers' setting, whatever the preset.
    overrides = {
        "empty_batch": "count",
        "running_var": "unbiased",
        "allow_single_value": False,
        "skip_nonfinite": True,
    }
    ours = _bn_layers(convert(_sequential(), preset=preset, **overrides), BatchNorm)
    for layer in ours:
        for name, value in overrides.items():
            assert getattr(layer.spec, name) == value, (preset, name)


def test_convert_refuses_what_it_cannot_keep() -> None:
    # renorm=True is kept (tests/test_keras_renorm.py), so it is no longer refused.
    renorm = keras.Sequential([keras.Input((3,)), layers.BatchNormalization(renorm=True)])
    assert convert(renorm).layers[0].spec.renorm
    with pytest.raises(ValueError, match="preset must be one of"):
        convert(_sequential(), preset="caffe")
    with pytest.raises(ValueError, match=r"model must be a keras\.Model"):
        convert(layers.BatchNormalization())
